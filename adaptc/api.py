"""The public entry points: ``inject`` and ``inspect_sites``."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .capture import CapturedGraphModule, capture
from .config import LoraConfig, make_config
from .errors import AdaptcError, InputError
from .inputs import check_has_tensor, normalize_inputs
from .model import ADAPTERS_ATTR, AdaptedModel

DEFAULT_ADAPTER = "default"


def inject(
    model: nn.Module,
    method: str | LoraConfig = "lora",
    *,
    example_inputs: Any = None,
    adapter_name: str = DEFAULT_ADAPTER,
    quantize: Any = None,
    **options: Any,
) -> AdaptedModel:
    """Capture ``model``, insert adapters with the method's pass, and freeze the base weights.

    ``inject(model, "lora", example_inputs=inputs, targets="all-linear", r=8, alpha=16)`` or
    ``inject(model, LoraConfig(...), example_inputs=inputs)``. Everything is validated before
    the model is touched; on error the model is left as it was.

    ``quantize="nf4"`` or ``"int8"`` (or a ``QuantConfig``) first replaces the model's linear
    layers, in place, by quantized frozen ones (QLoRA; see ``adaptc.passes.quantize``).
    """
    from adaptc.passes import quantize as quant
    from adaptc.passes.sites import find_sites

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel):
        raise InputError(
            "model is already an AdaptedModel; use am.add_adapter(name, config) to add another adapter"
        )
    config = make_config(method, options)  # fail on bad options before the (slow) capture
    quant_config = quant.make_quant_config(quantize, lora=config)
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    replaced = quant.quantize_model(model, quant_config, require=True) if quant_config else []
    try:
        graph = capture(model, inputs)
        adapted = AdaptedModel(model, graph, find_sites(graph, model))
        adapted.add_adapter(adapter_name, method, **options)
    except BaseException:
        quant.restore(replaced)  # the model is left as it was
        raise
    return adapted


def build_adapter(
    adapted: AdaptedModel, name: str, method: str | LoraConfig, options: dict[str, Any]
) -> tuple[LoraConfig, list, dict[str, nn.Module], Any]:
    """Validate a method's config against the model's sites and build its layers and graph pass.

    Returns (config, chosen sites, layers by site key, graph pass). Nothing in the model or its
    graphs changes here except PiSSA's in-place weight update, which runs after validation.
    """
    from adaptc.passes import lora
    from adaptc.passes.selection import select
    from adaptc.passes.sites import site_key

    config = make_config(method, options)
    chosen = select(adapted.all_sites, config.targets, config.exclude, config.layers, config.layers_pattern)
    chosen = [dataclasses.replace(site) for site in chosen]  # params_added is per adapter
    layers = lora.build_layers(chosen, config, adapted.base_model)
    model = adapted.base_model
    by_name = dict(layers)
    expected_uses = sum(site.uses for site in chosen)
    prefix = f"{ADAPTERS_ATTR}.{name}"

    def lora_pass(gm: CapturedGraphModule) -> None:
        count = lora.insert(gm, model, by_name, prefix)
        if count < expected_uses:
            raise AdaptcError(
                f"the LoRA pass found {count} of the {expected_uses} selected op uses in a newly captured graph "
                f"of {type(model).__name__}; the graph differs between modes or inputs in a way adaptc does not "
                "handle yet. Capture with the inputs and mode you will use."
            )

    return config, chosen, {site_key(n): layer for n, layer in layers.items()}, lora_pass


def inspect_sites(model: nn.Module, example_inputs: Any) -> list:
    """Every site a method could adapt (capture only; the model is not changed)."""
    from adaptc.passes.sites import find_sites

    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    graph = capture(model, inputs)
    return find_sites(graph, model)
