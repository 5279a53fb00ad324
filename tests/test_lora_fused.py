"""Sibling fusion (passes/lora_fused.py): one LoRA node per group of linear sites reading the same input."""

from __future__ import annotations

import math

import pytest
import torch
from adaptc.passes.dropout_mask import effective_keep, keep_mask
from adaptc.passes.lora_fused import SIBLINGS_ATTR
from model_zoo import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from torch.nn import functional as F

import adaptc


class Attention(nn.Module):
    """q, k, v read the same input (siblings); o reads another: three nodes fuse, o stays a group of one."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(F.scaled_dot_product_attention(q, k, v))


def _inject(model: nn.Module, x: torch.Tensor, **options) -> adaptc.AdaptedModel:
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["q", "k", "v", "o"], r=4, alpha=8,
                       init="gaussian", **options)
    with torch.no_grad():  # B is zero at init: give it values so the update is visible
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return am


def _groups(am: adaptc.AdaptedModel) -> list[int]:
    am.train()
    am(torch.randn(2, 5, 24))
    owner = getattr(am.graph_module, SIBLINGS_ATTR)
    return sorted(len(group.layers) for group in owner.values())


def test_siblings_share_one_node():
    torch.manual_seed(0)
    am = _inject(Attention(), torch.randn(2, 5, 24))
    assert _groups(am) == [1, 3]


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "base-op-apart"])
def test_fused_forward_and_grads_equal_the_hand_computation_with_dropout(absorbed):
    """Reference: LoRA written out by hand with the same mask (drawn by keep_mask from the same seed).
    With a trainable base weight the group cannot absorb the base ops (_SiblingLora instead of
    _AbsorbedSiblings): both paths apply the mask forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24)
    model = Attention()
    p = 0.25
    am = _inject(model, x, dropout=p).train()
    if not absorbed:
        model.k.weight.requires_grad_(True)
    am(x)  # capture the train graph first: capture runs the model, which draws masks
    torch.manual_seed(7)
    xg = x.clone().requires_grad_(True)
    out = am(xg)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()

    layers = {name.split(".")[-1]: layer for name, layer in am.adapters["default"].items()}
    torch.manual_seed(7)
    keep_qkv = keep_mask(torch.Size([10, 24]), p, x.device).reshape(2, 5, 24)
    keep_o = keep_mask(torch.Size([10, 24]), p, x.device).reshape(2, 5, 24)
    inverse = 1 / effective_keep(p)
    params = {k: {n: t.detach().clone().requires_grad_(True) for n, t in layer.named_parameters()}
              for k, layer in layers.items()}
    xr = x.clone().requires_grad_(True)

    def lora(name: str, inp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        base = getattr(model, name)
        a, b = params[name]["lora_A"], params[name]["lora_B"]
        scale = layers[name].scaling
        return base(inp) + scale * ((inp * keep * inverse) @ a.T) @ b.T

    q, k, v = (lora(n, xr, keep_qkv) for n in "qkv")
    expected = lora("o", F.scaled_dot_product_attention(q, k, v), keep_o)
    (expected * weights).sum().backward()

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for name, layer in layers.items():
        for pname, param in layer.named_parameters():
            torch.testing.assert_close(param.grad, params[name][pname].grad, atol=1e-5, rtol=1e-4)


def test_keep_mask_rate_and_independence():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400, 1000]), 0.1, torch.device("cpu"))
    assert mask.dtype == torch.bool
    rate = mask.float().mean().item()
    assert abs(rate - effective_keep(0.1)) < 5 * math.sqrt(0.09 / mask.numel())
    # Neighbouring lanes come from one 64-bit draw: they must still be uncorrelated.
    lanes = mask.flatten().float()
    correlation = torch.corrcoef(torch.stack([lanes[0::4], lanes[1::4]]))[0, 1].item()
    assert abs(correlation) < 0.01
    assert abs(effective_keep(0.05) - 0.95) < 1 / 65536


