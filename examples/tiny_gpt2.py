"""A model file for the adaptc command line: a 2-layer GPT-2 built from a config (no download).

    adaptc inspect examples/tiny_gpt2.py
    adaptc inject examples/tiny_gpt2.py --method lora --r 8
    adaptc generate examples/tiny_gpt2.py --prompt "the cat sat on" --max-new-tokens 8

A model file defines ``build_model()`` (the ``nn.Module``) and ``example_inputs()`` (the
inputs of one typical call); ``adaptc generate`` also needs ``tokenizer()``. The weights are
random, so the generated words are too.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 128
# A word-level vocabulary of exactly VOCAB entries; id 0 is GPT-2's <|endoftext|> (BOS and EOS here).
WORDS = """
the a an and or but of to in on at by for with from up down over under is was are were be been has had have do did
not no yes it he she they we you i me him her them my your our their this that these those here there when where why how
what who which one two three four five six seven eight nine ten cat dog bird fish tree house sun moon star sky sea river
road city king queen child man woman friend day night time year old new big small good bad red blue green white black
sat ran saw went came said made took gave found left looked walked sang slept ate drank then all very
""".split()


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


def tokenizer():
    """A transformers tokenizer over WORDS (lower-cased, split on spaces and punctuation), for `adaptc generate`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<|endoftext|>", "<unk>", *WORDS])}
    assert len(vocab) == VOCAB
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
