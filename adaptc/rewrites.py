"""Capture-time rewrites: library behaviour that cannot be captured, changed only while capturing.

Some models do things a graph cannot hold: return a Python cache object, draw a random
number and branch on it in Python (layer drop), or size a tensor from a value computed
on the data (``lengths.max().item()``). Each rewrite here is a context manager that the
front end enters around capture when it applies to the model; the captured graph is
then free of the construct, and the model itself is restored afterwards.

A rewrite looks at attributes and library functions, never at a model's class name, so
it serves every model that shares the convention.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CaptureRewrite:
    name: str
    why: str
    applies: Callable[[nn.Module, bool], bool]  # (model, training) -> bool
    context: Callable[[nn.Module], contextlib.AbstractContextManager]


REGISTRY: list[CaptureRewrite] = []


def register(rewrite: CaptureRewrite) -> CaptureRewrite:
    REGISTRY.append(rewrite)
    return rewrite


@contextlib.contextmanager
def applied(model: nn.Module, training: bool) -> Iterator[list[str]]:
    """Enter every rewrite that applies to ``model``; yields their names."""
    with contextlib.ExitStack() as stack:
        names = []
        for rewrite in REGISTRY:
            if rewrite.applies(model, training):
                stack.enter_context(rewrite.context(model))
                names.append(rewrite.name)
        yield names


@contextlib.contextmanager
def _set_attrs(changes: list[tuple[object, str, object]]) -> Iterator[None]:
    """Set attributes for the duration of the block and restore them afterwards."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in changes]
    try:
        for obj, attr, value in changes:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


# --- transformers: key/value caches are Python objects, not tensors -----------------------

def _configs(model: nn.Module) -> list[object]:
    seen, out = set(), []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and not isinstance(config, torch.Tensor):
            seen.add(id(config))
            out.append(config)
    return out


def _cache_flags(model: nn.Module) -> list[tuple[object, str, object]]:
    return [(c, "use_cache", False) for c in _configs(model) if getattr(c, "use_cache", False) is True]


register(
    CaptureRewrite(
        name="no-kv-cache",
        why="a returned key/value cache object cannot be a graph output; captured graphs run without it",
        applies=lambda model, training: bool(_cache_flags(model)),
        context=lambda model: _set_attrs(_cache_flags(model)),
    )
)


# --- layer drop: a random Python branch per layer in training --------------------------

_LAYERDROP_CONFIG_FIELDS = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")


