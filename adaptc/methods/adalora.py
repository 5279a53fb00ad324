"""AdaLoRA: SVD-form LoRA whose rank budget is reallocated during training (the method's registry entry).

The layers and the rank allocator are in adaptc/passes/adalora.py. Training needs two things a plain
loop does not do, which this method supplies through :meth:`AdaLoraMethod.train_hook` (adaptc.train and
adaptc.hf's AdapterTrainer call it): the orthogonality penalty ``orth_reg_weight * mean ||P P^T - I||``
added to the loss, and the allocator's step after every optimizer step. Checkpoints are PEFT's:
``peft_type: "ADALORA"``, keys ``base_model.model.<module>.lora_{A,B,E}`` with the pruned ranks, and
``rank_pattern`` keyed ``<module>.lora_E`` (a list of init_r booleans per site).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adaptc.errors import CheckpointError, ConfigError, TargetError
from adaptc.passes.adalora import AdaLoraLayer, RankAllocator, adalora_shapes, orthogonal_regularization
from adaptc.passes.manager import GraphPass
from adaptc.passes.selection import compile_selector, select
from adaptc.passes.sites import site_key
from adaptc.passes.wrap import route_weight_uses
from adaptc.peft_format import PREFIX, exact_pattern
from adaptc.tables import few
from adaptc.warn import warn_user

from .base import AdapterBuild, Method, adapter_prefix

_ALIASES = {
    "target_modules": "targets", "exclude_modules": "exclude", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "layers_to_transform": "layers",
}
_PARAMS = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoraConfig:
    """AdaLoRA's options, PEFT's names (PEFT's spellings of the LoRA fields are accepted too).

    ``total_step`` (the number of optimizer steps of the run) is required, as in PEFT: the budget
    schedule is defined over it. ``rank_pattern`` is written by training (site name -> init_r booleans,
    the triplets kept); given, the layers are built with those ranks (a pruned checkpoint).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str | Sequence[str] | None = "all-linear"
    exclude: str | Sequence[str] | None = None
    layers: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    method = "adalora"

    @classmethod
    def from_options(cls, **options: Any) -> AdaLoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = _ALIASES.get(key, key)
            if name == "r":
                raise ConfigError("AdaLoRA has no r (PEFT ignores it): its ranks are init_r (each site's starting "
                                  "rank) and target_r (the average it is pruned to)")
            if name not in known:
                raise ConfigError(f"unknown AdaLoRA option {key!r}; known options: {', '.join(sorted(known | set(_ALIASES)))}")
            if name in kwargs:
                raise ConfigError(f"AdaLoRA option {name!r} given twice (as {key!r} and another spelling)")
            kwargs[name] = value
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            _check_int(getattr(self, name), name, minimum=1)
        for name in ("tinit", "tfinal"):
            _check_int(getattr(self, name), name, minimum=0)
        if self.total_step is None:
            raise ConfigError("AdaLoRA needs total_step, the number of optimizer steps the budget schedule spans "
                              "(as PEFT does): pass total_step=<your run's steps>")
        _check_int(self.total_step, "total_step", minimum=1)
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} is above init_r={self.init_r}: AdaLoRA only lowers ranks")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no budgeting phase "
                "(needs tinit < total_step - tfinal): lower tinit / tfinal or raise total_step"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _number(value) or not 0 < value < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
        if not _number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not _number(self.alpha) or self.alpha < 0 or math.isinf(self.alpha):
            raise ConfigError(f"alpha (lora_alpha) must be a number >= 0 (0: scale by the rank), got {self.alpha!r}")
        if not _number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is None:
            raise ConfigError("targets is None; give a regular expression, a list of module names or 'all-linear'")
        compile_selector(self.targets, "targets")
        compile_selector(self.exclude, "exclude")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict) or not all(
                isinstance(v, (list, tuple)) and all(isinstance(b, bool) for b in v) for v in self.rank_pattern.values()
            ):
                raise ConfigError("rank_pattern must map site names to lists of booleans (the triplets kept)")
            bad = [k for k, v in self.rank_pattern.items() if len(v) != self.init_r]
            if bad:
                raise ConfigError(f"rank_pattern entries must have init_r={self.init_r} booleans; {few(bad)} do not")

    def rank_for(self, site_name: str) -> int:
        kept = (self.rank_pattern or {}).get(site_name)
        return self.init_r if kept is None else sum(kept)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_int(value: Any, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")


class AdaLoraPass(GraphPass):
    name = "adalora"

    def __init__(self, model: torch.nn.Module, layers: dict, prefix: str) -> None:
        self.model, self.layers, self.prefix = model, layers, prefix

    def run(self, gm: torch.fx.GraphModule) -> bool:
        return route_weight_uses(gm, self.model, self.layers, self.prefix) > 0


class AdaLoraTraining:
    """What training an AdaLoRA adapter adds to the loop (see adaptc.train's method hooks)."""

    def __init__(self, layers: dict[str, AdaLoraLayer], config: AdaLoraConfig, total_steps: int) -> None:
        self.layers, self.config = layers, config
        self.allocator = RankAllocator(layers, config)
        if total_steps != config.total_step:
            warn_user(f"AdaLoRA's total_step is {config.total_step} but this run has {total_steps} optimizer steps; "
                      "the rank budget follows total_step (as in PEFT)")

    def loss(self) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        penalty = orthogonal_regularization(list(self.layers.values()))
        return None if penalty is None else self.config.orth_reg_weight * penalty

    def before_step(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        self.allocator.step(step)


class AdaLoraMethod(Method):
    name = "adalora"
    config_class = AdaLoraConfig
    peft_types = ("ADALORA",)
    merge = "weights"

    def build(self, am: Any, adapter_name: str, config: AdaLoraConfig) -> AdapterBuild:
        chosen = select(am.all_sites, config.targets, config.exclude, config.layers, config.layers_pattern)
        unfit = [s for s in chosen if s.kind == "embedding" or (s.kind == "conv" and s.conv["groups"] != 1)]
        if unfit:
            raise TargetError(
                f"AdaLoRA adapts linear and ungrouped convolution weights (as PEFT's); the targets also select "
                f"{few([f'{s.name} ({s.kind})' for s in unfit])}: narrow targets / exclude them"
            )
        chosen = [dataclasses.replace(site) for site in chosen]
        params = dict(am.base_model.named_parameters(remove_duplicate=False))
        layers = {}
        for site in chosen:
            layer = AdaLoraLayer(site, config.rank_for(site.name), config.alpha, config.dropout, ranknum=config.init_r)
            weight = params[site.weight]
            layer.to(dtype=weight.dtype if weight.is_floating_point() else torch.float32, device=weight.device)
            layer.initialize()
            site.params_added = sum(p.numel() for p in layer.parameters())
            layers[site.name] = layer
        graph_pass = AdaLoraPass(am.base_model, layers, adapter_prefix(adapter_name))
        return AdapterBuild(config, chosen, {site_key(n): m for n, m in layers.items()}, graph_pass)

    def train_hook(self, am: Any, adapter_name: str, total_steps: int) -> AdaLoraTraining:
        """The loss term and per-step allocation training adds (adaptc.train / adaptc.hf call this)."""
        config = am.adapter_configs()[adapter_name]
        layers = {s.name: am.adapters[adapter_name][site_key(s.name)] for s in am.adapter_sites(adapter_name)}
        return AdaLoraTraining(layers, config, total_steps)

    # -- checkpoints: PEFT's format ----------------------------------------------------------------

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config: AdaLoraConfig = am.adapter_configs()[adapter_name]
        sites = am.adapter_sites(adapter_name)
        tensors, pattern = {}, {}
        for site in sites:
            layer = am.adapters[adapter_name][site_key(site.name)]
            own = {p: getattr(layer, p).detach().cpu() for p in _PARAMS}
            kept = (config.rank_pattern or {}).get(site.name)
            if kept is not None:
                pattern[f"{site.name}.lora_E"] = list(kept)
                if len(kept) == layer.r and sum(kept) != layer.r:  # masked in training, not yet dropped
                    index = torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long)
                    own = {"lora_A": own["lora_A"][index], "lora_E": own["lora_E"][index],
                           "lora_B": own["lora_B"][:, index]}
            for param, tensor in own.items():
                tensors[f"{PREFIX}{site.name}.{param}"] = tensor.contiguous().clone()
        fields = {
            "peft_type": "ADALORA", "task_type": None, "inference_mode": True,
            "init_r": config.init_r, "target_r": config.target_r, "tinit": config.tinit, "tfinal": config.tfinal,
            "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
            "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step,
            "rank_pattern": pattern or None, "r": 8, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": [s.name for s in sites], "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "fan_in_fan_out": any(s.fan_in_fan_out for s in sites), "bias": "none",
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        }
        return fields, tensors

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        config, tensors = _plan_load(am, checkpoint)
        am.add_adapter(adapter_name, config)
        layers = am.adapters[adapter_name]
        with torch.no_grad():
            for (site, param), tensor in tensors.items():
                target = getattr(layers[site_key(site)], param)
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        head = (f"adalora: init_r={config.init_r} target_r={config.target_r} total_step={config.total_step} "
                f"tinit={config.tinit} tfinal={config.tfinal} deltaT={config.deltaT} alpha={config.alpha:g} "
                f"orth_reg_weight={config.orth_reg_weight:g} targets={config.targets!r}")
        return [head, f"{len(sites)} site{'s' if len(sites) != 1 else ''} matched"]


def _plan_load(am: Any, ckpt: Any) -> tuple[AdaLoraConfig, dict[tuple[str, str], torch.Tensor]]:
    """Check a PEFT (or adaptc) AdaLoRA checkpoint against ``am``'s sites; returns the config and tensors."""
    raw = ckpt.config
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise CheckpointError(f"{ckpt.config_path}: bias / modules_to_save train base-model parameters too; adaptc "
                              "loads AdaLoRA matrices only")
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in ckpt.tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B|lora_E)", key)
        if match is None:
            raise CheckpointError(f"{ckpt.weights_path}: {key!r} is not an AdaLoRA parameter "
                                  "(base_model.model.<module>.lora_A / lora_B / lora_E)")
        by_site.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not by_site:
        raise CheckpointError(f"{ckpt.weights_path} holds no tensors")
    names = {s.name: s for s in am.all_sites}
    unknown = [n for n in by_site if n not in names]
    if unknown:
        raise CheckpointError(f"{ckpt.weights_path}: {few(unknown)} are not sites of this "
                              f"{type(am.base_model).__name__}; is the adapter for another model? `adaptc inspect` lists the sites")
    pattern = {}
    for key, kept in (raw.get("rank_pattern") or {}).items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        pattern[name.removesuffix(".lora_E")] = [bool(k) for k in kept]
    try:
        config = AdaLoraConfig.from_options(
            init_r=raw.get("init_r", 12), target_r=raw.get("target_r", 8), tinit=raw.get("tinit", 0),
            tfinal=raw.get("tfinal", 0), deltaT=raw.get("deltaT", 1), beta1=raw.get("beta1", 0.85),
            beta2=raw.get("beta2", 0.85), orth_reg_weight=raw.get("orth_reg_weight", 0.5),
            total_step=raw.get("total_step"), rank_pattern={k: v for k, v in pattern.items() if k in by_site} or None,
            alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
            targets="|".join(exact_pattern(n) for n in by_site),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt.config_path}: {exc}") from None
    tensors = {}
    for name, params in by_site.items():
        site = names[name]
        if site.kind == "embedding" or (site.kind == "conv" and site.conv["groups"] != 1):
            raise CheckpointError(f"{ckpt.weights_path}: {name} is a {site.kind} site; AdaLoRA adapts linear and "
                                  "ungrouped convolution weights")
        expected = adalora_shapes(site, config.rank_for(name))
        for param, shape in expected.items():
            if param not in params:
                raise CheckpointError(f"{ckpt.weights_path}: {PREFIX}{name}.{param} is missing")
            if tuple(params[param].shape) != shape:
                raise CheckpointError(
                    f"{ckpt.weights_path}: {PREFIX}{name}.{param} has shape {list(params[param].shape)}, but {name} "
                    f"({site.kind}, weight {site.shapes()}) with rank {config.rank_for(name)} needs {list(shape)}"
                )
            tensors[(name, param)] = params[param]
    return config, tensors
