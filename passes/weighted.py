"""Combine existing LoRA adapters into a new one (PEFT's ``add_weighted_adapter``).

``linear``: same rank; A = sum(sign * sqrt(|w s|) A_i), B = sum(sqrt(|w s|) B_i) — cheap, and only
exact for a single adapter. ``cat``: rank = sum of ranks; A = [w_i s_i A_i], B = [B_i] — exact.
``svd``: sum(w_i * delta_i) truncated to ``svd_rank`` (default: the largest rank) — exact up to the
truncation. The new adapter has ``alpha = r`` (scale 1), as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from adaptc.config import LoraConfig
from adaptc.errors import ConfigError

from .lora import RankDeficientWarning
from .sites import site_key

if TYPE_CHECKING:
    from adaptc.model import AdaptedModel

COMBINATIONS = ("linear", "cat", "svd")


def _ranks(config: LoraConfig) -> int:
    # PEFT's rule: an adapter's rank is the largest of r and its rank_pattern values.
    return max([config.r, *config.rank_pattern.values()])


def add_weighted_adapter(
    am: AdaptedModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """Add ``adapter_name`` combining ``adapters`` with ``weights``; the active adapters stay as they were."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(f"need one weight per adapter, got adapters={adapters} and weights={weights}")
    unknown = [a for a in adapters if a not in am.adapters]
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}; this model has: {', '.join(am.adapters)}")
    if combination not in COMBINATIONS:
        raise ConfigError(f"combination must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    configs = [am.adapter_configs()[a] for a in adapters]
    if any(not isinstance(c, LoraConfig) for c in configs):
        raise ConfigError("add_weighted_adapter combines LoRA adapters only")
    if any(c.use_dora for c in configs):
        # A DoRA adapter's output is rescaled by its magnitude: its update is not B A alone.
        raise ConfigError("add_weighted_adapter cannot combine DoRA adapters (their update is not scale * B A)")
    if len(adapters) == 1:
        combination = "linear"  # PEFT does the same: one adapter is exact with linear
    ranks = [_ranks(c) for c in configs]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination='linear' needs adapters of one rank, got ranks {dict(zip(adapters, ranks))}; use 'cat' or 'svd'")
        new_rank = ranks[0]
    elif combination == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    # The union of the adapted sites, in the model's site order; targeted by exact name.
    names: list[str] = []
    for a in adapters:
        names += [s.name for s in am.adapter_sites(a) if s.name not in names]
    targets = "|".join(re.escape(n) for n in names)
    layers_of = {a: am.adapters[a] for a in adapters}
    for name in names:
        sources = [layers_of[a][site_key(name)] for a in adapters if site_key(name) in layers_of[a]]
        if combination != "linear" and any(s.kind == "conv" and s.conv["groups"] != 1 for s in sources):
            raise ConfigError(f"combination={combination!r} does not support grouped convolution {name}; use 'linear'")
        if combination == "linear" and any(s.r != new_rank for s in sources):
            raise ConfigError(f"combination='linear' needs one rank per site; {name} has ranks {[s.r for s in sources]}")

    config = dataclasses.replace(
        configs[0], r=new_rank, alpha=float(new_rank), targets=targets, exclude=None, layers=None,
        layers_pattern=None, rank_pattern={}, alpha_pattern={}, init="default",
        rslora=False,  # scale 1 exactly (PEFT keeps use_rslora, which would scale by sqrt(r))
    )
    before = am.active_adapters
    with warnings.catch_warnings():
        if svd_rank is None:  # a rank the sources imply (cat: their sum) may exceed a weight's: valid, as in PEFT
            warnings.simplefilter("ignore", RankDeficientWarning)
        am.add_adapter(adapter_name, config)  # validates everything before changing the model
    try:
        with torch.no_grad():
            for name in names:
                _combine(am, adapters, weights, name, am.adapters[adapter_name][site_key(name)], combination)
    finally:
        if before:
            am.set_adapter(before)  # like PEFT: the new adapter is added, not activated


def _ab(layer) -> tuple[torch.Tensor, torch.Tensor]:
    if layer.kind == "embedding":
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A, layer.lora_B


def _combine(am, adapters, weights, name, target, combination) -> None:
    key = site_key(name)
    pairs = [(am.adapters[a][key], w) for a, w in zip(adapters, weights) if key in am.adapters[a]]
    new_a, new_b = _ab(target)
    new_a.zero_()
    new_b.zero_()
    if combination == "linear":
        for layer, w in pairs:
            a, b = _ab(layer)
            ws = w * layer.scaling
            new_a += math.copysign(math.sqrt(abs(ws)), ws) * a
            new_b += math.sqrt(abs(ws)) * b
    elif combination == "cat":
        a = torch.cat([_ab(layer)[0] * (w * layer.scaling) for layer, w in pairs], dim=0)
        b = torch.cat([_ab(layer)[1] for layer, _ in pairs], dim=1)
        new_a[: a.shape[0]] = a
        new_b[:, : b.shape[1]] = b
    else:
        delta = sum(w * layer.delta_weight() for layer, w in pairs)  # shaped like the stored weight
        if target.kind == "conv":
            delta = delta.flatten(1)  # [out, in * k...] (groups == 1 checked above)
        elif target.kind == "embedding" or target.fan_in_fan_out:
            delta = delta.T  # now [out, in] for linear, [dim, num] for embedding: B @ A
        U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
        r = min(target.r, S.shape[0])
        new_b.view(new_b.shape[0], -1)[:, :r] = (U[:, :r] * S[:r]).to(new_b.dtype)
        new_a.view(new_a.shape[0], -1)[:r] = Vh[:r].to(new_a.dtype)
