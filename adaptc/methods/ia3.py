"""IA3 (PEFT's ``IA3``): learned scales of keys, values and feed-forward inputs; the method's registry entry.

Checkpoints are PEFT's: ``base_model.model.<module>.ia3_l`` in PEFT's shapes, ``peft_type: "IA3"``,
the adapted modules by exact name in ``target_modules`` / ``feedforward_modules``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from adaptc.errors import AdaptcError, CheckpointError, TargetError
from adaptc.passes import ia3
from adaptc.passes.manager import GraphPass
from adaptc.passes.selection import select
from adaptc.passes.sites import find_sites, site_key
from adaptc.tables import few, in_out, number, table

from .base import AdapterBuild, Method, adapter_prefix
from .ia3_config import IA3Config, exact_regex, is_feedforward

_PREFIX, _SUFFIX = "base_model.model.", ".ia3_l"


class IA3Pass(GraphPass):
    name = "ia3"

    def __init__(self, model: torch.nn.Module, layers: dict, prefix: str, expected_uses: int) -> None:
        self.model, self.layers, self.prefix, self.expected_uses = model, layers, prefix, expected_uses

    def run(self, gm: torch.fx.GraphModule) -> bool:
        count = ia3.insert(gm, self.model, self.layers, self.prefix)
        if count < self.expected_uses:
            raise AdaptcError(
                f"the IA3 pass found {count} of the {self.expected_uses} selected op uses in a newly captured graph of "
                f"{type(self.model).__name__}; capture with the inputs and mode you will use"
            )
        return count > 0


def choose_sites(am: Any, config: IA3Config) -> tuple[list, set[str]]:
    """The linear / conv sites IA3 adapts and the names of those scaled on their input."""
    targets, feedforward = config.resolved(am.base_model)
    chosen = select(am.all_sites, targets, config.exclude)
    usable = [
        dataclasses.replace(s)
        for s in chosen
        if s.kind in ("linear", "conv") and s.op != "adaptc.quant_linear"
    ]
    if not usable:
        raise TargetError(
            f"IA3 scales linear and convolution ops; targets={targets!r} selected only "
            f"{few([f'{s.name} ({s.kind})' for s in chosen])}"
        )
    return usable, {s.name for s in usable if is_feedforward(feedforward, s.name)}


class IA3Method(Method):
    name = "ia3"
    config_class = IA3Config
    peft_types = ("IA3",)
    merge = "weights"
    site_table = False  # `adaptc inspect --method ia3` shows PEFT's default targets, not LoRA's table

    def inspect(self, graph: Any, model: torch.nn.Module, inputs: Any, config: IA3Config) -> list[str]:
        sites = [s for s in find_sites(graph, model) if s.kind in ("linear", "conv")]
        try:
            targets, feedforward = config.resolved(model)
            chosen = {s.name for s in select(sites, targets)}
        except TargetError as exc:
            return [f"{len(sites)} linear and convolution sites; {exc}"]
        rows = [
            [s.name, s.op, s.shapes(), "input" if is_feedforward(feedforward, s.name) else "output"]
            for s in sites
            if s.name in chosen
        ]
        return [
            table(["site", "op", "weight", "scales"], rows),
            ("targets" if config.targets is not None else "PEFT's default targets")
            + f" {targets!r} (feed-forward {feedforward!r}) select {len(rows)} of the "
            f"{len(sites)} linear and convolution sites; targets= chooses others",
        ]

    def build(self, am: Any, adapter_name: str, config: IA3Config) -> AdapterBuild:
        sites, feedforward = choose_sites(am, config)
        layers = {s.name: ia3.IA3Layer(s, s.name in feedforward) for s in sites}
        if not config.init_ia3_weights:
            with torch.no_grad():
                for layer in layers.values():
                    layer.ia3_l.normal_()
        for site in sites:
            site.params_added = layers[site.name].ia3_l.numel()
        graph_pass = IA3Pass(am.base_model, layers, adapter_prefix(adapter_name), sum(s.uses for s in sites))
        return AdapterBuild(config, sites, {site_key(n): layer for n, layer in layers.items()}, graph_pass)

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        rows = []
        for s in sites:
            layer = am.adapters[adapter_name][site_key(s.name)]
            rows.append(
                [
                    s.name,
                    s.op,
                    s.shapes(),
                    in_out(s),
                    "input" if layer.feedforward else "output",
                    number(s.params_added),
                ]
            )
        return [
            f"ia3: targets={config.targets!r} feedforward_modules={config.feedforward_modules!r}",
            f"{len(sites)} site{'s' if len(sites) != 1 else ''} matched",
            table(["site", "op", "weight", "in->out", "scales", "params added"], rows, right=(5,)),
        ]

    # -- checkpoints: PEFT's format ------------------------------------------------------------------

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = am.adapters[adapter_name]
        sites = am.adapter_sites(adapter_name)
        tensors = {
            f"{_PREFIX}{s.name}{_SUFFIX}": layers[site_key(s.name)].ia3_l.detach().cpu().contiguous().clone()
            for s in sites
        }
        fields = {
            "peft_type": "IA3",
            "task_type": None,
            "inference_mode": True,
            "modules_to_save": None,
            "target_modules": exact_regex([s.name for s in sites]),
            "feedforward_modules": exact_regex(
                [s.name for s in sites if layers[site_key(s.name)].feedforward]
            )
            or [],
            "exclude_modules": None,
            "fan_in_fan_out": any(s.fan_in_fan_out for s in sites),
            "init_ia3_weights": True,
        }
        return fields, tensors

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        config, vectors = plan_load(am, checkpoint)
        am.add_adapter(adapter_name, config)
        layers = am.adapters[adapter_name]
        with torch.no_grad():
            for name, tensor in vectors.items():
                target = layers[site_key(name)].ia3_l
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def plan_load(am: Any, ckpt: Any) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    """Check an IA3 checkpoint against ``am``'s sites (reads only); the config to add and the vectors by site."""
    bad = [k for k in ckpt.tensors if not (k.startswith(_PREFIX) and k.endswith(_SUFFIX))]
    if bad or not ckpt.tensors:
        raise CheckpointError(
            f"{ckpt.weights_path}: {few(bad) if bad else 'no tensors'}; an IA3 adapter holds "
            "base_model.model.<module>.ia3_l vectors only (modules_to_save are not adapter state adaptc loads)"
        )
    vectors = {k[len(_PREFIX) : -len(_SUFFIX)]: t for k, t in ckpt.tensors.items()}
    sites = {s.name: s for s in am.all_sites if s.kind in ("linear", "conv")}
    unknown = [n for n in vectors if n not in sites]
    if unknown:
        raise CheckpointError(
            f"{ckpt.weights_path}: {few(unknown)} are not linear or convolution sites of this "
            f"{type(am.base_model).__name__}; is the adapter for another model? `adaptc inspect` lists the sites"
        )
    feedforward = ckpt.config.get("feedforward_modules") or []
    if isinstance(feedforward, dict):
        raise CheckpointError(f"{ckpt.config_path}: feedforward_modules must be a list or a string")
    ff_names = [n for n in vectors if is_feedforward(feedforward, n)]
    for name, tensor in vectors.items():
        layer = ia3.IA3Layer(sites[name], name in ff_names)
        if tuple(tensor.shape) != tuple(layer.ia3_l.shape):
            raise CheckpointError(
                f"{ckpt.weights_path}: {_PREFIX}{name}{_SUFFIX} has shape {list(tensor.shape)}, but {name} "
                f"(weight {sites[name].shapes()}, {'feed-forward: input' if name in ff_names else 'output'} scale) "
                f"needs {list(layer.ia3_l.shape)}"
            )
    config = _stated_config(am, ckpt, set(vectors), set(ff_names))
    if config is None:
        config = IA3Config.from_options(targets=sorted(vectors), feedforward_modules=sorted(ff_names))
    return config, vectors


def _stated_config(am: Any, ckpt: Any, names: set[str], ff_names: set[str]) -> IA3Config | None:
    """adaptc's own config from the file, when it selects exactly the checkpoint's sites."""
    own = (ckpt.config.get("adaptc") or {}).get("config")
    if not isinstance(own, dict):
        return None
    try:
        config = IA3Config.from_options(**{k: v for k, v in own.items() if k != "method"})
        sites, feedforward = choose_sites(am, config)
    except AdaptcError:
        return None
    return config if {s.name for s in sites} == names and feedforward == ff_names else None
