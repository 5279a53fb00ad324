"""OFT (orthogonal fine-tuning): the method's registry entry, its config and PEFT-format checkpoints.

The layer is in adaptc/passes/oft.py. Checkpoints are PEFT 0.21's: ``peft_type: "OFT"``, one key per
site ``base_model.model.<module>.oft_R.weight`` ([blocks, block_size * (block_size - 1) / 2]), and the
config's ``r`` / ``oft_block_size`` as given (each site's layout is derived from them, as PEFT does).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adaptc.errors import CheckpointError, ConfigError, TargetError
from adaptc.passes.manager import GraphPass
from adaptc.passes.oft import OftLayer, block_layout
from adaptc.passes.quantize import owner_of
from adaptc.passes.selection import compile_selector, select
from adaptc.passes.sites import site_key
from adaptc.passes.wrap import route_weight_uses
from adaptc.peft_format import PREFIX, exact_pattern
from adaptc.tables import few

from .base import AdapterBuild, Method, adapter_prefix

_ALIASES = {"target_modules": "targets", "exclude_modules": "exclude", "layers_to_transform": "layers"}
_KEY_SUFFIX = ".oft_R.weight"


@dataclass
class OftConfig:
    """OFT's options under PEFT's names: give ``r`` (blocks per site) or ``oft_block_size``, not both."""

    r: int = 0
    oft_block_size: int = 32
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    module_dropout: float = 0.0
    targets: str | Sequence[str] | None = "all-linear"
    exclude: str | Sequence[str] | None = None
    layers: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    method = "oft"

    @classmethod
    def from_options(cls, **options: Any) -> OftConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(f"unknown OFT option {key!r}; known options: {', '.join(sorted(known | set(_ALIASES)))}")
            if name in kwargs:
                raise ConfigError(f"OFT option {name!r} given twice (as {key!r} and another spelling)")
            kwargs[name] = value
        if "r" in kwargs and kwargs["r"] and "oft_block_size" not in kwargs:
            kwargs["oft_block_size"] = 0  # r given: the block size follows from it
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(
                f"give either r (blocks per site) or oft_block_size, not both and not neither (r={self.r}, "
                f"oft_block_size={self.oft_block_size}): r x oft_block_size is each site's input size"
            )
        if self.oft_block_size == 1:
            raise ConfigError("oft_block_size=1 leaves nothing to rotate; use 2 or more")
        for name in ("coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise ConfigError(f"eps must be a positive number, got {self.eps!r}")
        terms = self.num_cayley_neumann_terms
        if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
            raise ConfigError(f"num_cayley_neumann_terms must be an integer >= 1, got {terms!r}")
        dropout = self.module_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"module_dropout must be in [0, 1), got {dropout!r}")
        if self.targets is None:
            raise ConfigError("targets is None; give a regular expression, a list of module names or 'all-linear'")
        compile_selector(self.targets, "targets")
        compile_selector(self.exclude, "exclude")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data


class OftPass(GraphPass):
    name = "oft"

    def __init__(self, model: torch.nn.Module, layers: dict, prefix: str) -> None:
        self.model, self.layers, self.prefix = model, layers, prefix

    def run(self, gm: torch.fx.GraphModule) -> bool:
        return route_weight_uses(gm, self.model, self.layers, self.prefix) > 0


def _unfit(site: Any) -> str | None:
    if site.kind == "embedding":
        return "an embedding"
    if site.kind == "conv" and site.conv["groups"] != 1:
        return f"a grouped convolution (groups={site.conv['groups']})"
    return None


class OftMethod(Method):
    name = "oft"
    config_class = OftConfig
    peft_types = ("OFT",)
    merge = "weights"

    def build(self, am: Any, adapter_name: str, config: OftConfig) -> AdapterBuild:
        chosen = select(am.all_sites, config.targets, config.exclude, config.layers, config.layers_pattern)
        unfit = [f"{s.name} ({why})" for s in chosen if (why := _unfit(s))]
        if unfit:
            raise TargetError(f"OFT rotates the input space of linear and ungrouped convolution weights; the targets "
                              f"also select {few(unfit)}: narrow targets / exclude them")
        packed = [s.name for s in chosen if owner_of(am.base_model, s.weight) is not None]
        if packed:
            raise ConfigError(f"OFT recomputes each adapted op with a rotated input or kernel, which needs the weight "
                              f"itself; {few(packed)} hold quantized (packed) weights. Inject OFT into the model "
                              "without quantize=, or use LoRA / AdaLoRA on the quantized model")
        chosen = [dataclasses.replace(site) for site in chosen]
        params = dict(am.base_model.named_parameters(remove_duplicate=False))
        layers = {}
        for site in chosen:
            blocks, size = block_layout(site, config.r, config.oft_block_size)
            if size < 2:
                raise ConfigError(f"OFT at {site.name}: blocks of size {size} rotate nothing; lower r or raise oft_block_size")
            layer = OftLayer(site, blocks, size, coft=config.coft, eps=config.eps, block_share=config.block_share,
                             use_cayley_neumann=config.use_cayley_neumann,
                             num_cayley_neumann_terms=config.num_cayley_neumann_terms,
                             module_dropout=config.module_dropout)
            weight = params[site.weight]
            layer.to(dtype=weight.dtype if weight.is_floating_point() else torch.float32, device=weight.device)
            site.params_added = layer.oft_R.numel()
            layers[site.name] = layer
        graph_pass = OftPass(am.base_model, layers, adapter_prefix(adapter_name))
        return AdapterBuild(config, chosen, {site_key(n): m for n, m in layers.items()}, graph_pass)

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config: OftConfig = am.adapter_configs()[adapter_name]
        sites = am.adapter_sites(adapter_name)
        tensors = {f"{PREFIX}{s.name}{_KEY_SUFFIX}": am.adapters[adapter_name][site_key(s.name)].oft_R.detach().cpu()
                   .contiguous().clone() for s in sites}
        fields = {
            "peft_type": "OFT", "task_type": None, "inference_mode": True, "r": config.r,
            "oft_block_size": config.oft_block_size, "coft": config.coft, "eps": config.eps,
            "block_share": config.block_share, "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms, "module_dropout": config.module_dropout,
            "target_modules": [s.name for s in sites], "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "fan_in_fan_out": any(s.fan_in_fan_out for s in sites), "bias": "none",
            "init_weights": True, "modules_to_save": None,
        }
        return fields, tensors

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        raw = checkpoint.config
        if "oft_block_size" not in raw:
            raise CheckpointError(f"{checkpoint.config_path}: no oft_block_size: an OFT adapter from PEFT < 0.14, "
                                  "whose parameterisation PEFT itself no longer loads; retrain it with a newer PEFT")
        if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
            raise CheckpointError(f"{checkpoint.config_path}: bias / modules_to_save train base-model parameters "
                                  "too; adaptc loads OFT rotations only")
        by_site = {}
        for key, tensor in checkpoint.tensors.items():
            match = re.fullmatch(rf"{re.escape(PREFIX)}(.+){re.escape(_KEY_SUFFIX)}", key)
            if match is None:
                raise CheckpointError(f"{checkpoint.weights_path}: {key!r} is not an OFT parameter "
                                      f"(base_model.model.<module>{_KEY_SUFFIX})")
            by_site[match.group(1)] = tensor
        if not by_site:
            raise CheckpointError(f"{checkpoint.weights_path} holds no tensors")
        names = {s.name for s in am.all_sites}
        unknown = [n for n in by_site if n not in names]
        if unknown:
            raise CheckpointError(f"{checkpoint.weights_path}: {few(unknown)} are not sites of this "
                                  f"{type(am.base_model).__name__}; `adaptc inspect` lists the sites")
        try:
            config = OftConfig.from_options(
                r=raw.get("r", 0), oft_block_size=raw["oft_block_size"], coft=raw.get("coft", False),
                eps=raw.get("eps", 6e-5), block_share=raw.get("block_share", False),
                use_cayley_neumann=raw.get("use_cayley_neumann", True),
                num_cayley_neumann_terms=raw.get("num_cayley_neumann_terms", 5),
                module_dropout=raw.get("module_dropout", 0.0), targets="|".join(exact_pattern(n) for n in by_site),
            )
        except ConfigError as exc:
            raise CheckpointError(f"{checkpoint.config_path}: {exc}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # block sizes adjusted at training time: the shapes check them below
            am.add_adapter(adapter_name, config)
        layers = am.adapters[adapter_name]
        bad = [f"{n}: {list(t.shape)} vs {list(layers[site_key(n)].oft_R.shape)}"
               for n, t in by_site.items() if tuple(t.shape) != tuple(layers[site_key(n)].oft_R.shape)]
        if bad:
            am.delete_adapter(adapter_name)
            raise CheckpointError(f"{checkpoint.weights_path}: oft_R shapes do not fit this model's sites with "
                                  f"r={config.r}, oft_block_size={config.oft_block_size} ({few(bad)})")
        with torch.no_grad():
            for name, tensor in by_site.items():
                target = layers[site_key(name)].oft_R
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        layers = am.adapters[adapter_name]
        layouts = sorted({(layers[site_key(s.name)].blocks, layers[site_key(s.name)].block_size) for s in sites})
        head = (f"oft: r={config.r} oft_block_size={config.oft_block_size} coft={config.coft} "
                f"block_share={config.block_share} cayley_neumann={config.use_cayley_neumann} targets={config.targets!r}")
        return [head, f"{len(sites)} site{'s' if len(sites) != 1 else ''} matched; blocks x size: "
                + ", ".join(f"{b}x{s}" for b, s in layouts)]
