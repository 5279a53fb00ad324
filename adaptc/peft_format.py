"""PEFT's LoRA checkpoint format: key names, config fields and tensor layouts.

A key is ``base_model.model.<module path>.<parameter>`` with PEFT's parameter names
(``lora_A.weight``, ``lora_B.weight``, ``lora_embedding_A``, ``lora_embedding_B``,
``lora_magnitude_vector``). adaptc's tensors have PEFT's layout everywhere but two places,
converted here in both directions:

- a grouped convolution (``groups = g``): adaptc's rank-``r`` LoRA is one rank-``r`` LoRA per
  group (A a grouped conv, so the update stays block-diagonal and merges into the weight).
  PEFT's A is an ungrouped conv of rank ``R`` and its B a grouped 1x1 conv. adaptc's adapter
  is exactly PEFT's with ``R = r * g`` and A block-diagonal, with alpha scaled to keep
  ``alpha / R``; PEFT adapters whose A mixes groups cannot be represented and are refused.
- DoRA's magnitude on a convolution: adaptc ``[out]``, PEFT ``[1, out, 1, ...]``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError

PREFIX = "base_model.model."
# PEFT's key suffix -> adaptc's parameter name (the same names, PEFT adds ``.weight`` to modules).
_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_embedding_A",
    ".lora_embedding_B": "lora_embedding_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
}
_KEY_SUFFIX = {param: suffix for suffix, param in _SUFFIXES.items()}

# PEFT options that change what the adapted model computes and that adaptc does not implement.
# Loading such an adapter while ignoring them would give other outputs, so it is refused.
_UNSUPPORTED = {
    "modules_to_save": "full copies of whole modules trained beside the LoRA",
    "trainable_token_indices": "trainable embedding rows",
    "layer_replication": "duplicated layers",
    "lora_bias": "a trainable bias on lora_B",
    "use_qalora": "QALoRA's pooled input",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
}
# Every field of PEFT 0.21's LoraConfig, and adaptc's own block. Another field is from a newer PEFT or a
# typo: PEFT ignores it with a warning, and so does adaptc, naming it (refusing would refuse adapters
# saved by a newer PEFT; the fields that change outputs are refused above, in _UNSUPPORTED).
_KNOWN_FIELDS = frozenset("""
    adaptc alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path bias corda_config
    ensure_weight_tying eva_config exclude_modules fan_in_fan_out inference_mode init_lora_weights kasa_config
    layer_replication layers_pattern layers_to_transform loftq_config lora_alpha lora_bias lora_dropout lora_ga_config
    megatron_config megatron_core modules_to_save monteclora_config peft_type peft_version qalora_group_size r
    rank_pattern revision runtime_config target_modules target_parameters task_type trainable_token_indices
    use_bdlora use_dora use_qalora use_rslora velora_config
""".split())
# init_lora_weights values after which the adapter belongs to a changed base model (PEFT's names).
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")


def key_for(site_name: str, param: str) -> str:
    return f"{PREFIX}{site_name}{_KEY_SUFFIX[param]}"


def parse_key(key: str) -> tuple[str, str] | None:
    """(module path, adaptc parameter name) of a PEFT LoRA key; None when it is not one."""
    if not key.startswith(PREFIX):
        return None
    for suffix, param in _SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(PREFIX) + len(suffix):
            return key[len(PREFIX) : -len(suffix)], param
    return None


def exact_pattern(name: str) -> str:
    """A rank/alpha pattern key (and target regex) that matches this one module path only.

    Under PEFT's rule ``(.*\\.)?(key)$`` a bare name also matches longer paths ending with it;
    the anchors stop that.
    """
    return f"^{re.escape(name)}$"


def pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", name):
            return value
    return default


# --- the config file ------------------------------------------------------------------------

@dataclass
class FileLora:
    """The LoRA settings a PEFT config states, read the way PEFT reads them."""

    r: int
    alpha: float
    rslora: bool
    use_dora: bool
    rank_pattern: dict
    alpha_pattern: dict

    def rank(self, module: str) -> int:
        return pattern_value(self.rank_pattern, module, self.r)

    def scaling(self, module: str, rank: int) -> float:
        alpha = pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def read_file_lora(config: dict, path: str) -> FileLora:
    """Check a parsed adapter_config.json and return its LoRA settings; raises CheckpointError."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: peft_type is {peft_type!r}; adaptc loads LoRA adapters (peft_type 'LORA') only"
        )
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise CheckpointError(
                f"{path}: {field}={config[field]!r} ({what}) is a PEFT feature adaptc does not implement; "
                "loading the adapter without it would compute other outputs"
            )
    unknown = sorted(k for k in config if k not in _KNOWN_FIELDS)
    if unknown:
        warnings.warn(f"adaptc: {path}: unknown field(s) {', '.join(map(repr, unknown))} ignored (from a newer PEFT, "
                      "or a typo); check the adapter loads as intended", UserWarning, stacklevel=4)
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{path}: bias={config['bias']!r} means PEFT also trained the base model's biases; "
            "adaptc trains and loads LoRA matrices only (bias='none')"
        )
    try:
        file_lora = FileLora(
            r=_positive(config.get("r", 8), int, "r"),
            alpha=_positive(config.get("lora_alpha", 8), (int, float), "lora_alpha"),
            rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
        )
        for key, value in {**file_lora.rank_pattern, **file_lora.alpha_pattern}.items():
            re.compile(key)
            _positive(value, (int, float), f"pattern {key!r}")
    except (ValueError, TypeError, re.error) as exc:
        raise CheckpointError(f"{path}: invalid LoRA settings: {exc}") from None
    return file_lora


