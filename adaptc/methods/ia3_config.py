"""IA3's options (PEFT's ``IA3Config`` names), and the keyword-options helper the IA3, LN tuning and
bottleneck configs share."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from adaptc.errors import ConfigError, TargetError
from adaptc.passes.selection import compile_selector

# PEFT's defaults by transformers model type (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# ..._FEEDFORWARD_MODULES_MAPPING in peft/utils/constants.py, 0.21.2).
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def config_from_options(cls: type, aliases: dict[str, str], options: dict[str, Any]) -> Any:
    """``cls(**options)`` with PEFT's names mapped to ours, validated; an unknown name raises ConfigError
    listing the known ones (a LoRA-only flag such as ``r`` given to another method, for instance)."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        name = aliases.get(key, key)
        if name not in known:
            raise ConfigError(
                f"unknown {cls.method} option {key!r}; known options: {', '.join(sorted(known | set(aliases)))}"
            )
        if name in kwargs:
            raise ConfigError(f"{cls.method} option {name!r} given twice (as {key!r} and another spelling)")
        kwargs[name] = value
    config = cls(**kwargs)
    config.validate()
    return config


def exact_regex(names: Sequence[str]) -> str | None:
    """A ``target_modules`` regular expression PEFT matches (``re.fullmatch``) to exactly these module paths;
    a list would also match longer paths ending with a name (timm's ``norm`` and ``blocks.0.mlp.norm``)."""
    return "|".join(re.escape(n) for n in names) or None


def model_type(model: Any) -> str | None:
    """A transformers model's ``config.model_type`` (None for other models)."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) else None


@dataclasses.dataclass
class IA3Config:
    """IA3: learned scales, on the output of ``targets`` and on the input of ``feedforward_modules``.

    ``targets`` (PEFT's ``target_modules``) and ``feedforward_modules`` default, as in PEFT, to PEFT's
    choice for the transformers model type; for other models give ``targets`` (then feed-forward
    modules default to none). ``feedforward_modules`` must be among the targets. A list matches like
    PEFT's: ``targets`` by exact name or dotted suffix, ``feedforward_modules`` by name ending.
    """

    targets: str | Sequence[str] | None = None
    feedforward_modules: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    init_ia3_weights: bool = True  # False: random vectors (PEFT's option; discouraged)

    method = "ia3"

    @classmethod
    def from_options(cls, **options: Any) -> IA3Config:
        if isinstance(options.get("target_modules"), (set, frozenset)):
            options["target_modules"] = sorted(options["target_modules"])
        options.pop("fan_in_fan_out", None)  # PEFT's flag for Conv1D weights: adaptc reads the op
        return config_from_options(cls, {"target_modules": "targets", "exclude_modules": "exclude"}, options)

    def validate(self) -> None:
        self.targets = compile_selector(self.targets, "targets")
        self.exclude = compile_selector(self.exclude, "exclude")
        ff = self.feedforward_modules
        if isinstance(ff, (set, frozenset, tuple)):
            ff = self.feedforward_modules = sorted(ff) if isinstance(ff, (set, frozenset)) else list(ff)
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as exc:
                raise ConfigError(
                    f"feedforward_modules={ff!r} is not a valid regular expression: {exc}"
                ) from None
        elif ff is not None and (not isinstance(ff, list) or not all(isinstance(n, str) and n for n in ff)):
            raise ConfigError(
                f"feedforward_modules must be a regular expression or a list of module names, got {ff!r}"
            )
        if isinstance(ff, list) and isinstance(self.targets, list) and not set(ff) <= set(self.targets):
            raise ConfigError(
                f"feedforward_modules {sorted(set(ff) - set(self.targets))} are not in targets {self.targets}: "
                "a feed-forward module must also be a target (PEFT's rule)"
            )
        if ff is not None and self.targets is None:
            raise ConfigError(
                "feedforward_modules is given without targets: give targets too (a superset of them)"
            )
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "targets": self.targets,
            "feedforward_modules": self.feedforward_modules,
            "exclude": self.exclude,
            "init_ia3_weights": self.init_ia3_weights,
        }

    def resolved(self, model: Any) -> tuple[Any, Any]:
        """(targets, feedforward modules) for ``model``: the given ones, or PEFT's defaults for its type."""
        if self.targets is not None:
            return self.targets, self.feedforward_modules if self.feedforward_modules is not None else []
        kind = model_type(model)
        if kind not in IA3_TARGETS:
            raise TargetError(
                f"IA3 has no default targets for {type(model).__name__}"
                + (f" (model type {kind!r})" if kind else "")
                + f"; PEFT's defaults cover {', '.join(sorted(IA3_TARGETS))}. Give targets= (the key, value and "
                "feed-forward projections, e.g. ['k_proj', 'v_proj', 'down_proj']) and feedforward_modules= "
                "(those among them scaled on their input, e.g. ['down_proj'])"
            )
        targets, ff = IA3_TARGETS[kind]
        return list(targets), list(ff)


def is_feedforward(selector: Any, name: str) -> bool:
    """PEFT's feed-forward rule: a regular expression matched in full, or any list entry the name ends with."""
    if not selector:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name.endswith(entry) for entry in selector)
