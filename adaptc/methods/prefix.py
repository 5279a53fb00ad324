"""Prefix tuning (P-Tuning v2): the method's registry entry."""

from __future__ import annotations

from typing import Any

import torch

from adaptc.config import PrefixConfig
from adaptc.errors import AdaptcError, TargetError
from adaptc.passes import prefix as prefix_pass
from adaptc.passes.attention import canonicalize
from adaptc.passes.manager import GraphPass
from adaptc.passes.sequence import find_attention_sites
from adaptc.passes.sites import site_key
from adaptc.tables import number, table

from . import prompt_checkpoint
from .base import AdapterBuild, Method, adapter_prefix


class PrefixPass(GraphPass):
    """Replace every attention op by its PrefixLayer (learned keys and values in front)."""

    name = "prefix"

    def __init__(self, model: torch.nn.Module, targets: dict[str, str]) -> None:
        self.model, self.targets = model, targets

    def run(self, gm: torch.fx.GraphModule) -> bool:
        count = prefix_pass.insert(gm, self.targets)
        if count < len(self.targets):
            raise AdaptcError(
                f"the prefix pass found {count} of the {len(self.targets)} attention ops in a newly captured graph of "
                f"{type(self.model).__name__}; capture with the inputs and mode you will use"
            )
        return count > 0


class PrefixMethod(Method):
    name = "prefix"
    config_class = PrefixConfig
    aliases = ("prefix_tuning",)
    peft_types = ("PREFIX_TUNING",)
    edits_sequence = True
    merge = "constants"
    site_table = False

    def build(self, am: Any, adapter_name: str, config: PrefixConfig) -> AdapterBuild:
        model = am.base_model
        for graph in am.all_graphs():  # unfused attention (matmul, softmax, matmul) becomes one op
            graph.transform_graphs(canonicalize, remember=False)
        sites = find_attention_sites(am.graph_module)
        if not sites:
            raise TargetError(
                f"{type(model).__name__} has no attention op (scaled_dot_product_attention) for prefix tuning to "
                "extend; use method='lora', which adapts its linear and conv layers"
            )
        hidden = sites[0].heads * sites[0].head_dim
        layers, encoder = prefix_pass.build_layers(sites, config, hidden)
        prefix = adapter_prefix(adapter_name)
        targets = {site.name: f"{prefix}.{site_key(site.name)}" for site in sites}
        by_key = {site_key(n): layer for n, layer in layers.items()}
        if encoder is not None:
            by_key["prefix_encoder"] = encoder
        edit = prefix_pass.PositionShift(config.num_virtual_tokens) if config.shift_positions else None
        return AdapterBuild(config, sites, by_key, PrefixPass(model, targets), edit)

    def remove(self, graph: torch.fx.GraphModule, adapter_name: str) -> None:
        prefix_pass.remove(graph, f"{adapter_prefix(adapter_name)}.")

    def fold(self, am: Any, adapter_name: str) -> None:
        super().fold(am, adapter_name)
        layers = am.adapters[adapter_name]
        if "prefix_encoder" in layers:  # every prefix layer now holds its own constants
            del layers["prefix_encoder"]

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return prompt_checkpoint.save(am, adapter_name)

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        prompt_checkpoint.load(am, checkpoint, adapter_name)

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        sites = am.adapter_sites(adapter_name)
        rows = [[s.name, s.heads, s.source_kv_heads, s.head_dim] for s in sites]
        return [*super().describe(am, adapter_name)[:1], f"{len(sites)} attention ops get a prefix",
                table(["attention", "heads", "kv heads", "head dim"], rows, right=(1, 2, 3))]

    def inspect(self, graph: Any, model: torch.nn.Module, inputs: Any, config: PrefixConfig) -> list[str]:
        graph.transform_graphs(canonicalize, remember=False)
        sites = find_attention_sites(graph)
        if not sites:
            raise TargetError(f"{type(model).__name__} has no attention op for prefix tuning; use --method lora")
        tokens = config.num_virtual_tokens
        counts = [tokens * s.source_kv_heads * (s.head_dim + s.value_dim) for s in sites]
        rows = [[s.name, s.heads, s.source_kv_heads, s.head_dim, number(n)] for s, n in zip(sites, counts)]
        return [table(["attention", "heads", "kv heads", "head dim", f"prefix params ({tokens} tokens)"], rows,
                      right=(1, 2, 3, 4)),
                f"total: {len(sites)} attention ops; prefix tuning adds {number(sum(counts))}"]
