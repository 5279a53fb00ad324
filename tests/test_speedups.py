"""passes/speedups.py: the frozen model's tanh-GELU and dropout rewritten, its math kept."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from adaptc.passes import speedups
from adaptc.passes.lora_fused import effective_keep
from model_zoo import tiny_gpt2, tiny_llama

import adaptc


def _gpt2(dropout: float = 0.0):
    return tiny_gpt2(n_positions=1024, n_head=2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0,
                     tie_word_embeddings=False, seed=0)


def _adapted_training_step(model):
    """LoRA on a copy of ``model`` with random B (a non-zero update), in training mode, run on a fixed batch."""
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    am = adaptc.inject(copy.deepcopy(model), "lora", example_inputs=batch, r=4, alpha=8, init="gaussian").train()
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return am, batch, am(**batch)


def _targets(am) -> list[str]:
    return [str(n.target) for n in am.graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
def test_gpt2_gelu_becomes_one_op_and_training_matches_peft(tmp_path):
    """Reference: PEFT on the eager model (which runs gelu_new written out), same adapter weights."""
    model = _gpt2()
    am, batch, out = _adapted_training_step(model)
    targets = _targets(am)
    am.eval()
    assert "aten.tanh.default" in _targets(am)  # evaluation graphs keep the model's own ops (bit-identical)
    am.train()
    assert "aten.gelu.default" in targets and "aten.tanh.default" not in targets and "aten.pow.Tensor_Scalar" not in targets

    _assert_training_matches_peft(model, am, batch, out, tmp_path, sites=2 * 4)


def _assert_training_matches_peft(model, am, batch, out, tmp_path, sites: int) -> None:
    """Logits and every LoRA gradient of ``am`` (already run on ``batch``: ``out``) against PEFT on the
    eager model with the same adapter weights."""
    import peft

    am.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True).train()
    expected = theirs(**batch)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    checked = 0
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            site = name.removeprefix("base_model.model.").split(".lora_")[0]
            pname = "lora_A" if ".lora_A." in name else "lora_B"
            layer = next(v for k, v in am.adapters["default"].items() if _same_site(k, site))
            torch.testing.assert_close(getattr(layer, pname).grad, p.grad, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked == 2 * sites


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
def test_llama_rms_norm_and_rope_become_one_op_each_and_training_matches_peft(tmp_path):
    """Reference: PEFT on the eager model (which runs LlamaRMSNorm and rotate_half written out), same adapter weights."""
    model = tiny_llama(max_position_embeddings=2048, seed=0)
    with torch.no_grad():  # norm weights away from 1, so a dropped weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    am, batch, out = _adapted_training_step(model)
    targets = _targets(am)
    assert targets.count(str(torch.nn.functional.rms_norm)) == 2 * 2 + 1, targets
    assert "aten.rsqrt.default" not in targets
    assert targets.count(str(speedups.rotary)) == 2 * 2 and "aten.neg.default" not in targets  # q and k, 2 layers
    am.eval()
    assert "aten.rsqrt.default" in _targets(am)  # evaluation graphs keep the model's own ops
    am.train()
    _assert_training_matches_peft(model, am, batch, out, tmp_path, sites=2 * 7)


def _same_site(key: str, site: str) -> bool:
    from adaptc.passes.sites import site_key

    return key == site_key(site)


def test_dropout_keeps_rate_scale_and_the_same_mask_backward():
    torch.manual_seed(0)
    x = torch.ones(300, 1000, requires_grad=True)
    y = speedups.dropout(x, 0.2, True)
    kept = y != 0
    scale = 1 / effective_keep(0.2)
    assert abs(kept.float().mean().item() - 0.8) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], scale))
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, torch.where(kept, 2.0 * scale, 0.0))  # the forward's mask, not a new one
    assert torch.equal(speedups.dropout(x, 0.2, False), x)  # evaluation: identity


def test_base_model_dropout_is_rewritten_and_still_drops():
    model = _gpt2(dropout=0.3)
    ids = torch.randint(0, 64, (2, 7))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=2).train()
    torch.manual_seed(0)
    first = am(input_ids=ids).logits
    second = am(input_ids=ids).logits
    assert any(t.startswith("<function dropout") for t in _targets(am))
    assert "aten.dropout.default" not in _targets(am)
    assert not torch.allclose(first, second)  # training mode still drops, with fresh masks per call
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(am(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
