"""``am.generate`` on every causal-LM family users fine-tune: the adapted tokens, never the base model's.

The reference is the merged model's own ``generate`` (transformers' code, with its KV cache).
Every family generates with the key/value cache (steps after the first run one token), but two
that recompute the sequence: Mistral with a sliding window shorter than the generation, and MPT,
whose config says use_cache=False (transformers' own generate keeps no cache for it either).
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import CAUSAL_LMS, step_lengths

import adaptc

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FAMILIES = CAUSAL_LMS


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_equals_the_merged_model_and_not_the_base(family):
    model = FAMILIES[family]().eval()
    ids = torch.randint(3, 90, (2, 10))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids[:, :6]}, r=4)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with step_lengths(am) as lengths:
        got = am.generate(input_ids=ids, **options)
    assert lengths[0] == ids.shape[1]
    cached = family not in ("mistral-short-window", "mpt")
    assert set(lengths[1:]) == ({1} if cached else set(range(11, 18)))
    with am.disable_adapters():
        base = am.generate(input_ids=ids, **options)
    assert torch.equal(got, am.merge().generate(input_ids=ids, **options))
    assert not torch.equal(got, base)


_EAGER_ATTENTION = ("mpt", "gemma2")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_methods_generate_with_the_cache_as_without(family, method):
    """The cached steps (virtual tokens at the first step; the prefix at every step) give the tokens of
    the whole-sequence recompute through the adapted forward."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(3, 90, (2, 7))
    if family in _EAGER_ATTENTION:  # attention computed by hand (ALiBi; soft-capping): no SDPA op to extend
        with pytest.raises(adaptc.TargetError, match="no attention op"):
            adaptc.inject(model, method, example_inputs={"input_ids": ids}, num_virtual_tokens=3)
        return
    am = adaptc.inject(model, method, example_inputs={"input_ids": ids}, num_virtual_tokens=3)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.normal_(0, 1.0)
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with step_lengths(am) as lengths:
        got = am.generate(input_ids=ids, **options)
    assert set(lengths[1:]) == ({1} if family not in ("mistral-short-window", "mpt") else set(range(8, 13)))
    assert torch.equal(got, am.generate(input_ids=ids, use_cache=False, **options))
