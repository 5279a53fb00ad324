"""What the weight-update methods LoHa, LoKr (and, for its options, pass and table, VeRA) share.

- :class:`SelectorOptions`: PEFT's option names for choosing modules (``target_modules``,
  ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``), adaptc's spellings accepted
  (``targets``, ``exclude``, ``layers``), checked before the model is touched; an option of
  another method (LoRA's ``dropout``, ``init``, ...) is named as such.
- :class:`LycorisConfig`: LoHa's and LoKr's common options (``r``, ``alpha``, ``rank_dropout``,
  ``module_dropout``, ``use_effective_conv2d``, ``init_weights``, rank / alpha patterns).
- :class:`LycorisMethod`: select the sites, build one layer per site, route every use of their
  weights through it; save and load in PEFT's format (adaptc/methods/lycoris_checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from adaptc.errors import AdaptcError, ConfigError
from adaptc.passes import lycoris
from adaptc.passes.manager import GraphPass
from adaptc.passes.selection import compile_selector, select
from adaptc.passes.sites import site_key
from adaptc.peft_format import pattern_value
from adaptc.tables import in_out, number, table

from . import lycoris_checkpoint
from .base import AdapterBuild, Method, adapter_prefix

# Options of other methods that adaptc's CLI may pass (LoRA's flags): named in the error.
_LORA_ONLY = {"dropout", "lora_dropout", "init", "init_lora_weights", "rslora", "use_rslora", "use_dora",
              "lora_alpha", "fuse_siblings"}
_SELECTOR_ALIASES = {"targets": "target_modules", "exclude": "exclude_modules", "layers": "layers_to_transform"}


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def check_probability(value: Any, what: str) -> None:
    if not _is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"{what} must be a probability in [0, 1), got {value!r}")


def check_bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, got {value!r}")


@dataclass
class SelectorOptions:
    """Which modules an adapter goes on, under PEFT's names (see :mod:`adaptc.passes.selection`)."""

    target_modules: str | Sequence[str] | None = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None

    method: ClassVar[str] = ""
    title: ClassVar[str] = ""  # the method as people write it (LoHa), for messages

    @classmethod
    def from_options(cls, **options: Any) -> SelectorOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = _SELECTOR_ALIASES.get(key, key)
            if name not in known:
                other = " (a LoRA option)" if key in _LORA_ONLY else ""
                raise ConfigError(
                    f"unknown {cls.title} option {key!r}{other}; {cls.title}'s options are: {', '.join(sorted(known))}"
                )
            if name in kwargs:
                raise ConfigError(f"{cls.title} option {name!r} given twice (as {key!r} and another spelling)")
            kwargs[name] = value
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        if self.target_modules is None:
            raise ConfigError(
                "target_modules is None; give a regular expression, a list of module names or 'all-linear'"
            )
        compile_selector(self.target_modules, "target_modules")
        compile_selector(self.exclude_modules, "exclude_modules")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise ConfigError(
                    f"layers_to_transform must be a layer index or a list of them (>= 0), got {self.layers_to_transform!r}"
                )
        elif self.layers_pattern:
            raise ConfigError("layers_pattern is given without layers_to_transform; give both (as PEFT requires)")

    def select(self, sites: list) -> list:
        return select(sites, self.target_modules, self.exclude_modules, self.layers_to_transform, self.layers_pattern)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data


@dataclass
class LycorisConfig(SelectorOptions):
    """LoHa's and LoKr's common options (PEFT's names and defaults; adaptc's default targets)."""

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.r, "r")
        if not _is_number(self.alpha):
            raise ConfigError(f"alpha must be a finite number, got {self.alpha!r}")
        check_probability(self.rank_dropout, "rank_dropout")
        check_probability(self.module_dropout, "module_dropout")
        check_bool(self.use_effective_conv2d, "use_effective_conv2d")
        for name, pattern, check in (("rank_pattern", self.rank_pattern, check_positive_int),
                                     ("alpha_pattern", self.alpha_pattern, None)):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name} must be a dict of module-name pattern -> value, got {type(pattern).__name__}")
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except (re.error, TypeError) as exc:
                    raise ConfigError(f"{name} key {key!r} is not a valid regular expression: {exc}") from None
                if check is not None:
                    check(value, f"{name}[{key!r}]")
                elif not _is_number(value):
                    raise ConfigError(f"{name}[{key!r}] must be a finite number, got {value!r}")

    def rank_for(self, site_name: str) -> int:
        return pattern_value(self.rank_pattern, site_name, self.r)

    def alpha_for(self, site_name: str) -> float:
        return pattern_value(self.alpha_pattern, site_name, self.alpha)


