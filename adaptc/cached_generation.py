"""Generation steps with a key/value cache, run through the adapted graphs.

transformers' ``generate`` keeps a ``DynamicCache`` and calls the model once per step. Each call
here runs a graph captured *with the cache as graph input and output* (adaptc registers
``DynamicCache`` with torch's pytree, :func:`_register_cache_for_export`), so the adapter passes
apply to it as to any graph: the prefill step captures one graph, the one-token steps another,
both reading the same adapter parameters.

Methods that edit the sequence:

- Prompt tuning and P-tuning add their virtual tokens at the first step only. The cache then
  holds them, so later steps run without the edit, their attention mask widened by the virtual
  tokens and their position ids (when given) shifted past them, as in the whole-sequence call.
- Prefix tuning adds its learned keys and values inside every attention op at every step; the
  cache holds the real tokens only, and positions continue after the cached ones.

Where a cache cannot be kept (a model outside transformers, a cache class other than
``DynamicCache``, a sequence edit on a non-text model, a sliding window shorter than the
generation) :func:`cache_blocker` says why, and generation recomputes the whole sequence per step.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch.utils import _pytree as pytree

_CACHE_NAMES = ("cache", "past_key_values")


def _register_cache_for_export() -> bool:
    """Register ``DynamicCache`` with torch's pytree (graphs take and return it), once.

    adaptc's own registration rebuilds a cache from a graph's outputs by reference; the one in
    ``transformers.integrations.executorch`` (used when something registered it first) rebuilds it
    through ``update``, a copy of every layer's keys and values at every step.
    """
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return False
    if DynamicCache in pytree.SUPPORTED_NODES:
        return True
    pytree.register_pytree_node(
        DynamicCache, _flatten_cache, _unflatten_cache,
        serialized_type_name="adaptc.DynamicCache", flatten_with_keys_fn=_flatten_cache_with_keys,
    )
    return True


def _flatten_cache(cache: Any) -> tuple[list[torch.Tensor], tuple]:
    """Keys then values of the layers that hold any; the context: how many do, and every layer's window."""
    if not _supported_layers(cache):
        raise TypeError(f"adaptc cannot pass a cache of layers {[type(x).__name__ for x in cache.layers]} to a graph")
    filled = [layer for layer in cache.layers if layer.is_initialized and layer.keys is not None and layer.keys.numel()]
    layout = tuple(getattr(layer, "sliding_window", None) for layer in cache.layers)
    return [layer.keys for layer in filled] + [layer.values for layer in filled], (len(filled), layout)


def _flatten_cache_with_keys(cache: Any) -> tuple[list[tuple[Any, torch.Tensor]], tuple]:
    values, context = _flatten_cache(cache)
    return [(pytree.SequenceKey(i), value) for i, value in enumerate(values)], context


def _unflatten_cache(values: Any, context: tuple) -> Any:
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    filled, layout = context
    values = list(values)
    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=w) if w else DynamicLayer() for w in layout]
    for layer, keys, vals in zip(cache.layers, values[:filled], values[filled:]):
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.lazy_initialization(keys, vals)  # also moves its window tensor to the device
            layer.cumulative_length = keys.shape[-2]
        else:  # what lazy_initialization sets, without its two empty tensors (this runs at every step)
            layer.device, layer.is_initialized = keys.device, True
        layer.keys, layer.values = keys, vals
    return cache


def _cache_parameter(base: Any) -> str | None:
    parameters = inspect.signature(base.forward).parameters
    return next((name for name in _CACHE_NAMES if name in parameters), None)


