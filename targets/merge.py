"""Merge: fold LoRA adapters into the base model's weights.

For every weight the active adapters touch, the adapters' updates are applied in the order
the graph applies them (the adapter added last sits next to the op), so the merged op
computes what the adapted graph computed:

- LoRA / rsLoRA: ``W <- W + scale * B A`` (``delta_weight()``, shaped like the stored weight:
  ``[in, out]`` for Conv1D, grouped for convolutions, ``[vocab, dim]`` for embeddings);
- LoRA on mixture-of-experts weights: ``W[e] <- W[e] + scale * B_e A_e`` for every expert of the 3-D
  weight (``ExpertLoraLayer.delta_weight()``, passes/experts.py), the update the graph adds where it reads W;
- DoRA: ``W <- m / ||W0 + dW|| * (W + dW)`` per output channel, the norm taken of the stored
  weight ``W0`` plus this adapter's update, exactly as the adapter's forward does;
- a layer that also changes the op's bias declares ``bias_name`` and ``merge_bias_into(bias)`` (IA3's
  output scale ``b <- s * b``; LN tuning writes its trained weight and bias).

A weight that is shared (GPT-2's ``wte`` is ``lm_head``'s weight) is refused: folding an
embedding update into it would change the head too.

Prompt methods have no weight to fold into: their virtual tokens (P-tuning: the encoder's
output, evaluated once) and prefixes become constant buffers of the AdaptedModel, which then
has no trainable parameter and keeps running its captured graph.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from adaptc.passes.quantize import dequantize_model, owner_of
from adaptc.passes.sites import site_key
from torch import nn

from adaptc.errors import MergeError
from adaptc.methods import get_method


@dataclass
class WeightMerge:
    """One base weight and the adapter layers folded into it, innermost first."""

    weight_name: str
    weight: nn.Parameter
    layers: list = field(default_factory=list)  # LoraLayer, in graph order from the op outwards
    sites: list[str] = field(default_factory=list)  # "adapter:site" for messages
    quantized: nn.Module | None = None  # the QuantLinear holding ``weight`` packed (passes/quantize.py)
    # The op's bias, for layers that change it too (``merge_bias_into``: IA3's output scale, LN tuning).
    bias_name: str | None = None


def _owners(model: nn.Module, param: nn.Parameter) -> list[str]:
    """Paths of the distinct modules that hold ``param`` directly (more than one: tied weights)."""
    seen, paths = set(), []
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen:
            continue
        if any(p is param for p in module._parameters.values()):
            seen.add(id(module))
            paths.append(path or "<root>")
    return paths


def _site_users(am, param: nn.Parameter) -> set[str]:
    """Names of every site (adapted or not) whose op reads ``param``."""
    model = am.base_model
    sites = list(am.all_sites) + [s for name in lora_adapters(am) for s in am.adapter_sites(name)]
    return {s.name for s in sites if model.get_parameter(s.weight) is param}


def lora_adapters(am, names: list[str] | None = None) -> list[str]:
    """The adapters among ``names`` (default: all) whose method folds into weights (LoRA), in the model's order."""
    return _merging(am, "weights", names)


def constant_adapters(am, names: list[str] | None = None) -> list[str]:
    """The adapters among ``names`` (default: all) whose method merges into constants (the prompt methods)."""
    return _merging(am, "constants", names)


def _merging(am, kind: str, names: list[str] | None) -> list[str]:
    configs = am.adapter_configs()
    return [n for n in am.adapters if (names is None or n in names) and get_method(configs[n]).merge == kind]


def plan(am, names: list[str]) -> list[WeightMerge]:
    """What merging adapters ``names`` would write, checked before anything changes."""
    names = lora_adapters(am, names)
    model = am.base_model
    by_weight: dict[int, WeightMerge] = {}
    # The adapter added last wraps the op first (see passes/lora.insert), so it folds first.
    order = [n for n in reversed(list(am.adapters)) if n in names]
    for name in order:
        for site in am.adapter_sites(name):
            layer = am.adapters[name][site_key(site.name)]
            param = model.get_parameter(site.weight)
            entry = by_weight.get(id(param))
            if entry is None:
                entry = by_weight[id(param)] = WeightMerge(site.weight, param, quantized=owner_of(model, site.weight))
            entry.layers.append(layer)
            entry.sites.append(f"{name}:{site.name}")
            _plan_bias(entry, layer)
    for entry in by_weight.values():
        _check_mergeable(am, entry)
    return list(by_weight.values())


