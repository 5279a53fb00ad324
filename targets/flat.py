"""A model call as a flat list of tensors in and out: what an ONNX graph's inputs and outputs are.

``FlatCall`` wraps a module (a captured graph) so that its tensors are positional inputs, in
the order of the example's leaves, every other leaf (``use_cache=False``) is baked in, and
its outputs come back as a flat tuple of tensors. Optional extra inputs replace named
parameters of the module (LoRA A/B for an unmerged export) through ``functional_call``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from adaptc.inputs import Inputs


def _key_text(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return re.sub(r"\W", "", str(key))


class FlatCall(nn.Module):
    """``forward(*tensors, *replacements)`` -> tuple of output tensors, for export."""

    def __init__(self, module: nn.Module, template: Inputs, replaced: Sequence[str] = ()) -> None:
        super().__init__()
        self.module = module
        leaves, self._spec = pytree.tree_flatten((template.args, template.kwargs))
        self._leaves = leaves
        self._tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self._replaced = list(replaced)

    def unflatten(self, tensors: Sequence[torch.Tensor]) -> Inputs:
        """The call's (args, kwargs) with these tensors in place of the example's."""
        leaves = list(self._leaves)
        for index, tensor in zip(self._tensor_at, tensors):
            leaves[index] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return Inputs(tuple(args), dict(kwargs))

    @property
    def num_inputs(self) -> int:
        return len(self._tensor_at)

    def example_tensors(self) -> list[torch.Tensor]:
        return [self._leaves[i] for i in self._tensor_at]

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call = self.unflatten(flat[: self.num_inputs])
        if self._replaced:
            replacements = dict(zip(self._replaced, flat[self.num_inputs :]))
            out = torch.func.functional_call(self.module, replacements, call.args, call.kwargs, strict=False)
        else:
            out = self.module(*call.args, **call.kwargs)
        return flat_outputs(out)


def flat_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor))


def input_names(model: nn.Module, template: Inputs) -> list[str]:
    """A readable name per tensor leaf: the keyword or the forward's parameter name, then nested keys."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    except (TypeError, ValueError):
        params = []
    names = []
    for path, leaf in pytree.tree_flatten_with_path((template.args, template.kwargs))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        where, top, *rest = path
        if _key_text(where) == "0":  # positional
            index = int(_key_text(top))
            param = params[index] if index < len(params) else None
            head = param.name if param is not None and param.kind != param.VAR_POSITIONAL else f"input_{index}"
        else:
            head = _key_text(top)
        names.append("_".join([head] + [_key_text(k) for k in rest]))
    return _unique(names)


def output_names(out: Any, taken: set[str]) -> list[str]:
    """``logits`` for a ModelOutput field, ``output_0`` for a tuple item, ``output`` for a lone tensor."""
    names = []
    for path, leaf in pytree.tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [_key_text(k) for k in path]
        name = "_".join(parts) if parts else "output"
        names.append(f"output_{name}" if name[0].isdigit() else name)
    return _unique(names, taken)


def _unique(names: list[str], taken: set[str] | None = None) -> list[str]:
    seen = set(taken or ())
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        out.append(candidate)
    return out
