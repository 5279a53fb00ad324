"""The public entry points: ``inject`` and ``inspect_sites``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .capture import CapturedGraphModule, capture
from .config import LoraConfig, make_config
from .errors import AdaptcError, InputError
from .inputs import check_has_tensor, normalize_inputs
from .model import ADAPTERS_ATTR, AdaptedModel, freeze

DEFAULT_ADAPTER = "default"


def inject(
    model: nn.Module,
    method: str | LoraConfig = "lora",
    *,
    example_inputs: Any = None,
    **options: Any,
) -> AdaptedModel:
    """Capture ``model``, insert adapters with the method's pass, and freeze the base weights.

    ``inject(model, "lora", example_inputs=inputs, targets="all-linear", r=8, alpha=16)`` or
    ``inject(model, LoraConfig(...), example_inputs=inputs)``. Everything is validated before
    the model is touched; on error the model is left as it was.
    """
    from adaptc.passes import lora
    from adaptc.passes.selection import select
    from adaptc.passes.sites import find_sites

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel):
        raise InputError("model is already an AdaptedModel; inject into its base_model, or use the AdaptedModel as is")
    config = make_config(method, options)
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)

    graph = capture(model, inputs)
    sites = find_sites(graph, model)
    chosen = select(sites, config.targets, config.exclude, config.layers, config.layers_pattern)
    layers = lora.build_layers(chosen, config, model)  # validates ranks before any change

    adapters = nn.ModuleDict({DEFAULT_ADAPTER: nn.ModuleDict({_key(name): layer for name, layer in layers.items()})})
    expected_uses = sum(site.uses for site in chosen)
    prefix = f"{ADAPTERS_ATTR}.{DEFAULT_ADAPTER}"

    def lora_pass(gm: CapturedGraphModule) -> None:
        count = lora.insert(gm, model, layers, prefix)
        if count < expected_uses:
            raise AdaptcError(
                f"the LoRA pass found {count} of the {expected_uses} selected op uses in a newly captured graph "
                f"of {type(model).__name__}; the graph differs between modes or inputs in a way adaptc does not "
                "handle yet. Capture with the inputs and mode you will use."
            )

    freeze(model)
    for layer in layers.values():
        layer.requires_grad_(True)
    return AdaptedModel(model, graph, adapters, lora_pass, chosen, config)


def inspect_sites(model: nn.Module, example_inputs: Any) -> list:
    """Every site a method could adapt (capture only; the model is not changed)."""
    from adaptc.passes.sites import find_sites

    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    graph = capture(model, inputs)
    return find_sites(graph, model)


def _key(name: str) -> str:
    from adaptc.passes.sites import site_key

    return site_key(name)