def _plan_bias(entry: WeightMerge, layer) -> None:
    """Record the bias a layer's merge changes; one that is not a parameter of the model cannot be merged."""
    if not hasattr(layer, "merge_bias_into") or getattr(layer, "bias_name", None) is None:
        return
    if layer.bias_name == "<unknown>" or entry.quantized is not None:
        raise MergeError(
            f"cannot merge the adapter at {entry.sites[-1]}: its op adds a bias that is not a parameter of the site's "
            "module, and the merged update must change it; keep the adapter unmerged (export_onnx merges a copy)"
        )
    entry.bias_name = layer.bias_name


@torch.no_grad()
def merged_bias(model: nn.Module, entry: WeightMerge) -> torch.Tensor | None:
    """The bias with every layer of ``entry`` that changes it folded in (None when none does)."""
    if entry.bias_name is None:
        return None
    stored = model.get_parameter(entry.bias_name).detach()
    current = stored.to(torch.promote_types(stored.dtype, torch.float32))
    for layer in entry.layers:
        if getattr(layer, "bias_name", None) is not None:
            current = layer.merge_bias_into(current)
    return current.to(stored.dtype)


def _check_mergeable(am, entry: WeightMerge) -> None:
    site = entry.sites[0].split(":", 1)[1]
    if not entry.weight.is_floating_point() and entry.quantized is None:
        raise MergeError(f"cannot merge into {entry.weight_name} ({entry.weight.dtype}): merge needs a floating-point weight")
    owners = _owners(am.base_model, entry.weight)
    users = _site_users(am, entry.weight)
    if len(owners) > 1 or len(users) > 1:
        shared = sorted(set(owners) | users)
        raise MergeError(
            f"cannot merge the adapter at {site}: its weight {entry.weight_name} is shared by {', '.join(shared)} "
            "(tied weights), so folding the update into it would change the other users too. Untie the weights "
            "before injecting (for transformers, config.tie_word_embeddings=False), leave this site out of the "
            "adapter's targets, or keep the adapter unmerged (export_onnx(..., merge=False))."
        )


@torch.no_grad()
def merged_weight(entry: WeightMerge) -> torch.Tensor:
    """The weight with every adapter of ``entry`` folded in, in the weight's dtype (fp32 for a quantized one)."""
    stored = entry.weight.detach() if entry.quantized is None else entry.quantized.dequantize(torch.float32)
    compute = torch.promote_types(stored.dtype, torch.float32)
    current = stored.to(compute)
    for layer in entry.layers:
        current = layer.merge_into(current, stored)  # each method's layer folds its own update
    return current.to(stored.dtype)


def _check_finite(model: nn.Module, entries: list[WeightMerge]) -> None:
    bad = []
    for entry in entries:
        bias = merged_bias(model, entry)
        if not torch.isfinite(merged_weight(entry)).all() or (bias is not None and not torch.isfinite(bias).all()):
            bad.append(f"{entry.weight_name} (from {', '.join(entry.sites)})")
    if bad:
        raise MergeError(
            f"merging would write NaN or inf into {'; '.join(bad)}; nothing was changed. "
            "The adapter weights are probably diverged: check them (and the DoRA magnitudes) before merging."
        )


def merge(am, safe: bool = False, requantize: bool = False) -> nn.Module:
    """Fold the active adapters into the base weights in place, remove them, return the base model.

    A quantized weight (QLoRA) is dequantized and merged; its layer becomes an fp ``nn.Linear``
    or, with ``requantize``, stays quantized in its format with the merged weight.

    Like PEFT's ``merge_and_unload``: the merged adapters leave ``am`` (so nothing is applied
    twice); inactive adapters stay. ``safe=True`` computes every merged weight first and
    refuses, changing nothing, if any holds NaN or inf.
    """
    for flag, value in (("safe", safe), ("requantize", requantize)):
        if not isinstance(value, bool):
            raise MergeError(f"{flag} must be True or False, got {value!r}; nothing was merged")
    active = [n for n in am.active_adapters if n in am.adapters]
    switched_off = [n for n in active if n not in am.enabled_adapters]
    if switched_off:
        raise MergeError(
            f"am.merge() inside am.disable_adapters(): adapter {switched_off[0]!r} is switched off, so merging it "
            "would not give the model this block computes; call merge() outside the block (or deactivate the "
            "adapters you do not want merged with set_adapter); nothing was merged"
        )
    names = lora_adapters(am, active)
    prompts = constant_adapters(am, active)
    unmergeable = [n for n in active if n not in names and n not in prompts]
    if unmergeable:
        method = get_method(am.adapter_configs()[unmergeable[0]]).name
        raise MergeError(
            f"adapter {unmergeable[0]!r} ({method}) cannot be merged: its method has no merged form. Keep it "
            "unmerged, or deactivate it (set_adapter) before merging the others; nothing was merged"
        )
    entries = plan(am, names)  # raises before any weight is written
    if safe:
        _check_finite(am.base_model, entries)  # computed twice rather than holding a copy of every weight
        _check_prompts_finite(am, prompts)
    with torch.no_grad():
        for entry in entries:
            if entry.quantized is not None:
                _write_quantized(am.base_model, entry, merged_weight(entry), requantize)
            else:
                bias = merged_bias(am.base_model, entry)
                entry.weight.copy_(merged_weight(entry))
                if bias is not None:
                    am.base_model.get_parameter(entry.bias_name).copy_(bias)
    for name in names:
        am.delete_adapter(name)
    if not prompts:
        return am.base_model
    for name in prompts:
        fold_prompt_adapter(am, name)
    return am


