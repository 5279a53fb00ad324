"""LN tuning (PEFT's ``LN_TUNING``): the norms' affine parameters trained; the method's registry entry.

Checkpoints are PEFT's: ``base_model.model.<norm>.ln_tuning_layers.weight`` / ``.bias`` (the trained
values, not differences), ``peft_type: "LN_TUNING"``, the norms by exact name in ``target_modules``.
Merging writes the trained values into the norms, as PEFT's merge does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from adaptc.errors import AdaptcError, CheckpointError, ConfigError, TargetError
from adaptc.passes import ln_tuning
from adaptc.passes.manager import GraphPass
from adaptc.passes.selection import compile_selector, select
from adaptc.passes.sites import site_key
from adaptc.tables import few, number, table

from .base import AdapterBuild, Method, adapter_prefix
from .ia3_config import config_from_options, exact_regex, model_type

# PEFT's defaults by transformers model type (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING,
# 0.21.2), norms only; other models default to every norm adaptc finds.
LN_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "gemma3_text": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}
_KEY_PREFIX, _KEY_PART = "base_model.model.", ".ln_tuning_layers."


@dataclasses.dataclass
class LNTuningConfig:
    """LN tuning: ``targets`` (PEFT's ``target_modules``) picks norms by module name (PEFT's rules); the
    default is PEFT's choice for the transformers model type, else every norm with a learned weight."""

    targets: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None

    method = "ln_tuning"

    @classmethod
    def from_options(cls, **options: Any) -> LNTuningConfig:
        if isinstance(options.get("target_modules"), (set, frozenset)):
            options["target_modules"] = sorted(options["target_modules"])
        return config_from_options(cls, {"target_modules": "targets", "exclude_modules": "exclude"}, options)

    def validate(self) -> None:
        self.targets = compile_selector(self.targets, "targets")
        self.exclude = compile_selector(self.exclude, "exclude")
        if self.targets in ("all-linear",):
            raise ConfigError(
                "targets='all-linear' selects linear ops; LN tuning adapts norms (leave targets unset "
                "for every norm, or name them)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "targets": self.targets, "exclude": self.exclude}


class LNTuningPass(GraphPass):
    name = "ln-tuning"

    def __init__(self, layers: dict, prefix: str) -> None:
        self.layers, self.prefix = layers, prefix

    def run(self, gm: torch.fx.GraphModule) -> bool:
        return ln_tuning.insert(gm, self.layers, self.prefix) > 0


def norm_sites(am: Any) -> tuple[list, dict[str, ln_tuning.Norm]]:
    norms = ln_tuning.find_norms(am.graph_module, am.base_model)
    return [ln_tuning.norm_site(n, am.base_model) for n in norms], {n.name: n for n in norms}


def choose_norms(am: Any, config: LNTuningConfig) -> tuple[list, dict[str, ln_tuning.Norm]]:
    sites, norms = norm_sites(am)
    if not sites:
        raise TargetError(
            f"LN tuning found no norm with a learned weight in {type(am.base_model).__name__} (it looks for layer_norm, "
            "rms_norm and group_norm ops on parameters, and RMSNorm written as weight * x * rsqrt(mean(x**2) + eps))"
        )
    targets = config.targets
    if targets is None:
        targets = LN_TARGETS.get(model_type(am.base_model) or "", "all")
    chosen = select(sites, targets, config.exclude)
    return chosen, norms


class LNTuningMethod(Method):
    name = "ln_tuning"
    config_class = LNTuningConfig
    peft_types = ("LN_TUNING",)
    merge = "weights"
    site_table = False  # `adaptc inspect --method ln_tuning` lists the norms instead of LoRA's sites

    def inspect(self, graph: Any, model: torch.nn.Module, inputs: Any, config: LNTuningConfig) -> list[str]:
        norms = ln_tuning.find_norms(graph, model)
        if not norms:
            return ["no norm with a learned weight found: LN tuning has nothing to adapt in this model"]
        sites = [ln_tuning.norm_site(n, model) for n in norms]
        targets = config.targets if config.targets is not None else LN_TARGETS.get(model_type(model) or "", "all")
        try:  # the config's targets and exclude (--opt), as inject selects them
            chosen = {s.name for s in select(sites, targets, config.exclude)}
        except TargetError as exc:
            return [f"{len(sites)} norms; {exc}"]
        rows = [
            [s.name, s.op, s.shapes(), "yes" if s.name in chosen else "", number(s.params_added)]
            for s in sites
        ]
        which = "the targets" if config.targets is not None else "the default targets"
        return [
            table(["norm", "op", "weight", "chosen", "params"], rows, right=(4,)),
            f"{len(sites)} norms; {which} ({targets!r}) train {len(chosen)}",
        ]

    def build(self, am: Any, adapter_name: str, config: LNTuningConfig) -> AdapterBuild:
        sites, norms = choose_norms(am, config)
        layers = {s.name: ln_tuning.LNTuningLayer(am.base_model, norms[s.name]) for s in sites}
        graph_pass = LNTuningPass(layers, adapter_prefix(adapter_name))
        return AdapterBuild(config, sites, {site_key(n): layer for n, layer in layers.items()}, graph_pass)

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        rows = [[s.name, s.op, s.shapes(), number(s.params_added)] for s in sites]
        return [
            f"ln_tuning: targets={config.targets!r}"
            + (f" exclude={config.exclude!r}" if config.exclude else ""),
            f"{len(sites)} norm{'s' if len(sites) != 1 else ''} matched",
            table(["norm", "op", "weight", "params added"], rows, right=(3,)),
        ]

    # -- checkpoints: PEFT's format ------------------------------------------------------------------

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = am.adapters[adapter_name]
        tensors = {}
        sites = am.adapter_sites(adapter_name)
        for site in sites:
            for part, param in layers[site_key(site.name)].named_parameters():
                tensors[f"{_KEY_PREFIX}{site.name}{_KEY_PART}{part}"] = (
                    param.detach().cpu().contiguous().clone()
                )
        fields = {
            "peft_type": "LN_TUNING",
            "task_type": None,
            "inference_mode": True,
            "modules_to_save": None,
            "target_modules": exact_regex([s.name for s in sites]),
            "exclude_modules": None,
        }
        return fields, tensors

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        config, values = plan_load(am, checkpoint)
        am.add_adapter(adapter_name, config)
        layers = am.adapters[adapter_name]
        with torch.no_grad():
            for (name, part), tensor in values.items():
                target = getattr(layers[site_key(name)], part)
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def plan_load(am: Any, ckpt: Any) -> tuple[LNTuningConfig, dict[tuple[str, str], torch.Tensor]]:
    """Check an LN tuning checkpoint against ``am``'s norms (reads only): the config and the values by (norm, part)."""
    values: dict[tuple[str, str], torch.Tensor] = {}
    bad = []
    for key, tensor in ckpt.tensors.items():
        head, sep, part = key.rpartition(_KEY_PART)
        if not sep or not head.startswith(_KEY_PREFIX) or part not in ("weight", "bias"):
            bad.append(key)
        else:
            values[(head[len(_KEY_PREFIX) :], part)] = tensor
    if bad or not values:
        raise CheckpointError(
            f"{ckpt.weights_path}: {few(bad) if bad else 'no tensors'}; an LN tuning adapter holds "
            "base_model.model.<norm>.ln_tuning_layers.weight / .bias only"
        )
    sites, norms = norm_sites(am)
    names = sorted({name for name, _ in values})
    unknown = [n for n in names if n not in norms]
    if unknown:
        raise CheckpointError(
            f"{ckpt.weights_path}: {few(unknown)} are not norms of this {type(am.base_model).__name__} "
            f"(its norms: {few([s.name for s in sites])}); is the adapter for another model?"
        )
    for name in names:
        norm = norms[name]
        expected = {"weight": am.base_model.get_parameter(norm.weight).shape}
        if norm.bias:
            expected["bias"] = am.base_model.get_parameter(norm.bias).shape
        got = {part for n, part in values if n == name}
        if got != set(expected):
            raise CheckpointError(
                f"{ckpt.weights_path}: {name} has {sorted(got)}, its norm has {sorted(expected)}"
            )
        for part, shape in expected.items():
            if tuple(values[(name, part)].shape) != tuple(shape):
                raise CheckpointError(
                    f"{ckpt.weights_path}: {name}.{part} has shape {list(values[(name, part)].shape)}, the norm's is "
                    f"{list(shape)}"
                )
    config = _stated_config(am, ckpt, set(names)) or LNTuningConfig.from_options(targets=names)
    return config, values


def _stated_config(am: Any, ckpt: Any, names: set[str]) -> LNTuningConfig | None:
    own = (ckpt.config.get("adaptc") or {}).get("config")
    if not isinstance(own, dict):
        return None
    try:
        config = LNTuningConfig.from_options(**{k: v for k, v in own.items() if k != "method"})
        chosen, _ = choose_norms(am, config)
    except AdaptcError:
        return None
    return config if {s.name for s in chosen} == names else None