def test_fused_equals_unfused_on_llama_gqa_and_peft_checkpoint_unchanged(tmp_path):
    """Reference: the same adapter with fuse_siblings=False (one plain node per site)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        am = adaptc.inject(tiny_llama(max_position_embeddings=2048), "lora", example_inputs=batch, r=4, alpha=8, init="gaussian",
                           fuse_siblings=fuse).train()
        with torch.no_grad():
            for name, p in am.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        out = am(**batch)
        out.loss.backward()
        grads = {n: p.grad for n, p in am.named_parameters() if p.requires_grad}
        am.save_adapter(tmp_path / str(fuse))
        results[fuse] = (out.logits.detach(), grads, am)
    (fused_logits, fused_grads, fused), (plain_logits, plain_grads, _) = results[True], results[False]
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) == 2 * 7 * 2
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4)
    # q/k/v and gate/up per layer fuse: 2 layers x (qkv, o, gate+up, down) = 8 groups.
    assert sorted(len(g.layers) for g in getattr(fused.graph_module, SIBLINGS_ATTR).values()) == [1] * 4 + [2] * 2 + [3] * 2
    from safetensors.torch import load_file

    saved_fused = load_file(tmp_path / "True" / "adapter_model.safetensors")
    saved_plain = load_file(tmp_path / "False" / "adapter_model.safetensors")
    assert saved_fused.keys() == saved_plain.keys()  # the same PEFT keys: fusion is not in the checkpoint
    for key, value in saved_plain.items():
        torch.testing.assert_close(saved_fused[key], value, atol=0, rtol=0)


def test_disable_and_delete_adapter_restore_the_base_model():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24)
    model = Attention()
    with torch.no_grad():
        reference = model(x)
    am = _inject(model, x).eval()
    assert not torch.allclose(am(x), reference, atol=1e-3)
    with am.disable_adapters():
        torch.testing.assert_close(am(x), reference)
    am.delete_adapter("default")
    torch.testing.assert_close(am(x), reference)
    assert len(getattr(am.graph_module, SIBLINGS_ATTR)) == 0


@pytest.mark.slow
def test_torch_compile_of_a_fused_adapted_model_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24)
    am = _inject(Attention(), x).train()
    eager = am(x)
    eager.sum().backward()
    expected = {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}
    am.zero_grad()
    compiled = torch.compile(am)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(am.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_as_close_to_fp32_as_the_plain_nodes():
    """Reference: the plain nodes in fp32. Under bf16 autocast the fused nodes must not be further
    from it than the plain nodes under the same autocast (both round to bf16's 8 bits)."""
    x = torch.randn(2, 5, 24)
    results = {}
    for fuse, autocast in ((True, True), (False, True), (False, False)):
        torch.manual_seed(0)
        am = _inject(Attention(), x, fuse_siblings=fuse).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = am(x)
        out.float().sum().backward()
        results[fuse, autocast] = (out.float(), {n: p.grad for n, p in am.named_parameters() if p.requires_grad})
    (fused, fused_grads), (plain, plain_grads) = results[True, True], results[False, True]
    reference, reference_grads = results[False, False]
    assert (fused - reference).abs().max() <= 2 * (plain - reference).abs().max() + 1e-3
    for name, grad in reference_grads.items():
        assert fused_grads[name].dtype == torch.float32
        scale = grad.abs().max()
        assert (fused_grads[name] - grad).abs().max() <= 2 * (plain_grads[name] - grad).abs().max() + 1e-3 * scale


def _absorbed_ops(am: adaptc.AdaptedModel) -> int:
    from adaptc.passes.lora_fused import ABSORBED

    return sum(ABSORBED in node.meta for node in am.graph_module.graph.nodes)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_absorbed_base_ops_match_the_unfused_graph_with_input_grads(family):
    """Reference: fuse_siblings=False (the frozen ops as their own nodes, one LoRA node per site).
    GPT-2's Conv1D runs as addmm(bias, x, W[in, out]), BERT's Linear as linear(x, W, bias): the
    fused group computes both ops itself and must give the same outputs and gradients, the
    gradient of the input (the summed dx of q, k, v and the low-rank branch) included."""
    from transformers import BertModel, GPT2Model

    torch.manual_seed(0)
    if family == "gpt2":
        make = lambda: tiny_gpt2(GPT2Model, vocab_size=50, n_positions=16)  # noqa: E731
    else:
        make = lambda: tiny_bert(BertModel, vocab_size=50, max_position_embeddings=512, num_labels=2)  # noqa: E731
    embeds = torch.randn(2, 7, 32)
    results = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        am = adaptc.inject(make(), "lora", example_inputs={"inputs_embeds": embeds}, r=4, alpha=8,
                           init="gaussian", fuse_siblings=fuse).train()
        with torch.no_grad():
            for name, p in am.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        x = embeds.clone().requires_grad_(True)
        out = am(inputs_embeds=x).last_hidden_state
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad for n, p in am.named_parameters() if p.requires_grad}
        results[fuse] = (out.detach(), x.grad, grads, _absorbed_ops(am))
    (out_f, dx_f, grads_f, absorbed), (out_p, dx_p, grads_p, _) = results[True], results[False]
    assert absorbed > 0
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_f, dx_p, atol=1e-5, rtol=1e-4)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4)


def test_an_unfrozen_base_weight_still_gets_its_gradient():
    """A base weight made trainable after inject: the group must not swallow its gradient.
    Reference: the same model and adapter with fuse_siblings=False (plain autograd through the op)."""
    x = torch.randn(2, 5, 24)
    grads = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        model = Attention()
        am = _inject(model, x, fuse_siblings=fuse).train()
        model.q.weight.requires_grad_(True)
        model.v.bias.requires_grad_(True)
        am(x).sum().backward()
        grads[fuse] = (model.q.weight.grad, model.v.bias.grad, _absorbed_ops(am))
    (q_fused, v_fused, absorbed), (q_plain, v_plain, _) = grads[True], grads[False]
    assert absorbed > 0 and q_plain is not None and v_plain is not None
    torch.testing.assert_close(q_fused, q_plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v_fused, v_plain, atol=1e-5, rtol=1e-4)