def _check_prompts_finite(am, names: list[str]) -> None:
    for name in names:
        for pname, param in am.adapters[name].named_parameters():
            if not torch.isfinite(param).all():
                raise MergeError(f"adapter {name!r} holds NaN or inf in {pname}; nothing was changed")


def fold_prompt_adapter(am, name: str) -> None:
    """Turn a prompt-method adapter into constants: nothing of it trains any more."""
    get_method(am.adapter_configs()[name]).fold(am, name)
    am._forget_graphs(name)  # graphs that traced the prompt's computation are captured again


@contextlib.contextmanager
def merged_weights(am) -> Iterator[list[WeightMerge]]:
    """Within the block the base model holds the enabled adapters merged and every adapter is off.

    Enabled: active and not switched off by ``am.disable_adapters()`` (inside it, a merged export is the
    model the block computes: the base model when every adapter is off). The user's objects come back exactly (the original tensors are put back, not un-merged
    by subtraction), so export can lower a merged model without consuming the AdaptedModel.
    """
    names = lora_adapters(am, am.enabled_adapters)
    entries = plan(am, names)
    originals = [entry.weight.data for entry in entries]
    if any(entry.quantized is not None for entry in entries):
        raise MergeError("merged_weights() cannot swap quantized weights in place; use merged_copy(am) (export does)")
    biases = [(am.base_model.get_parameter(e.bias_name), merged_bias(am.base_model, e)) for e in entries if e.bias_name]
    bias_originals = [param.data for param, _ in biases]
    try:
        for param, value in biases:  # computed from the original weights and biases, before any swap
            param.data = value
        for entry in entries:
            entry.weight.data = merged_weight(entry)
        with am.disable_adapters(lora_adapters(am)):  # prompt methods stay on: the graph carries them
            yield entries
    finally:
        for entry, original in zip(entries, originals):
            entry.weight.data = original
        for (param, _), original in zip(biases, bias_originals):
            param.data = original


def _write_quantized(model: nn.Module, entry: WeightMerge, weight: torch.Tensor, requantize: bool) -> None:
    module = entry.quantized
    if requantize:
        module.load_weight_(weight)
        return
    owner = entry.weight_name.rpartition(".")[0]
    parent_name, _, attr = owner.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module.to_linear(weight))


@torch.no_grad()
def merged_copy(am) -> nn.Module:
    """A full-precision copy of the base model with the enabled adapters merged (active, and not switched
    off by ``am.disable_adapters()``); ``am`` is untouched.

    Every quantized layer of the copy becomes an ``nn.Linear`` (dequantized, plus the adapters'
    update where they apply): what ONNX export lowers for a QLoRA model.
    """
    entries = plan(am, [n for n in am.enabled_adapters if n in am.adapters])
    clone = copy.deepcopy(am.base_model)
    for entry in entries:
        weight = merged_weight(entry)
        bias = merged_bias(am.base_model, entry)
        if bias is not None:
            clone.get_parameter(entry.bias_name).copy_(bias)
        if entry.quantized is not None:
            module = clone.get_submodule(entry.weight_name.rpartition(".")[0])
            _write_quantized(clone, WeightMerge(entry.weight_name, module.weight, quantized=module), weight, False)
        else:
            clone.get_parameter(entry.weight_name).copy_(weight)
    dequantize_model(clone)
    return clone
