"""Greedy generation for any causal language model, adapted or not, transformers or not.

Each step runs the whole sequence again (no key/value cache: a model of your own has no cache
layout adaptc could know), so time grows quadratically with the length. A transformers model
generates with its cache through ``am.generate`` (:mod:`adaptc.cached_generation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise InputError("generate needs a causal LM whose output has logits shaped [batch, sequence, vocab]")
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` greedily chosen tokens to ``input_ids`` and return the sequences.

    ``model``: an AdaptedModel (any method) or a plain causal LM taking ``input_ids`` (and
    ``attention_mask``). Rows that produced ``eos_token_id`` are padded with it; generation
    stops early once every row has. Runs in eval mode; the model's mode is restored.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor shaped [batch, sequence]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        ids, mask = input_ids, attention_mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            kwargs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
            next_token = _logits(model(**kwargs))[:, -1].argmax(dim=-1)
            if eos_token_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
                done |= next_token == eos_token_id
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return ids
    finally:
        for module, mode in modes.items():
            module.training = mode
