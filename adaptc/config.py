"""Method configurations. Field names follow PEFT where PEFT has one; PEFT's spellings are accepted too."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .passes.selection import compile_selector

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
    # PEFT's target_parameters: mixture-of-experts weights by parameter name (exact or dotted suffix), added
    # to what ``targets`` picks (``targets=None`` then adapts these only). "all-linear" includes them already.
    target_parameters: Sequence[str] | None = None
    # One fused LoRA node per group of linear sites reading the same input (passes/lora_fused.py);
    # a run-time choice, not saved with the adapter.
    fuse_siblings: bool = True

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
        _check_rank(self.r, "r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in LORA_INITS:
            raise ConfigError(f"init must be one of {', '.join(LORA_INITS)}, got {self.init!r}")
        if not isinstance(self.fuse_siblings, bool):
            raise ConfigError(f"fuse_siblings must be True or False, got {self.fuse_siblings!r}")
        if self.use_dora and self.init == "pissa":
            raise ConfigError("init='pissa' and use_dora=True cannot be combined; pick one")
        compile_selector(self.targets, "targets")
        compile_selector(self.exclude, "exclude")
        if self.target_parameters is not None:
            names = self.target_parameters
            if isinstance(names, str) or not isinstance(names, Sequence) or not names or not all(
                isinstance(n, str) and n for n in names
            ):
                raise ConfigError(
                    f"target_parameters must be a non-empty list of parameter names (e.g. ['mlp.experts.gate_up_proj']), "
                    f"got {names!r}"
                )
            self.target_parameters = list(names)
        if self.targets is None and not self.target_parameters:
            raise ConfigError("targets is None; give a regular expression, a list of module names or 'all-linear'")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else self.layers
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:  # not nan/inf
        raise ConfigError(f"{what} must be a positive number, got {value!r}")


def _pattern_value(patterns: dict, site_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", site_name):
            return value
    return default


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


@dataclass
class PromptConfig:
    """Prompt tuning: ``num_virtual_tokens`` learned vectors added to the token sequence.

    ``init``: ``"random"`` (normal, like PEFT), ``"vocab"`` (rows sampled from the token
    embedding table; text models) or any other string, a text whose token embeddings start
    the prompt (text models; needs ``tokenizer``: a Hugging Face tokenizer or a callable
    ``text -> list of ids``).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    tokenizer: Any = None

    method = "prompt"
    _aliases = {"prompt_tuning_init": "init", "prompt_tuning_init_text": "init"}

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = cls._aliases.get(key, key)
            if name not in known:
                raise ConfigError(
                    f"unknown {cls.method} option {key!r}; known options: {', '.join(sorted(known | set(cls._aliases)))}"
                )
            if key == "prompt_tuning_init" and str(value).upper() in ("TEXT",):
                continue  # PEFT's two-field spelling: the text comes in prompt_tuning_init_text
            kwargs[name] = value.lower() if key == "prompt_tuning_init" and isinstance(value, str) else value
        if kwargs.get("init") == "sample_vocab":
            kwargs["init"] = "vocab"
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        _check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        if not isinstance(self.init, str) or not self.init:
            raise ConfigError(f"init must be 'random', 'vocab' or a non-empty text, got {self.init!r}")
        if self.init not in ("random", "vocab") and self.tokenizer is None:
            raise ConfigError(
                f"init={self.init!r} is a text: pass tokenizer= (a Hugging Face tokenizer or a callable text -> ids) "
                "to turn it into token embeddings, or use init='random' / 'vocab'"
            )

    @property
    def init_is_text(self) -> bool:
        return self.init not in ("random", "vocab")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tokenizer"}
        data["method"] = self.method
        return data


@dataclass
class PTuningConfig(PromptConfig):
    """P-tuning: the virtual tokens come out of a prompt encoder (``"mlp"`` or ``"lstm"``), as in
    "GPT Understands, Too"; only the encoder and its input embeddings train. Merge folds the
    encoder's output to constants."""

    encoder: str = "mlp"
    encoder_hidden_size: int | None = None  # None: the model's hidden size
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    method = "ptuning"
    _aliases = {
        "encoder_reparameterization_type": "encoder",
        "prompt_tuning_init": "init",
        "prompt_tuning_init_text": "init",
    }

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        if isinstance(options.get("encoder_reparameterization_type"), str):
            options["encoder_reparameterization_type"] = options["encoder_reparameterization_type"].lower()
        return super().from_options(**options)

    def validate(self) -> None:
        super().validate()
        if self.encoder not in ("mlp", "lstm"):
            raise ConfigError(f"encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        if self.encoder_hidden_size is not None:
            _check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        _check_positive_int(self.encoder_num_layers, "encoder_num_layers")
        _check_dropout(self.encoder_dropout, "encoder_dropout")


@dataclass
class PrefixConfig:
    """Prefix tuning (P-Tuning v2): ``num_virtual_tokens`` learned keys and values prepended in
    every attention, visible to every query. ``prefix_projection`` learns them through a
    two-layer MLP (``encoder_hidden_size`` wide), as in the prefix-tuning paper."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    shift_positions: bool = True  # real tokens' position ids start after the prefix, as in PEFT

    method = "prefix"

    @classmethod
    def from_options(cls, **options: Any) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown prefix option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
        config = cls(**options)
        config.validate()
        return config

    def validate(self) -> None:
        _check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None:
            _check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        if not isinstance(self.shift_positions, bool):
            raise ConfigError(f"shift_positions must be True or False, got {self.shift_positions!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data


def _check_dropout(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{what} must be in [0, 1), got {value!r}")


CONFIG_TYPES = (LoraConfig, PromptConfig, PTuningConfig, PrefixConfig)