def cache_keywords(base: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with transformers' deprecated ``past_key_values=`` passed as ``cache=`` where the
    model's forward takes ``cache`` (transformers renames it inside a decorator, which torch.export's
    guards on the call's keywords do not survive)."""
    if "past_key_values" in kwargs and "cache" not in kwargs and _cache_parameter(base) == "cache":
        kwargs = dict(kwargs)
        kwargs["cache"] = kwargs.pop("past_key_values")
    if kwargs.get("cache") is not None:
        _register_cache_for_export()  # a graph takes the cache's tensors as inputs
    return kwargs


def _supported_layers(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def cache_blocker(am: Any, generation_length: int | None) -> str | None:
    """Why ``am.generate`` cannot keep a key/value cache for ``am``; None when it can.

    ``generation_length``: prompt plus new tokens, when known (a sliding-window cache shorter than
    it would drop keys the graphs cannot see dropped).
    """
    base = am.base_model
    try:
        from transformers import DynamicCache, PreTrainedModel
    except ImportError:
        return "transformers is not installed"
    if not isinstance(base, PreTrainedModel):
        return f"{type(base).__name__} is not a transformers model"
    if _cache_parameter(base) is None or not base._supports_default_dynamic_cache():
        return f"{type(base).__name__} does not take a DynamicCache"
    try:
        cache = DynamicCache(config=base.config)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a cache for
        return f"no DynamicCache for its config ({type(exc).__name__}: {exc})"
    if not _supported_layers(cache):
        return f"its cache layers ({', '.join(sorted({type(x).__name__ for x in cache.layers}))}) cannot be captured"
    windows = [layer.sliding_window for layer in cache.layers if getattr(layer, "sliding_window", None)]
    if windows and (generation_length is None or generation_length >= min(windows)):
        return f"the generation may outgrow its sliding-window cache ({min(windows)} tokens)"
    for record in am.edits_in_force_records():
        if getattr(record.edit, "prefill_tokens", None) is None:
            return f"the {record.method.name!r} adapter {record.name!r} edits a sequence that is not text tokens"
    if not _register_cache_for_export():
        return "this transformers version cannot export a DynamicCache"
    return None


class CachedSteps:
    """One generation step of ``am`` with transformers' cache: ``steps(inputs)`` returns the
    model's output, whose ``cache`` is the caller's cache object, grown by the step's tokens."""

    def __init__(self, am: Any) -> None:
        self._am = am
        self._cache_name = _cache_parameter(am.base_model)
        records = am.edits_in_force_records()
        # Edits that add tokens at the first step (prompt methods); the cache holds those tokens afterwards.
        self._prefill_edits = [r.name for r in records if r.edit.prefill_tokens]
        self._virtual_tokens = sum(r.edit.prefill_tokens for r in records)

    def __call__(self, inputs: dict[str, Any]) -> Any:
        cache = inputs.get(self._cache_name)
        if cache is None:
            inputs = {**inputs, "use_cache": False}
            return self._am(**inputs)
        inputs = {**inputs, "use_cache": True}  # (a cache of other layer types is refused by _flatten_cache)
        first = cache.get_seq_length() == 0
        suspended = contextlib.nullcontext()
        if not first and self._virtual_tokens:
            inputs = self._after_virtual_tokens(inputs)
            suspended = self._am.edits_suspended(self._prefill_edits)
        with suspended:
            return self._am(**inputs)  # AdaptedModel.forward grows ``cache`` in place (keep_callers_cache)

    def _after_virtual_tokens(self, inputs: dict[str, Any]) -> dict[str, Any]:
        count = self._virtual_tokens
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)
        positions = inputs.get("position_ids")
        if isinstance(positions, torch.Tensor):
            inputs["position_ids"] = positions + count
        return inputs


def keep_callers_cache(kwargs: dict[str, Any], output: Any) -> Any:
    """After a graph call given a cache: the caller's cache object holds the grown keys and values and
    is the one in the output, as when transformers' own forward updates it in place (a loop that
    passes the same cache object at every step stays right)."""
    given = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
    if given is None or not hasattr(output, "keys"):
        return output
    name = next((n for n in _CACHE_NAMES if n in output.keys()), None)
    if name is None or output[name] is None or output[name] is given:
        return output
    _adopt(given, output[name])
    output[name] = given
    return output


def _adopt(cache: Any, grown: Any) -> None:
    """Make ``cache`` hold ``grown``'s keys and values (the graph returned a new cache object;
    generate and the caller hold the one they passed)."""
    cache.layers.extend(grown.layers[len(cache.layers):])  # a cache made without a config grows layers lazily
    for layer, new in zip(cache.layers, grown.layers):
        if layer is new or new.keys is None:
            continue
        added = new.keys.shape[-2] - (layer.keys.shape[-2] if layer.is_initialized and layer.keys is not None else 0)
        if not layer.is_initialized:
            layer.lazy_initialization(new.keys, new.values)
        layer.keys, layer.values = new.keys, new.values
        if hasattr(layer, "cumulative_length"):  # a sliding-window layer counts every token it saw
            layer.cumulative_length += max(added, 0)

