"""The public entry points: ``inject`` and ``inspect_sites``."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .capture import CapturedGraphModule, capture
from .config import LoraConfig, make_config
from .errors import AdaptcError, InputError, TargetError
from .inputs import check_has_tensor, normalize_inputs
from .model import ADAPTERS_ATTR, AdaptedModel

DEFAULT_ADAPTER = "default"


def inject(
    model: nn.Module,
    method: Any = "lora",
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


@dataclasses.dataclass
class AdapterBuild:
    """What a method contributes to a model: its config, sites, layers, and how it edits graphs."""

    config: Any
    sites: list
    layers: dict[str, nn.Module]  # by site key
    graph_pass: Any = None  # applied to every captured graph (LoRA, prefix)
    edit: Any = None  # a capture-time edit: ``edit.applied(model)`` (prompt methods)

    @property
    def prompt_method(self) -> bool:
        return self.config.method != "lora"


def build_adapter(adapted: AdaptedModel, name: str, method: Any, options: dict[str, Any]) -> AdapterBuild:
    """Validate a method's config against the model's sites and build its layers and graph edits.

    Nothing in the model or its graphs changes here except PiSSA's in-place weight update, which
    runs after validation.
    """
    config = make_config(method, options)
    prefix = f"{ADAPTERS_ATTR}.{name}"
    if config.method == "lora":
        return _build_lora(adapted, config, prefix)
    if config.method == "prefix":
        return _build_prefix(adapted, config, prefix)
    return _build_prompt(adapted, config)


def _build_lora(adapted: AdaptedModel, config: LoraConfig, prefix: str) -> AdapterBuild:
    from adaptc.passes import lora, lora_fused
    from adaptc.passes.selection import select
    from adaptc.passes.sites import site_key

    chosen = select(adapted.all_sites, config.targets, config.exclude, config.layers, config.layers_pattern)
    chosen = [dataclasses.replace(site) for site in chosen]  # params_added is per adapter
    layers = lora.build_layers(chosen, config, adapted.base_model)
    model = adapted.base_model
    by_name = dict(layers)
    expected_uses = sum(site.uses for site in chosen)

    def lora_pass(gm: CapturedGraphModule) -> None:
        count = lora.insert(gm, model, by_name, prefix)
        if config.fuse_siblings:
            lora_fused.fuse_siblings(gm, prefix)
        if count < expected_uses:
            raise AdaptcError(
                f"the LoRA pass found {count} of the {expected_uses} selected op uses in a newly captured graph "
                f"of {type(model).__name__}; the graph differs between modes or inputs in a way adaptc does not "
                "handle yet. Capture with the inputs and mode you will use."
            )

    return AdapterBuild(config, chosen, {site_key(n): layer for n, layer in layers.items()}, lora_pass)


def _build_prefix(adapted: AdaptedModel, config: Any, prefix: str) -> AdapterBuild:
    from adaptc.passes import prefix as prefix_pass
    from adaptc.passes.attention import canonicalize
    from adaptc.passes.sequence import find_attention_sites
    from adaptc.passes.sites import site_key

    model = adapted.base_model
    for graph in adapted._all_graphs():  # unfused attention (matmul, softmax, matmul) becomes one op
        graph.transform_graphs(canonicalize, remember=False)
    sites = find_attention_sites(adapted.graph_module)
    if not sites:
        raise TargetError(
            f"{type(model).__name__} has no attention op (scaled_dot_product_attention) for prefix tuning to "
            "extend; use method='lora', which adapts its linear and conv layers"
        )
    hidden = sites[0].heads * sites[0].head_dim
    layers, encoder = prefix_pass.build_layers(sites, config, hidden)
    targets = {site.name: f"{prefix}.{site_key(site.name)}" for site in sites}

    def graph_pass(gm: CapturedGraphModule) -> None:
        count = prefix_pass.insert(gm, targets)
        if count < len(targets):
            raise AdaptcError(
                f"the prefix pass found {count} of the {len(targets)} attention ops in a newly captured graph of "
                f"{type(model).__name__}; capture with the inputs and mode you will use"
            )

    by_key = {site_key(n): layer for n, layer in layers.items()}
    if encoder is not None:
        by_key["prefix_encoder"] = encoder
    edit = prefix_pass.PositionShift(config.num_virtual_tokens) if config.shift_positions else None
    return AdapterBuild(config, sites, by_key, graph_pass, edit)


def _build_prompt(adapted: AdaptedModel, config: Any) -> AdapterBuild:
    from adaptc.passes.prompt import PromptAdapter, SequenceEdit
    from adaptc.passes.sequence import find_sequence_entry

    model = adapted.base_model
    modes = {m: m.training for m in adapted.modules()}
    adapted.eval()  # the matcher compares the graph's values with an eager run: no dropout
    try:
        entry = find_sequence_entry(adapted.graph_module, model, adapted.example_inputs, config.method)
    finally:
        for module, mode in modes.items():
            module.training = mode
    adapter = PromptAdapter(config, entry)
    adapter.init_from(config, model)
    edit = SequenceEdit(adapter)
    _check_output_shapes(model, edit, adapted.example_inputs, config)
    return AdapterBuild(config, [entry], {"prompt": adapter}, None, edit)


def _check_output_shapes(model: nn.Module, edit: Any, inputs: Any, config: Any) -> None:
    """With the virtual tokens in, every output must keep the base model's shape.

    The virtual positions are dropped from outputs by shape (a [batch, sequence, ...] tensor); an
    output that is not a sequence but whose second dimension happens to equal the longer sequence
    (10 classes, 6 tokens + 4 virtual) would lose columns. Caught here, on the example inputs.
    """
    import torch
    from torch.utils import _pytree as pytree

    def shapes(out: Any) -> list[tuple[int, ...]]:
        out = out.to_tuple() if hasattr(out, "to_tuple") else out
        return [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            base = shapes(model(*inputs.args, **inputs.kwargs))
            try:
                with edit.applied(model):
                    got = shapes(model(*inputs.args, **inputs.kwargs))
            except (RuntimeError, ValueError, IndexError) as exc:
                raise TargetError(
                    f"{type(model).__name__} fails with {config.num_virtual_tokens} virtual tokens added at "
                    f"{edit.adapter.entry.module!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); a model "
                    "that fixes its sequence length (an image grid in hierarchical vision models, position "
                    "embeddings of one length as in Whisper's encoder) cannot take extra tokens. Use "
                    "method='prefix' or 'lora'"
                ) from None
    finally:
        for module, mode in modes.items():
            module.training = mode
    for index, (want, have) in enumerate(zip(base, got)):
        if want != have:
            raise TargetError(
                f"with {config.num_virtual_tokens} virtual tokens, output {index} of {type(model).__name__} would have "
                f"shape {list(have)} instead of {list(want)}: its second dimension equals the sequence length with the "
                f"virtual tokens, so adaptc cannot tell it from a sequence; choose another num_virtual_tokens"
            )


def inspect_sites(model: nn.Module, example_inputs: Any) -> list:
    """Every site a method could adapt (capture only; the model is not changed)."""
    from adaptc.passes.sites import find_sites

    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    graph = capture(model, inputs)
    return find_sites(graph, model)