class UsePass(GraphPass):
    """Route every use of the selected weights through their layer; every selected use must be found."""

    def __init__(self, name: str, model: torch.nn.Module, layers: dict, prefix: str, expected_uses: int) -> None:
        self.name = name
        self.model, self.layers, self.prefix, self.expected_uses = model, layers, prefix, expected_uses

    def run(self, gm: torch.fx.GraphModule) -> bool:
        count = lycoris.insert(gm, self.model, self.layers, self.prefix)
        if count < self.expected_uses:
            raise AdaptcError(
                f"the {self.name} pass found {count} of the {self.expected_uses} selected op uses in a newly captured "
                f"graph of {type(self.model).__name__}; the graph differs between modes or inputs in a way adaptc "
                "does not handle yet. Capture with the inputs and mode you will use."
            )
        return count > 0


class LycorisMethod(Method):
    """LoHa and LoKr: a subclass says how to make one site's layer and the shapes PEFT stores there."""

    merge = "weights"
    peft_module_types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d")  # what PEFT's tuner wraps

    def make_layer(self, site: Any, config: Any) -> lycoris.LycorisLayer:
        raise NotImplementedError

    def shapes(self, site: Any, config: Any) -> dict[str, tuple[int, ...]]:
        """The tensors (PEFT's names and shapes) an adapter with ``config`` holds at ``site``."""
        raise NotImplementedError

    def choose_sites(self, am: Any, config: Any) -> list:
        chosen = lycoris.supported_sites(config.select(am.all_sites), config.title, config.target_modules)
        return [dataclasses.replace(site) for site in chosen]  # params_added is per adapter

    def build(self, am: Any, adapter_name: str, config: Any) -> AdapterBuild:
        sites = self.choose_sites(am, config)
        layers = self.build_layers(am, sites, config)
        graph_pass = UsePass(self.name, am.base_model, dict(layers), adapter_prefix(adapter_name),
                             sum(site.uses for site in sites))
        return AdapterBuild(config, sites, {site_key(n): layer for n, layer in layers.items()}, graph_pass)

    def build_layers(self, am: Any, sites: list, config: Any) -> dict[str, torch.nn.Module]:
        layers = lycoris.build_layers(sites, am.base_model, lambda site: self.make_layer(site, config))
        for layer in layers.values():
            layer.initialize(config.init_weights)
        return layers

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return lycoris_checkpoint.save(self, am, adapter_name)

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        lycoris_checkpoint.load(self, am, checkpoint, adapter_name)

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        config, sites = am.adapter_configs()[adapter_name], am.adapter_sites(adapter_name)
        settings = " ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if k != "method")
        rows = [[s.name, s.op, s.shapes(), in_out(s), self.site_rank(s, config), number(s.params_added)] for s in sites]
        return [f"{self.name}: {settings}", f"{len(sites)} site{'s' if len(sites) != 1 else ''} matched",
                table(["site", "op", "weight", "in->out", "r", "params added"], rows, right=(4, 5))]

    def site_rank(self, site: Any, config: Any) -> int:
        return config.rank_for(site.name)

    # -- adaptc inspect's site table: the shapes above, counted at the sites the method takes ---------

    @staticmethod
    def supports(site: Any) -> bool:
        return lycoris.supports(site)

    def site_params(self, site: Any, config: Any) -> int | None:
        return sum(math.prod(s) for s in self.shapes(site, config).values()) if self.supports(site) else None

    def site_column(self, config: Any) -> str:
        return f"{self.name} r={config.r}"

    def default_sites(self, sites: list, config: Any) -> list:
        try:
            return [s for s in config.select(sites) if self.supports(s)]
        except AdaptcError:  # the targets match nothing here
            return []
