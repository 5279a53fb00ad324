"""Bottleneck adapters (AdapterHub's Houlsby and Pfeiffer configurations): the method's registry entry.

PEFT has no bottleneck adapters: checkpoints are adaptc's own (``peft_type: "BOTTLENECK"``, the
parameters by name, the config). They have no merged form (a non-linearity sits between the two
projections): ``merge`` raises MergeError; ``export_onnx`` (merged export, the default) keeps them in
the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from adaptc.errors import AdaptcError, ConfigError, TargetError
from adaptc.passes import bottleneck
from adaptc.passes.manager import FunctionPass, GraphPass
from adaptc.passes.sites import site_key
from adaptc.tables import number, table

from .base import AdapterBuild, Method, adapter_prefix
from .ia3_config import config_from_options

PLACEMENTS = {"houlsby": ("attention", "feedforward"), "pfeiffer": ("feedforward",)}
DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}  # AdapterHub's defaults


@dataclasses.dataclass
class BottleneckConfig:
    """A bottleneck adapter ``h + up(act(down(h)))`` on residual branches.

    ``placement``: ``"houlsby"`` (after the attention and after the feed-forward sublayer of every block)
    or ``"pfeiffer"`` (after the feed-forward only). The bottleneck has ``bottleneck_size`` units, or the
    stream's width divided by ``reduction_factor`` (at least 1). ``non_linearity``: relu, gelu, swish
    (silu) or tanh; default AdapterHub's (swish for Houlsby, relu for Pfeiffer). ``layers``: only the
    blocks with these indices.
    """

    placement: str = "pfeiffer"
    reduction_factor: int | float = 16
    bottleneck_size: int | None = None
    non_linearity: str | None = None
    layers: int | Sequence[int] | None = None

    method = "bottleneck"

    @classmethod
    def from_options(cls, **options: Any) -> BottleneckConfig:
        return config_from_options(cls, {"config": "placement", "layers_to_transform": "layers"}, options)

    def validate(self) -> None:
        if not isinstance(self.placement, str) or self.placement.lower() not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        self.placement = self.placement.lower()
        factor = self.reduction_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
            raise ConfigError(f"reduction_factor must be a number >= 1, got {factor!r}")
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(
                f"bottleneck_size must be a positive integer (or None: width / reduction_factor), got {size!r}"
            )
        if self.non_linearity is not None and self.non_linearity not in bottleneck.NON_LINEARITIES:
            raise ConfigError(
                f"non_linearity must be one of {', '.join(bottleneck.NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        layers = [self.layers] if isinstance(self.layers, int) else self.layers
        if layers is not None and (
            isinstance(layers, str) or not all(isinstance(i, int) and i >= 0 for i in layers) or not layers
        ):
            raise ConfigError(
                f"layers must be a block index or a non-empty list of them, got {self.layers!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "placement": self.placement,
            "reduction_factor": self.reduction_factor,
            "bottleneck_size": self.bottleneck_size,
            "non_linearity": self.non_linearity,
            "layers": self.layers,
        }

    def size_for(self, hidden: int) -> int:
        return self.bottleneck_size or max(1, int(hidden // self.reduction_factor))

    def activation(self) -> str:
        return self.non_linearity or DEFAULT_NON_LINEARITY[self.placement]


class BottleneckPass(GraphPass):
    name = "bottleneck"

    def __init__(self, model: torch.nn.Module, layers: dict, prefix: str) -> None:
        self.model, self.layers, self.prefix = model, layers, prefix

    def run(self, gm: torch.fx.GraphModule) -> bool:
        count = bottleneck.insert(gm, self.model, self.layers, self.prefix)
        if count < len(self.layers):
            raise AdaptcError(
                f"the bottleneck pass found {count} of the {len(self.layers)} residual additions it adapts in a newly "
                f"captured graph of {type(self.model).__name__}; capture with the inputs and mode you will use"
            )
        return count > 0


def find_residuals(am: Any) -> list[bottleneck.Residual]:
    """The residual additions of the example graph, with the frozen ops visible (as the passes see them)."""
    found: list[bottleneck.Residual] = []

    def record(gm: torch.fx.GraphModule) -> int:
        found.extend(bottleneck.find_residuals(gm, am.base_model))
        return 0

    am._passes.run_one(am.graph_module, FunctionPass("bottleneck-sites", record))
    return found


class BottleneckMethod(Method):
    name = "bottleneck"
    config_class = BottleneckConfig
    peft_types = ("BOTTLENECK",)
    merge = None  # a non-linearity between the projections: no merged form
    site_table = False  # `adaptc inspect --method bottleneck` lists the residual additions

    def inspect(self, graph: Any, model: torch.nn.Module, inputs: Any, config: BottleneckConfig) -> list[str]:
        found = bottleneck.find_residuals(graph, model)
        if not found:
            return [
                "no residual addition of a linear projection found: bottleneck adapters need transformer blocks"
            ]
        rows = [
            [r.name, r.kind, r.hidden, "yes" if r.kind in PLACEMENTS[config.placement] else ""] for r in found
        ]
        return [
            table(["after projection", "sublayer", "width", f"{config.placement}"], rows, right=(2,)),
            f"{len(found)} residual additions; houlsby adapts {len(found)}, pfeiffer "
            f"{sum(r.kind == 'feedforward' for r in found)}",
        ]

    def build(self, am: Any, adapter_name: str, config: BottleneckConfig) -> AdapterBuild:
        residuals = find_residuals(am)
        wanted = PLACEMENTS[config.placement]
        projections = {s.name: s for s in am.all_sites if s.kind == "linear"}
        chosen = [r for r in residuals if r.kind in wanted]
        if config.layers is not None:
            keep = {config.layers} if isinstance(config.layers, int) else set(config.layers)
            chosen = [r for r in chosen if getattr(projections.get(r.name), "layer", None) in keep]
        if not chosen:
            kinds = " and ".join(wanted)
            raise TargetError(
                f"bottleneck ({config.placement}) found no {kinds} residual addition in {type(am.base_model).__name__}"
                + (f" within layers={config.layers!r}" if config.layers is not None else "")
                + f" (found {len(residuals)} residual additions of any kind): it looks for an add of a linear "
                "projection's output (through dropout and reshapes) to the input its sublayer reads"
            )
        sites, layers = [], {}
        for residual in chosen:
            size = config.size_for(residual.hidden)
            layers[residual.name] = bottleneck.BottleneckLayer(
                residual.hidden, size, config.activation(), residual.kind
            )
            site = bottleneck.residual_site(residual, projections.get(residual.name))
            site.params_added = sum(p.numel() for p in layers[residual.name].parameters())
            sites.append(site)
        graph_pass = BottleneckPass(am.base_model, layers, adapter_prefix(adapter_name))
        return AdapterBuild(config, sites, {site_key(n): layer for n, layer in layers.items()}, graph_pass)

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        layers = am.adapters[adapter_name]
        rows = [
            [
                s.name,
                layers[site_key(s.name)].where,
                f"{s.in_features}->{layers[site_key(s.name)].down.out_features}",
                number(s.params_added),
            ]
            for s in sites
        ]
        return [
            f"bottleneck: placement={config.placement} non_linearity={config.activation()} "
            f"{'bottleneck_size=' + str(config.bottleneck_size) if config.bottleneck_size else 'reduction_factor=' + format(config.reduction_factor, 'g')}",
            f"{len(sites)} residual addition{'s' if len(sites) != 1 else ''} adapted",
            table(["after projection", "sublayer", "width->bottleneck", "params added"], rows, right=(3,)),
        ]
