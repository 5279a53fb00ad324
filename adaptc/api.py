"""The public entry points: ``inject``, ``load_adapter`` and ``inspect_sites``."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .capture import capture
from .checkpoint import load_checkpoint
from .checkpoint_files import DEFAULT_ADAPTER, check_new_name, read_checkpoint
from .errors import InputError
from .inputs import Inputs, check_has_tensor, normalize_inputs
from .methods import make_config
from .model import AdaptedModel
from .passes import quantize as quant
from .passes.checkpoint import checkpoint_kwargs
from .passes.sites import find_sites


def inject(
    model: nn.Module,
    method: Any = "lora",
    *,
    example_inputs: Any = None,
    adapter_name: str = DEFAULT_ADAPTER,
    quantize: Any = None,
    gradient_checkpointing: Any = False,
    **options: Any,
) -> AdaptedModel:
    """Capture ``model``, insert adapters with the method's pass, and freeze the base weights.

    ``inject(model, "lora", example_inputs=inputs, targets="all-linear", r=8, alpha=16)`` or
    ``inject(model, LoraConfig(...), example_inputs=inputs)``. Everything is validated before
    the model is touched; on error the model is left as it was.

    ``quantize="nf4"`` or ``"int8"`` (or a ``QuantConfig``) first replaces the model's linear
    layers, in place, by quantized frozen ones (QLoRA; see ``adaptc.passes.quantize``).

    ``gradient_checkpointing=True`` (or ``"full"``, ``"selective"``, or a dict of
    ``gradient_checkpointing_kwargs``) is ``am.gradient_checkpointing_enable(...)`` on the result.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel):
        raise InputError(
            "model is already an AdaptedModel; use am.add_adapter(name, config) to add another adapter"
        )
    config = make_config(method, options)  # fail on bad options before the (slow) capture
    quant_config = quant.make_quant_config(quantize, lora=config)
    checkpointing = checkpoint_kwargs(gradient_checkpointing)
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    replaced = quant.quantize_model(model, quant_config, require=True) if quant_config else []
    try:
        adapted = adapt(model, inputs)
        adapted.add_adapter(adapter_name, config)
        if checkpointing is not None:
            adapted.gradient_checkpointing_enable(checkpointing)
    except BaseException:
        quant.restore(replaced)  # the model is left as it was
        raise
    return adapted


def adapt(model: nn.Module, inputs: Inputs, *, training: bool | None = None) -> AdaptedModel:
    """Capture ``model`` and wrap it as an AdaptedModel with no adapter yet (the one place that does)."""
    graph = capture(model, inputs, training=training)
    return AdaptedModel(model, graph, find_sites(graph, model))


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    example_inputs: Any,
    adapter_name: str = DEFAULT_ADAPTER,
) -> AdaptedModel:
    """Capture ``model`` and load a saved adapter (written by adaptc or PEFT) into it.

    Returns an AdaptedModel whose active adapter is ``adapter_name``. ``directory`` is the
    folder given to ``save_adapter`` / ``save_pretrained``; an adapter saved there under a
    name other than ``default`` is found in its subfolder. The files are read and checked
    before the (slow) capture, and against the model's sites before the model is touched.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel):
        raise InputError("model is already an AdaptedModel; use am.load_adapter(directory, adapter_name) to add one")
    check_new_name((), adapter_name)
    ckpt = read_checkpoint(directory, adapter_name)  # a bad file fails before the (slow) capture
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    am = adapt(model, inputs)
    load_checkpoint(am, ckpt, adapter_name)
    return am


def inspect_sites(model: nn.Module, example_inputs: Any) -> list:
    """Every site a method could adapt (capture only; the model is not changed)."""
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    graph = capture(model, inputs)
    return find_sites(graph, model)
