"""Mixed-adapter batches: each row of one batch with its own adapter (PEFT's ``adapter_names``).

``am(**inputs, adapter_names=["a", "b", "__base__", "a"])`` runs the captured graph once, not once per
adapter: inside :func:`rows_applied` every named adapter is active, and each of its layers applies its
update to its own rows only (``LoraRows``, passes/lora.py: the rows are gathered, updated and written
into a new tensor beside the base output); ``"__base__"`` rows, and every adapter not named, get no
update. Adapters of any rank mix. A method takes part when it declares ``mixed_batch`` (LoRA, DoRA
included); inference only, as in PEFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import ConfigError, InputError
from .methods import available_methods, get_method
from .passes.lora import LoraRows

BASE = "__base__"  # the name of a row that runs the base model (PEFT's)

# The inputs whose first axis is the batch in the models adaptc sees most, tried before any other tensor.
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "decoder_input_ids")


@contextlib.contextmanager
def rows_applied(am: Any, adapter_names: Sequence[str], batch_size: int | None = None) -> Iterator[None]:
    """Within the block, row ``i`` of every call of ``am``'s graphs uses adapter ``adapter_names[i]``.

    ``adapter_names``: one adapter name per row (``"__base__"``: the base model, no adapter).
    ``batch_size``: the batch the calls will run (None: not checked here); it must equal
    ``len(adapter_names)`` or be a multiple of it, as when ``generate`` repeats each input row k
    times consecutively (beams, ``num_return_sequences``): each name then covers its k rows.

    Everything is checked before anything changes: an unknown name is a :class:`ConfigError`
    listing the model's adapters; a method without ``mixed_batch`` (prompt tuning, P-tuning,
    prefix tuning), a capture-time edit in force (an active prompt-method adapter: it would
    apply to every row) and training mode are ``ConfigError`` too; a wrong length is an
    :class:`InputError`. Inside, the named adapters are active (each on its rows) and every
    other adapter is off; on exit every layer's ``active`` flag and rows are as they were
    (``requires_grad`` is never touched, nor the active adapter list).
    """
    plan = _plan(am, adapter_names, batch_size)
    layers = [(name, layer) for name, adapter in am.adapters.items() for layer in adapter.values()]
    saved = [(layer, layer.__dict__.get("active", _UNSET), layer.__dict__.get("_rows", _UNSET)) for _, layer in layers]
    try:
        for name, layer in layers:
            if name in plan:
                layer.active = True
                layer._rows = plan[name]  # None: every row (the plain path)
            elif hasattr(layer, "active"):  # not named: off for this call
                layer.active = False
        yield
    finally:
        for layer, active, rows in saved:
            _restore(layer, "active", active)
            _restore(layer, "_rows", rows)


def batch_size_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a call: the first axis of its main input (``input_ids``, ``pixel_values``, ...),
    else of its first tensor argument; None without a tensor."""
    for name in _BATCH_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


_UNSET = object()


def _restore(layer: Any, attribute: str, value: Any) -> None:
    if value is _UNSET:
        layer.__dict__.pop(attribute, None)  # it was the class's default
    else:
        setattr(layer, attribute, value)


def _plan(am: Any, adapter_names: Sequence[str], batch_size: int | None) -> dict[str, LoraRows | None]:
    """Adapter name -> the rows it applies to (None: all of them), for the adapters that have rows."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names \
            or not all(isinstance(n, str) for n in adapter_names):
        raise InputError(
            f"adapter_names must be a non-empty list of adapter names, one per row of the batch, got {adapter_names!r}"
        )
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in am.adapters})
    if unknown:
        raise ConfigError(
            f"unknown adapter {', '.join(map(repr, unknown))} in adapter_names; this model has: "
            f"{', '.join(am.adapters) or 'no adapters'} (and {BASE!r}: the base model)"
        )
    for name in dict.fromkeys(n for n in names if n != BASE):
        method = am.adapter_record(name).method
        if not method.mixed_batch:
            able = [m for m in available_methods() if get_method(m).mixed_batch]
            raise ConfigError(
                f"adapter {name!r} is a {method.name} adapter: a mixed batch (adapter_names) takes "
                f"{', '.join(able)} adapters only; run its rows as a batch of their own with set_adapter({name!r})"
            )
    if batch_size is not None and (batch_size < len(names) or batch_size % len(names)):
        raise InputError(
            f"adapter_names has {len(names)} names for a batch of {batch_size} rows: give one name per row "
            "(or per input row, when generate repeats each row for beams or num_return_sequences)"
        )
    edits = am._edits_in_force()
    if edits:
        record = am.adapter_record(edits[0])
        raise ConfigError(
            f"adapter {record.name!r} ({record.method.name}) is active and edits every row's input, so rows cannot "
            f"use different adapters: set_adapter() to others, or call inside am.disable_adapters([{record.name!r}])"
        )
    if am.training:
        raise ConfigError("adapter_names (a mixed batch) runs in inference only, as in PEFT: call am.eval() first")
    positions: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name != BASE:
            positions.setdefault(name, []).append(row)
    return {name: None if len(rows) == len(names) else LoraRows(rows, len(names)) for name, rows in positions.items()}
