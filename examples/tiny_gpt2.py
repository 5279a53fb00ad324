"""A model file for the adaptc command line: a 2-layer GPT-2 built from a config (no download).

    adaptc inspect examples/tiny_gpt2.py
    adaptc inject examples/tiny_gpt2.py --method lora --r 8

A model file defines ``build_model()`` (the ``nn.Module``) and ``example_inputs()`` (the
inputs of one typical call).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 128


def build_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)  # the same random weights every run
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,  # GPT-2's defaults (50256) lie outside this tiny vocabulary
    )
    return GPT2LMHeadModel(config).eval()


def example_inputs() -> dict[str, torch.Tensor | bool]:
    # use_cache=False: a cache object in the output cannot be captured (see docs/architecture.md).
    input_ids = torch.arange(2 * 16).reshape(2, 16) % VOCAB
    return {"input_ids": input_ids, "use_cache": False}
