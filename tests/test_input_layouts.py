"""Inputs of any layout: slices of a batch, contiguous copies, transposed tensors.

A graph captured from a view (a slice of a batch) must run contiguous inputs of other sizes and the
other way round, in both modes, and every result must equal the eager model's (the merged model, an
independent reference: transformers' own forward with the adapters folded into its weights).
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import tiny_llama, tiny_opt
from torch import nn
from transformers import LlamaForCausalLM

import adaptc


def _randomize_lora(am: adaptc.AdaptedModel) -> None:
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def _llama() -> LlamaForCausalLM:
    return tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=96, max_position_embeddings=2048).eval()


@pytest.mark.integration  # by time (make test-unit under 2 minutes): a Llama end to end
def test_llama_captured_with_a_mask_runs_a_slice_then_a_contiguous_input_of_another_length():
    ids = torch.randint(3, 96, (2, 12))
    am = adaptc.inject(_llama(), "lora", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, r=4)
    _randomize_lora(am)
    am.eval()
    calls = [ids[:, :6], ids[:, :7].contiguous(), ids[1:, 2:9], ids[:, :5].contiguous(), ids.t().t()[:, ::2]]
    with torch.no_grad():
        adapted = [am(input_ids=x).logits for x in calls]
        merged = am.merge()
        for x, got in zip(calls, adapted):
            want = merged(input_ids=x.contiguous()).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): transformers' generate
def test_greedy_generation_from_a_sliced_prompt_matches_the_merged_model():
    ids = torch.randint(3, 96, (2, 12))
    am = adaptc.inject(_llama(), "lora", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, r=4)
    _randomize_lora(am)
    got = adaptc.generate(am, ids[:, :6], max_new_tokens=5)
    merged = am.merge()
    want = merged.generate(input_ids=ids[:, :6].contiguous(), max_new_tokens=5, do_sample=False,
                           pad_token_id=0, attention_mask=torch.ones(2, 6, dtype=torch.long))
    assert torch.equal(got, want)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): an OPT end to end
def test_opt_captured_from_a_slice_trains_on_the_whole_batch():
    model = tiny_opt(hidden_size=64, ffn_dim=128, vocab_size=300, max_position_embeddings=128, word_embed_proj_dim=64,
                     dropout=0.0, attention_dropout=0.0)
    ids = torch.randint(0, 300, (8, 40))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids[:2, :16], "labels": ids[:2, :16]}, r=8,
                       targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    _randomize_lora(am)
    am.train()
    losses = {}
    for name, x in {"whole": ids, "slice": ids[3:6, 5:30], "copy": ids[3:6, 5:30].clone()}.items():
        out = am(input_ids=x, labels=x)
        out.loss.backward()
        losses[name] = out.loss.detach()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in am.parameters() if p.requires_grad)
    torch.testing.assert_close(losses["slice"], losses["copy"])
    am.eval()
    with torch.no_grad():
        adapted = am(input_ids=ids, labels=ids).loss
        reference = am.merge()(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=1e-5)


class _Flatten(nn.Module):
    """``reshape`` traced on a contiguous input becomes ``view``, which a transposed input breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(x.shape[0], -1))


def test_a_graph_captured_on_contiguous_inputs_runs_transposed_ones():
    model = _Flatten()
    am = adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 3, 4),), targets=["proj"], r=2)
    _randomize_lora(am)
    am.eval()
    transposed = torch.randn(5, 4, 3).transpose(1, 2)  # [5, 3, 4], not contiguous
    with torch.no_grad():
        got = am(transposed)
        want = am.merge()(transposed)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_captured_graph_alone_accepts_any_layout():
    ids = torch.randint(3, 96, (4, 12))
    model = _llama()
    graph = adaptc.capture(model, {"input_ids": ids[1:3, :8]})
    with torch.no_grad():
        for x in (ids[:, :10].contiguous(), ids[:2, 1:11], ids[:, :3]):
            torch.testing.assert_close(graph(input_ids=x).logits, model(input_ids=x.contiguous()).logits)
