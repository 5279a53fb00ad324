"""Method configurations. Field names follow PEFT where PEFT has one; PEFT's spellings are accepted too."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

KNOWN_METHODS = ("lora",)
PLANNED_METHODS = ("prompt", "prefix", "ptuning")
LORA_INITS = ("default", "gaussian", "pissa")

# PEFT's name -> ours.
_LORA_ALIASES = {
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_rslora": "rslora",
    "init_lora_weights": "init",
    "layers_to_transform": "layers",
}


@dataclass
class LoraConfig:
    """LoRA: ``W x + scale * B A x`` at every selected site; only A and B train.

    ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``). ``targets`` picks sites
    (see :mod:`adaptc.passes.selection`); ``rank_pattern`` / ``alpha_pattern`` override ``r`` /
    ``alpha`` for sites whose name ends with a pattern key (PEFT's rule).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str | Sequence[str] | None = "all-linear"
    exclude: str | Sequence[str] | None = None
    layers: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    method = "lora"

    @classmethod
    def from_options(cls, **options: Any) -> LoraConfig:
        """Build from keyword options, accepting PEFT's names (``lora_alpha``, ``target_modules``, ...)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = _LORA_ALIASES.get(key, key)
            if name not in known:
                close = sorted(known | set(_LORA_ALIASES))
                raise ConfigError(f"unknown LoRA option {key!r}; known options: {', '.join(close)}")
            if name in kwargs:
                raise ConfigError(f"LoRA option {name!r} given twice (as {key!r} and another spelling)")
            kwargs[name] = value
        if kwargs.get("init") is True:
            kwargs["init"] = "default"
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        from adaptc.passes.selection import compile_selector

        _check_rank(self.r, "r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in LORA_INITS:
            raise ConfigError(f"init must be one of {', '.join(LORA_INITS)}, got {self.init!r}")
        if self.use_dora and self.init == "pissa":
            raise ConfigError("init='pissa' and use_dora=True cannot be combined; pick one")
        compile_selector(self.targets, "targets")
        compile_selector(self.exclude, "exclude")
        if self.targets is None:
            raise ConfigError("targets is None; give a regular expression, a list of module names or 'all-linear'")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else self.layers
            if isinstance(layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise ConfigError(f"layers must be a layer index or a list of them (>= 0), got {self.layers!r}")
        for name, pattern, check in (
            ("rank_pattern", self.rank_pattern, _check_rank),
            ("alpha_pattern", self.alpha_pattern, _check_alpha),
        ):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name} must be a dict of module-name pattern -> value, got {type(pattern).__name__}")
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except (re.error, TypeError) as exc:
                    raise ConfigError(f"{name} key {key!r} is not a valid regular expression: {exc}") from None
                check(value, f"{name}[{key!r}]")

    def rank_for(self, site_name: str) -> int:
        return _pattern_value(self.rank_pattern, site_name, self.r)

    def alpha_for(self, site_name: str) -> float:
        return _pattern_value(self.alpha_pattern, site_name, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data


def _check_rank(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer (the LoRA rank), got {value!r}")


def _check_alpha(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{what} must be a positive number, got {value!r}")


def _pattern_value(patterns: dict, site_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", site_name):
            return value
    return default


def make_config(method_or_config: Any, options: dict[str, Any]) -> LoraConfig:
    """The config for ``inject``'s second argument: a method name with options, or a config object."""
    if isinstance(method_or_config, LoraConfig):
        if options:
            raise ConfigError(
                f"got a LoraConfig and keyword options {sorted(options)}; put the options in the config"
            )
        method_or_config.validate()
        return method_or_config
    if not isinstance(method_or_config, str):
        raise ConfigError(
            f"method must be a method name ({', '.join(KNOWN_METHODS)}) or a config object, "
            f"got {type(method_or_config).__name__}"
        )
    method = method_or_config.lower()
    if method == "lora":
        return LoraConfig.from_options(**options)
    if method in PLANNED_METHODS:
        raise ConfigError(f"method {method!r} is not available in this version yet; available: {', '.join(KNOWN_METHODS)}")
    raise ConfigError(f"unknown method {method_or_config!r}; known methods: {', '.join(KNOWN_METHODS)}")
