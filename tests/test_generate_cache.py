"""``am.generate`` with the key/value cache, against independent references.

- LoRA: the tokens of PEFT's own ``PeftModel.generate`` with the same adapter file (greedy, beam
  search, sampling with a fixed seed), on five causal-LM families.
- Prompt tuning, P-tuning, prefix tuning: a whole-sequence recompute through the adapted forward
  (greedy), whose logits are PEFT's (tests/test_peft_parity.py). PEFT's own generate is no reference
  there: PEFT 0.21.2's prefix-tuning generate on Llama returns the base model's tokens.
- Mixed-adapter batches: each row equals that row generated alone with its adapter, and PEFT's
  ``generate(adapter_names=...)``.

Every test also checks that the cache was used: each step after the first gets one new token.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import CAUSAL_LMS, step_lengths
from peft import PeftModel

import adaptc

pytestmark = pytest.mark.integration

FAMILIES = {name: CAUSAL_LMS[name] for name in ("gpt2", "llama", "mistral", "falcon", "qwen3")}
_OPTIONS = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3),
    "sampling": dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
}


def randomise(am, std=0.3):
    """Make the adapters matter: LoRA's B (zero at init), every parameter of the prompt methods."""
    with torch.no_grad():
        for name, p in am.adapters.named_parameters():
            if "lora_A" not in name:
                p.normal_(0, std)


def prompt_batch(length=9, batch=3):
    """A batch sliced out of a larger one (not contiguous), with a left-padded first row."""
    ids = torch.randint(3, 90, (batch + 1, length + 4))[1:, 2:2 + length]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.fixture(params=list(FAMILIES))
def lora_pair(request, tmp_path):
    """An adapted model and PEFT's model of the same base with the same adapter file."""
    torch.manual_seed(0)
    base = FAMILIES[request.param]().eval()
    reference = copy.deepcopy(base)
    ids, _ = prompt_batch()
    am = adaptc.inject(base, "lora", example_inputs={"input_ids": ids[:2, :5]}, r=4)
    randomise(am)
    am.eval()
    am.save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(reference, tmp_path).eval()
    return am, peft_model


@pytest.mark.parametrize("how", list(_OPTIONS))
def test_lora_generate_equals_peft(lora_pair, how):
    am, peft_model = lora_pair
    ids, mask = prompt_batch()
    options = dict(max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **_OPTIONS[how])
    torch.manual_seed(7)
    with step_lengths(am) as lengths:
        got = am.generate(input_ids=ids, attention_mask=mask, **options)
    torch.manual_seed(7)
    want = peft_model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(got, want)
    assert lengths[0] == ids.shape[1] and set(lengths[1:]) == {1}
    with am.disable_adapters():
        torch.manual_seed(7)
        base = am.generate(input_ids=ids, attention_mask=mask, **options)
    assert not torch.equal(got, base)


def test_cached_generation_at_other_batch_sizes_and_lengths():
    """The prefill and one-token graphs serve every later prompt shape, a one-token prompt included."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]().eval()
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": torch.randint(3, 90, (2, 5))}, r=4)
    randomise(am)
    am.eval()
    for batch, length in ((1, 1), (1, 7), (4, 3), (2, 12)):
        ids = torch.randint(3, 90, (batch, length))
        got = am.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        want = am.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(got, want), (batch, length)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_prompt_methods_generate_equals_a_whole_sequence_recompute(family, method):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids, _ = prompt_batch(length=7, batch=2)
    mask = torch.ones_like(ids)  # the hand loop below gives a padded row no position ids: no padding here
    am = adaptc.inject(model, method, example_inputs={"input_ids": ids, "attention_mask": mask}, num_virtual_tokens=4)
    randomise(am, std=1.0)
    am.eval()
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with step_lengths(am) as lengths:
        got = am.generate(input_ids=ids, attention_mask=mask, **options)
    assert set(lengths[1:]) == {1}
    # The reference: greedy by hand, each token from the adapted forward over the whole sequence.
    sequence, current = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(8):
            logits = am(input_ids=sequence, attention_mask=current).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            current = torch.cat([current, current.new_ones(current.shape[0], 1)], dim=1)
    assert torch.equal(got, sequence)
    with am.disable_adapters():
        base_logits = am(input_ids=sequence, attention_mask=current).logits
    assert not torch.allclose(base_logits, am(input_ids=sequence, attention_mask=current).logits, atol=1e-3)


def test_beam_search_with_prefix_tuning_matches_the_recompute_path():
    torch.manual_seed(0)
    model = FAMILIES["llama"]().eval()
    ids, mask = prompt_batch(length=6, batch=2)
    am = adaptc.inject(model, "prefix", example_inputs={"input_ids": ids, "attention_mask": mask}, num_virtual_tokens=3)
    randomise(am, std=1.0)
    am.eval()
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    got = am.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(got, am.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options))


@pytest.fixture
def two_adapters(tmp_path):
    """Adapters "a" (r=4) and "b" (r=8) on one Llama, and PEFT's model with the same two files."""
    torch.manual_seed(0)
    base = FAMILIES["llama"]().eval()
    reference = copy.deepcopy(base)
    am = adaptc.inject(base, "lora", example_inputs={"input_ids": torch.randint(3, 90, (2, 5))}, r=4, adapter_name="a")
    am.add_adapter("b", "lora", r=8)
    randomise(am)
    am.eval()
    am.save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    return am, peft_model.eval()


