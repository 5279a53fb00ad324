"""LoRA (with rsLoRA, DoRA, PiSSA, rank/alpha patterns): the method's registry entry."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from adaptc.config import LoraConfig
from adaptc.errors import AdaptcError, TargetError
from adaptc.passes import experts, lora, lora_fused
from adaptc.passes.manager import GraphPass
from adaptc.passes.selection import select
from adaptc.passes.sites import site_key
from adaptc.tables import few, in_out, number, table

from . import lora_checkpoint
from .base import AdapterBuild, Method, adapter_prefix


class LoraPass(GraphPass):
    """Route every use of the selected weights through their LoraLayer (then fuse siblings)."""

    name = "lora"

    def __init__(self, model: torch.nn.Module, layers: dict, prefix: str, config: LoraConfig, expected_uses: int):
        self.model, self.layers, self.prefix = model, layers, prefix
        self.config, self.expected_uses = config, expected_uses

    def run(self, gm: torch.fx.GraphModule) -> bool:
        count = lora.insert(gm, self.model, self.layers, self.prefix)
        count += experts.insert(gm, self.layers, self.prefix, site_key)  # mixture-of-experts weights, where they are read
        if self.config.fuse_siblings:
            lora_fused.fuse_siblings(gm, self.prefix)
        if count < self.expected_uses:
            raise AdaptcError(
                f"the LoRA pass found {count} of the {self.expected_uses} selected op uses in a newly captured graph "
                f"of {type(self.model).__name__}; the graph differs between modes or inputs in a way adaptc does not "
                "handle yet. Capture with the inputs and mode you will use."
            )
        return count > 0


def _chosen_sites(sites: list, config: LoraConfig) -> list:
    """What ``targets`` picks plus the expert weights ``target_parameters`` names (PEFT's two lists);
    ``"all-linear"`` includes every expert weight (within ``exclude`` and ``layers``)."""
    pick = (config.exclude, config.layers, config.layers_pattern)
    chosen = select(sites, config.targets, *pick) if config.targets is not None else []
    every_expert = [s.name for s in sites if s.kind == experts.KIND]
    if config.targets == "all-linear" and every_expert:
        try:
            chosen += [s for s in select(sites, every_expert, *pick) if s not in chosen]
        except TargetError:  # all excluded, or outside ``layers``
            pass
    if config.target_parameters:
        named = [s for s in select(sites, config.target_parameters, *pick) if s.kind == experts.KIND]
        if not named:
            raise TargetError(
                f"target_parameters={config.target_parameters!r} names no mixture-of-experts weight of the model "
                "(a 3-D parameter applied per expert); `adaptc inspect` lists them as kind 'experts'"
            )
        chosen += [s for s in named if s not in chosen]
    order = {id(site): i for i, site in enumerate(sites)}
    return sorted(chosen, key=lambda site: order[id(site)])  # graph order, as the sites are


class LoraMethod(Method):
    name = "lora"
    config_class = LoraConfig
    peft_types = ("LORA",)
    merge = "weights"
    unmerged_export = True
    mixed_batch = True  # LoraLayer applies its update to the rows a mixed batch gives it

    def build(self, am: Any, adapter_name: str, config: LoraConfig) -> AdapterBuild:
        chosen = _chosen_sites(am.all_sites, config)
        chosen = [dataclasses.replace(site) for site in chosen]  # params_added is per adapter
        expert_sites = [site for site in chosen if site.kind == experts.KIND]
        experts.check_config(expert_sites, config)  # before build_layers may change a weight (PiSSA)
        plain = [site for site in chosen if site.kind != experts.KIND]
        layers = lora.build_layers(plain, config, am.base_model) if plain else {}
        layers.update(experts.build_layers(expert_sites, config, am.base_model))
        graph_pass = LoraPass(am.base_model, dict(layers), adapter_prefix(adapter_name), config,
                              sum(site.uses for site in chosen))
        return AdapterBuild(config, chosen, {site_key(n): layer for n, layer in layers.items()}, graph_pass)

    def remove(self, graph: torch.fx.GraphModule, adapter_name: str) -> None:
        lora_fused.unfuse(graph, adapter_name)

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return lora_checkpoint.save(am, adapter_name)

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        lora_checkpoint.load(am, checkpoint, adapter_name)

    def recognizes(self, checkpoint_config: dict[str, Any]) -> bool:
        return checkpoint_config.get("peft_type", "LORA") == "LORA"  # PEFT's oldest files have no peft_type

    # -- adaptc inspect's site table ---------------------------------------------------------------

    def site_params(self, site: Any, config: LoraConfig) -> int | None:
        r = config.rank_for(site.name)
        return None if lora.rank_error(site, r, config.init) else lora.lora_param_count(site, r, config.use_dora)

    def site_cell(self, site: Any, config: LoraConfig) -> str:
        count = self.site_params(site, config)
        if count is None:
            return "- (r too large)"  # inject would refuse this rank here
        deficient = lora.rank_deficient(site, config.rank_for(site.name))  # allowed, as in PEFT
        return number(count) + (f" (rank {site.max_rank()})" if deficient else "")

    def site_column(self, config: LoraConfig) -> str:
        return f"lora r={config.r}"

    def default_sites(self, sites: list, config: LoraConfig) -> list:
        try:
            return _chosen_sites(sites, config)
        except TargetError:
            return []

    def site_notes(self, sites: list, config: LoraConfig) -> list[str]:
        deficient = [s.name for s in sites if lora.rank_deficient(s, config.rank_for(s.name))
                     and self.site_params(s, config) is not None]
        if not deficient:
            return []
        return [
            f"note: r={config.r} is above the rank of the weight at {len(deficient)} site(s) ({few(deficient)}): "
            "LoRA works there (as in PEFT), but its update has only the rank shown"
        ]

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        extras = " rslora" * config.rslora + " dora" * config.use_dora
        head = (
            f"lora: r={config.r} alpha={config.alpha:g} dropout={config.dropout:g} init={config.init}{extras} "
            f"targets={config.targets!r}" + (f" exclude={config.exclude!r}" if config.exclude is not None else "")
            + (f" layers={config.layers!r}" if config.layers is not None else "")
        )
        rows = [[s.name, s.op, s.shapes(), in_out(s), config.rank_for(s.name), number(s.params_added)] for s in sites]
        return [head, f"{len(sites)} site{'s' if len(sites) != 1 else ''} matched",
                table(["site", "op", "weight", "in->out", "r", "params added"], rows, right=(4, 5))]