def _positive(value: Any, kind: Any, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return value


def residual_init(config: dict) -> str | None:
    """The init name when the adapter was initialised from (and subtracted from) the base weights."""
    own = config.get("adaptc")
    stated = own.get("config") if isinstance(own, dict) else None
    init = stated.get("init") if isinstance(stated, dict) else config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        return init
    return None


def peft_fields(config: Any, sites: list, rank: dict[str, int], alpha: dict[str, float]) -> dict[str, Any]:
    """PEFT's config fields for an adaptc LoraConfig adapting exactly ``sites``.

    ``target_modules`` lists the adapted modules by full path instead of repeating the user's
    selector: PEFT would resolve a selector over its own candidate modules (``all-linear``
    there includes a classifier head and excludes 1x1 convs), so only the explicit list is
    guaranteed to pick the same modules. ``rank`` / ``alpha`` hold PEFT-side values that
    differ from the patterns (grouped convs); they come first so that they win.
    """
    rank_pattern = {exact_pattern(name): value for name, value in rank.items()} | dict(config.rank_pattern)
    alpha_pattern = {exact_pattern(name): value for name, value in alpha.items()} | dict(config.alpha_pattern)
    init = {"gaussian": "gaussian"}.get(config.init, True)  # PiSSA must not run again on load
    return {
        "peft_type": "LORA",
        "task_type": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": [site.name for site in sites],
        "exclude_modules": None,
        "layers_to_transform": None,  # already applied: target_modules is the final list
        "layers_pattern": None,
        "fan_in_fan_out": any(site.fan_in_fan_out for site in sites),
        "bias": "none",
        "lora_bias": False,
        "use_rslora": config.rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": init,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
    }


# --- tensor layouts -------------------------------------------------------------------------

def peft_shapes(site: Any, rank: int, use_dora: bool) -> dict[str, tuple[int, ...]]:
    """The shapes PEFT stores for a rank-``rank`` LoRA at ``site``."""
    if site.kind == "embedding":
        return {"lora_embedding_A": (rank, site.in_features), "lora_embedding_B": (site.out_features, rank)}
    if site.kind == "linear":
        shapes = {"lora_A": (rank, site.in_features), "lora_B": (site.out_features, rank)}
        magnitude: tuple[int, ...] = (site.out_features,)
    else:
        groups, ones = site.conv["groups"], (1,) * site.conv["dims"]
        shapes = {
            "lora_A": (rank, site.in_features, *site.weight_shape[2:]),
            "lora_B": (site.out_features, rank // groups, *ones),
        }
        magnitude = (1, site.out_features, *ones)
    if use_dora:
        shapes["lora_magnitude_vector"] = magnitude
    return shapes


def peft_difference(site: Any, use_dora: bool) -> str | None:
    """Why PEFT would compute something else than adaptc for this site's adapter, if it would (peft 0.21)."""
    if site.kind != "conv":
        return None
    if any(d != 1 for d in site.conv["dilation"]):
        return "PEFT's LoRA A ignores the convolution's dilation"
    if use_dora and site.conv["groups"] > 1:
        return "PEFT's DoRA computes the weight norm of a grouped convolution without its groups"
    return None


def conv_groups(site: Any) -> int:
    return site.conv["groups"] if site.kind == "conv" else 1


def to_peft(site: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """adaptc's tensors of one site in PEFT's layout (the rank grows ``groups`` times on grouped convs)."""
    out = dict(tensors)
    if site.kind != "conv":
        return out
    groups = site.conv["groups"]
    if "lora_magnitude_vector" in out:
        out["lora_magnitude_vector"] = out["lora_magnitude_vector"].reshape(1, -1, *([1] * site.conv["dims"]))
    if groups > 1:
        a = out["lora_A"]  # [r * g, in / g, *k]
        r, in_per_group = a.shape[0] // groups, a.shape[1]
        full = a.new_zeros(a.shape[0], in_per_group * groups, *a.shape[2:])
        for g in range(groups):
            full[g * r : (g + 1) * r, g * in_per_group : (g + 1) * in_per_group] = a[g * r : (g + 1) * r]
        out["lora_A"] = full
    return out


def from_peft(site: Any, tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """PEFT-layout tensors of one site (shapes already checked) in adaptc's layout."""
    out = dict(tensors)
    if site.kind != "conv":
        return out
    groups = site.conv["groups"]
    if "lora_magnitude_vector" in out:
        out["lora_magnitude_vector"] = out["lora_magnitude_vector"].reshape(-1)
    if groups > 1:
        a = out["lora_A"]  # [R, in, *k]
        r, in_per_group = a.shape[0] // groups, a.shape[1] // groups
        blocks = [a[g * r : (g + 1) * r, g * in_per_group : (g + 1) * in_per_group] for g in range(groups)]
        off_block = torch.ones(a.shape[:2], dtype=torch.bool)
        for g in range(groups):
            off_block[g * r : (g + 1) * r, g * in_per_group : (g + 1) * in_per_group] = False
        if a[off_block].any():
            raise CheckpointError(
                f"{key}: this LoRA on a grouped convolution (groups={groups}) mixes channels across groups "
                "(PEFT's layout: an ungrouped A). adaptc's LoRA keeps one update per group, so that it merges "
                "into the grouped weight, and cannot represent this adapter; leave this module out of "
                "target_modules in PEFT, or train the adapter with adaptc"
            )
        out["lora_A"] = torch.cat(blocks, dim=0)
    return out
