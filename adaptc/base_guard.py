"""Keep calls that reach the base model from skipping the adapters.

An AdaptedModel looks up what it lacks on its base model (``am.config``, ``am.get_input_embeddings()``).
A method found there that runs the base model's modules (``generate``, timm's ``forward_features``,
wav2vec2's ``extract_features``) would compute the *unadapted* model, silently. Two tools:

- :func:`guarded`: the base model's bound method, wrapped so that any of the base model's modules
  running inside it while adapters apply raises :class:`AdaptcError` naming the call.
- :func:`generate`: transformers' ``generate`` (its whole GenerationConfig: sampling, beams, stopping
  criteria, streamers) with every model call routed through the adapted graphs, keeping
  transformers' key/value cache (:mod:`adaptc.cached_generation`); where a cache cannot be kept,
  each step runs the whole sequence (quadratic time in the length).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import cached_generation, mixed_batch
from .errors import AdaptcError

# Generation keywords the adapted graphs do not take: the cache is off, and the graphs return every
# position's logits (generate reads the last) in the model's own output structure.
_STEP_KEYWORDS_DROPPED = ("cache", "past_key_values", "use_cache", "return_dict", "cache_position", "logits_to_keep")
# With the cache: the graphs return the model's output structure and compute the positions themselves.
_STEP_KEYWORDS_DROPPED_CACHED = ("use_cache", "return_dict", "cache_position")


class _BaseModules:
    """While entered, any forward of ``model``'s modules raises unless :meth:`allowed` is in force."""

    def __init__(self, model: nn.Module, what: str, *, redirected: nn.Module | None = None) -> None:
        # ``redirected``: a module whose forward was routed through the adapters; calling it is fine.
        self._model, self._redirected = model, redirected
        self._ids: dict[int, str] | None = None  # built on the first module call: most methods run none
        self._what = what
        self._allowed = 0

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1

    def _check(self, module: nn.Module, _args: Any) -> None:
        if self._allowed:
            return
        if self._ids is None:
            self._ids = {id(m): name for name, m in self._model.named_modules() if m is not self._redirected}
        name = self._ids.get(id(module))
        if name is not None:
            where = f"its module {name!r}" if name else "its forward"
            raise AdaptcError(
                f"{self._what} runs the base model ({where}) without the adapters. Call the adapted model "
                "(am(...)), fold LoRA adapters in with am.merge() and call that model, or run it inside "
                "`with am.disable_adapters():` when the base model is what you want"
            )

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        handle = nn.modules.module.register_module_forward_pre_hook(self._check)
        try:
            yield
        finally:
            handle.remove()


def guarded(method: Callable, name: str, adapters_apply: Callable[[], bool], base: nn.Module) -> Callable:
    """``method`` (of the base model or one of its modules) failing loudly if it runs the base model's
    modules while ``adapters_apply()``; with the adapters off it runs as it is."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not adapters_apply():
            return method(*args, **kwargs)
        with _BaseModules(base, f"am.{name}()").watching():
            return method(*args, **kwargs)

    return call


def generate(am: Any, *args: Any, **kwargs: Any) -> Any:
    """``base_model.generate(*args, **kwargs)`` with each model call running the adapted graphs,
    with transformers' key/value cache where :func:`cached_generation.cache_blocker` allows."""
    base = am.base_model
    if not callable(getattr(base, "generate", None)):
        raise AdaptcError(
            f"{type(base).__name__} has no generate(); for a causal LM of your own use "
            "adaptc.generate(am, input_ids, max_new_tokens=...) (greedy, any method)"
        )
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise AdaptcError(
            f"am.generate() runs decoder-only models; {type(base).__name__} is an encoder-decoder model, whose "
            "generate() calls its encoder directly. Merge LoRA adapters (am.merge()) and call generate() on that model"
        )
    adapter_names = kwargs.pop("adapter_names", None)
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        raise AdaptcError("am.generate() keeps its own key/value cache: pass no cache / past_key_values")
    blocker = "use_cache=False" if kwargs.get("use_cache") is False else \
        cached_generation.cache_blocker(am, _generation_length(base, args, kwargs))
    steps = cached_generation.CachedSteps(am) if blocker is None else None
    if steps is None:
        kwargs["use_cache"] = False
    watch = _BaseModules(base, "am.generate()", redirected=base)
    signature = inspect.signature(base.forward)
    dropped = _STEP_KEYWORDS_DROPPED if steps is None else _STEP_KEYWORDS_DROPPED_CACHED

    def step(*step_args: Any, **step_kwargs: Any) -> Any:
        bound = signature.bind_partial(*step_args, **step_kwargs).arguments
        extra = bound.pop("kwargs", None) or {}  # a **kwargs parameter collects the rest
        inputs = {**bound, **extra}
        if steps is None and (inputs.get("cache") is not None or inputs.get("past_key_values") is not None):
            raise AdaptcError("am.generate() got a key/value cache from transformers; it runs without one here")
        inputs = {k: v for k, v in inputs.items() if k not in dropped and v is not None and v is not False}
        del base.forward  # the class's forward again while the adapted graphs run (and capture)
        try:
            with watch.allowed():
                return am(**inputs) if steps is None else steps(inputs)
        finally:
            base.forward = step

    step.__signature__ = signature  # generate reads the forward's parameters (position_ids, ...)
    # PEFT's adapter_names: one adapter per prompt row, kept by the rows generate repeats (beams).
    rows = mixed_batch.rows_applied(am, adapter_names) if adapter_names is not None else contextlib.nullcontext()
    base.forward = step
    try:
        with rows, watch.watching(), torch.no_grad():
            return base.generate(*args, **kwargs)
    finally:
        base.__dict__.pop("forward", None)


def _generation_length(base: nn.Module, args: tuple, kwargs: dict) -> int | None:
    """Prompt plus new tokens of a generate call, when its arguments say (else None)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    config = kwargs.get("generation_config") or getattr(base, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None) if "max_length" not in kwargs else None)
    if isinstance(ids, torch.Tensor) and isinstance(new, int):
        return ids.shape[-1] + new
    total = kwargs.get("max_length", getattr(config, "max_length", None))
    return total if isinstance(total, int) else None