@pytest.mark.parametrize("how", ["greedy", "beams"])
def test_mixed_adapter_generation_equals_each_row_alone_and_peft(two_adapters, how):
    am, peft_model = two_adapters
    ids, mask = prompt_batch(length=6, batch=4)
    names = ["a", "b", "__base__", "b"]
    options = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **_OPTIONS[how])
    active = am.active_adapters
    with step_lengths(am) as lengths:
        got = am.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **options)
    assert set(lengths[1:]) == {1}
    assert am.active_adapters == active
    assert torch.equal(got, peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **options))
    for row, name in enumerate(names):
        alone = dict(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **options)
        if name == "__base__":
            with am.disable_adapters():
                want = am.generate(**alone)
        else:
            am.set_adapter(name)
            want = am.generate(**alone)
        assert torch.equal(got[row], want[0])
    assert len({tuple(row.tolist()) for row in got[:, ids.shape[1]:]}) > 1


def test_mixed_adapter_names_are_checked_before_generating(two_adapters):
    am, _ = two_adapters
    ids = torch.randint(3, 90, (2, 5))
    with pytest.raises(adaptc.ConfigError, match="unknown adapter"):
        am.generate(input_ids=ids, max_new_tokens=2, adapter_names=["a", "nope"])
    with pytest.raises(adaptc.InputError):
        am.generate(input_ids=ids, max_new_tokens=2, adapter_names=["a", "b", "a"])


def test_grouped_query_attention_reads_the_cache_without_repeating_it():
    """Generation graphs hand the attention op the cached keys and values as they are (enable_gqa)
    instead of a copy repeated per query head; the tokens stay those of the recompute path."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]().eval()  # 4 query heads, 2 key/value heads
    ids = torch.randint(3, 90, (2, 6))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=4)
    randomise(am)
    am.eval()
    got = am.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    rewritten = [sum(1 for n in g.graph.nodes if getattr(n.target, "__name__", "") == "gqa_attention")
                 for g in am.all_graphs()]
    assert sorted(rewritten) == [0, 2, 2]  # the example's graph keeps its op; prefill and one-token graphs
    assert torch.equal(got, am.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                        use_cache=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_users_own_decoding_loop_with_one_cache_object(family, keyword):
    """A loop that passes the same cache object at every step (transformers grows it in place), under
    either keyword: each step's logits equal the whole-sequence forward's."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    ids = torch.randint(3, 90, (2, 6))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=4)
    randomise(am)
    am.eval()
    cache = DynamicCache()
    sequence, step_ids = ids, ids
    with torch.no_grad():
        for _ in range(4):
            out = am(input_ids=step_ids, **{keyword: cache}, use_cache=True)
            whole = am(input_ids=sequence).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], whole, atol=1e-5, rtol=1e-5)
            step_ids = out.logits[:, -1:].argmax(-1)
            sequence = torch.cat([sequence, step_ids], dim=1)
    assert cache.get_seq_length() == sequence.shape[1] - 1