def _layerdrop_changes(model: nn.Module) -> tuple[list[tuple[object, str, object]], bool]:
    """The attribute changes that take layer drop out of a capture, and whether any layer drop was on.

    transformers checks ``self.training and config.layerdrop > 0`` before drawing, so a zero
    rate is enough there. torchaudio draws first (``self.training and torch.rand(1).item() <=
    self.layer_drop``), which no rate makes traceable: the module that owns ``layer_drop`` is
    captured with its own ``training`` flag off, so the draw is skipped; its submodules (the
    layers, their dropout) keep training.
    """
    changes: list[tuple[object, str, object]] = []
    active = False
    for config in _configs(model):
        for field in _LAYERDROP_CONFIG_FIELDS:
            value = getattr(config, field, None)
            if isinstance(value, float) and value > 0:
                changes.append((config, field, 0.0))
                active = True
    for module in model.modules():
        value = getattr(module, "layer_drop", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _forward_reads(module, "layer_drop"):
            changes += [(module, "layer_drop", 0.0), (module, "training", False)]
            active = active or value > 0
    return changes, active


def _forward_reads(module: nn.Module, attr: str) -> bool:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return f"self.{attr}" in source


@contextlib.contextmanager
def _layerdrop_off(model: nn.Module) -> Iterator[None]:
    changes, active = _layerdrop_changes(model)
    if active:
        warnings.warn(
            "adaptc: layer drop draws a random number in Python per layer and step, which a graph "
            "cannot hold; the captured training graph runs every layer (as with layer drop 0).",
            stacklevel=4,
        )
    with _set_attrs(changes):
        yield


register(
    CaptureRewrite(
        name="layer-drop-off",
        why="layer drop branches on torch.rand(...).item() in Python",
        applies=lambda model, training: training and bool(_layerdrop_changes(model)[0]),
        context=_layerdrop_off,
    )
)


# --- SpecAugment: random time/feature masks drawn with numpy in training -------------------

_SPEC_AUGMENT_CONFIG_FIELDS = ("mask_time_prob", "mask_feature_prob")


def _spec_augment_changes(model: nn.Module) -> list[tuple[object, str, object]]:
    changes = []
    for config in _configs(model):
        if getattr(config, "apply_spec_augment", True) is False:
            continue
        for field in _SPEC_AUGMENT_CONFIG_FIELDS:
            value = getattr(config, field, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                changes.append((config, field, 0.0))
    return changes


@contextlib.contextmanager
def _spec_augment_off(model: nn.Module) -> Iterator[None]:
    warnings.warn(
        "adaptc: SpecAugment draws its time/feature masks with numpy on every training step, which a "
        "graph cannot hold; the captured training graph applies no SpecAugment mask (pass mask_time_indices "
        "as an input to mask time steps).",
        stacklevel=4,
    )
    with _set_attrs(_spec_augment_changes(model)):
        yield


register(
    CaptureRewrite(
        name="spec-augment-off",
        why="SpecAugment masks are drawn with numpy from the input's shape (config.mask_time_prob > 0)",
        applies=lambda model, training: training and bool(_spec_augment_changes(model)),
        context=_spec_augment_off,
    )
)


# --- torchaudio: padding masks sized by lengths.max().item() ---------------------------

def _torchaudio_mask_helpers() -> list[tuple[object, str]]:
    """Module-level helpers that size a padding mask from the data."""
    found = []
    for module_name in ("torchaudio.models.conformer", "torchaudio.models.emformer", "torchaudio.models.rnnt"):
        try:
            module = __import__(module_name, fromlist=["_"])
        except Exception:
            continue
        if hasattr(module, "_lengths_to_padding_mask"):
            found.append((module, "_lengths_to_padding_mask"))
    return found


_SEQUENCE_LENGTH: list[int | torch.SymInt] = []


def _mask_from_sequence_length(lengths: torch.Tensor) -> torch.Tensor:
    # Same mask as torchaudio's helper whenever that one works (max(lengths) must equal the
    # input's time axis there, or the model fails later), but sized from the input, not the data.
    max_length = _SEQUENCE_LENGTH[-1]
    positions = torch.arange(max_length, device=lengths.device, dtype=lengths.dtype)
    return positions.expand(lengths.shape[0], max_length) >= lengths.unsqueeze(1)


def _uses_length_mask(model: nn.Module) -> list[nn.Module]:
    helpers = _torchaudio_mask_helpers()
    if not helpers:
        return []
    owners = {module.__name__ for module, _ in helpers}
    return [
        m
        for m in model.modules()
        if type(m).__module__ in owners and "lengths" in inspect.signature(type(m).forward).parameters
    ]


@contextlib.contextmanager
def _length_mask_from_input(model: nn.Module) -> Iterator[None]:
    handles = []

    def remember_length(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        _SEQUENCE_LENGTH.append(x.shape[1])

    def forget_length(module, args, kwargs, output):
        _SEQUENCE_LENGTH.pop()

    for module in _uses_length_mask(model):
        handles.append(module.register_forward_pre_hook(remember_length, with_kwargs=True))
        handles.append(module.register_forward_hook(forget_length, with_kwargs=True))
    patched = [(helper, attr, _mask_from_sequence_length) for helper, attr in _torchaudio_mask_helpers()]
    try:
        with _set_attrs(patched):
            yield
    finally:
        for handle in handles:
            handle.remove()


register(
    CaptureRewrite(
        name="length-mask-from-input",
        why="torchaudio sizes padding masks with lengths.max().item(), a data-dependent size",
        applies=lambda model, training: bool(_uses_length_mask(model)),
        context=_length_mask_from_input,
    )
)
