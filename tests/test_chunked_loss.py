"""The chunked LM-head loss (passes/chunked_loss.py, ``am.chunked_loss()``).

Loss and gradients are checked against an independent reference: the plain graph's logits (chunking off)
with a cross-entropy written here, on the labels shifted here, so neither the pass nor transformers' loss
code is trusted. Memory is measured, not timed: bytes saved for the backward (saved_tensors_hooks) and the
peak bytes of tensors alive during a training step (every ATen op's outputs, tracked until freed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_zoo import tiny_gpt2, tiny_llama
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import adaptc
from adaptc.errors import ConfigError

VOCAB = 64
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=8)


def _qwen3(**config):
    import transformers as tf

    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**SMALL, **config}))


def _gemma2(**config):
    import transformers as tf

    # final_logit_softcapping=30 (Gemma 2's default) is set explicitly: the soft-capping ops are in the chain.
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**SMALL, "final_logit_softcapping": 30.0, **config}))


BUILDERS = {
    "llama": lambda: tiny_llama(seed=0),
    "gpt2": lambda: tiny_gpt2(seed=0, **NO_DROPOUT),  # tied: lm_head.weight is transformer.wte.weight
    "qwen3": lambda: _qwen3(),
    "gemma2": lambda: _gemma2(),
}


def _batch(batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length))
    labels = ids.clone()
    labels[0, :3] = -100  # left padding / a prompt not trained on
    labels[1, -2:] = -100  # right padding
    return ids, labels


def _inject(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, **options) -> adaptc.AdaptedModel:
    am = adaptc.inject(model, "lora", example_inputs=dict(input_ids=ids, labels=labels), r=4, dropout=0.0,
                       **options)
    am.train()
    with torch.no_grad():  # B = 0 at init would leave A without a gradient: every parameter gets one here
        for p in am.adapter_parameters():
            p.normal_(0, 0.1)
    return am


def _step(am, loss_of=None, **inputs) -> tuple[object, torch.Tensor, dict[str, torch.Tensor]]:
    for p in am.parameters():
        p.grad = None
    out = am(**inputs)
    loss = out.loss if loss_of is None else loss_of(out)
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}


def _reference_loss(labels: torch.Tensor, num_items: torch.Tensor | None = None):
    """The causal-LM loss written here: token t predicts label t + 1, -100 ignored."""

    def loss_of(out) -> torch.Tensor:
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        reduction = "mean" if num_items is None else "sum"
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                               reduction=reduction)
        return loss if num_items is None else loss / num_items

    return loss_of


def _assert_close_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("train_head", [False, True])
def test_loss_and_gradients_equal_the_plain_ones(family, train_head):
    ids, labels = _batch(3, 7)  # 21 tokens: chunks of 4 leave a partial one
    am = _inject(BUILDERS[family](), ids, labels)
    if train_head:  # the head weight trains too (GPT-2 and Gemma 2: the tied input embedding)
        am.base_model.get_output_embeddings().weight.requires_grad_(True)
    out, want_loss, want = _step(am, _reference_loss(labels), input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=1e-5, atol=1e-6)  # transformers agrees

    notes = am.chunked_loss(chunk_size=4)
    assert len(notes) == 1 and notes[0].startswith("chunked:"), notes
    if family == "gemma2":
        assert "div/tanh/mul" in notes[0]  # the final logit soft-capping is computed inside the chunks
    out, loss, got = _step(am, input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(got, want)
    if train_head:
        assert any("wte" in n or "lm_head" in n or "embed_tokens" in n for n in got)


@pytest.mark.parametrize("length", [1, 5, 9])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1024])
def test_lengths_and_chunk_sizes(length, chunk_size):
    ids, labels = _batch(2, length)
    am = _inject(tiny_llama(seed=0), ids, labels)
    _, want_loss, want = _step(am, _reference_loss(labels), input_ids=ids, labels=labels)
    am.chunked_loss(chunk_size=chunk_size)
    _, loss, got = _step(am, input_ids=ids, labels=labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, equal_nan=True)  # length 1: no target, NaN
    if length > 1:
        _assert_close_grads(got, want)


def test_num_items_in_batch():
    """The Trainer's gradient accumulation: a sum in the graph, then transformers' division, kept."""
    ids, labels = _batch(3, 6)
    num_items = torch.tensor(40.0)
    am = _inject(tiny_llama(seed=0), ids, labels)
    inputs = dict(input_ids=ids, labels=labels, num_items_in_batch=num_items)
    _, want_loss, want = _step(am, _reference_loss(labels, num_items), **inputs)
    am.chunked_loss(chunk_size=5)
    out, loss, got = _step(am, **inputs)
    notes = am.chunked_loss(chunk_size=5)
    assert any(n.startswith("chunked:") and "sum" in n for n in notes), notes
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(got, want)


def test_logits_option_and_switching_off():
    ids, labels = _batch(2, 6)
    am = _inject(tiny_gpt2(seed=0, **NO_DROPOUT), ids, labels)
    plain, want_loss, want = _step(am, input_ids=ids, labels=labels)

    am.chunked_loss(chunk_size=5, logits=True)
    out, loss, got = _step(am, input_ids=ids, labels=labels)
    assert not out.logits.requires_grad and out.logits.shape == plain.logits.shape
    torch.testing.assert_close(out.logits, plain.logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(got, want)

    am.chunked_loss(chunk_size=5)  # logits=False: changed in place, the graph is not edited again
    assert am(input_ids=ids, labels=labels).logits is None

    am.eval()  # evaluation graphs are never rewritten
    with torch.no_grad():
        torch.testing.assert_close(am(input_ids=ids, labels=labels).logits, plain.logits.detach())
    am.train()

    assert am.chunked_loss(False) and am.chunked_loss(False) == []
    graph = am.graph_module.graph
    assert not any(n.op == "call_module" and n.target.startswith("_adaptc_chunked_loss") for n in graph.nodes)
    out, loss, got = _step(am, input_ids=ids, labels=labels)
    assert torch.equal(out.logits, plain.logits) and torch.equal(loss, want_loss)
    _assert_close_grads(got, want)


def test_graphs_captured_later_and_without_labels():
    ids, labels = _batch(2, 6)
    am = adaptc.inject(tiny_llama(seed=0), "lora", example_inputs=dict(input_ids=ids), r=4)
    am.train()
    notes = am.chunked_loss(chunk_size=4)
    assert notes and "no cross-entropy" in notes[0]
    _, want_loss, want = _step(am, _reference_loss(labels), input_ids=ids)  # no labels: logits whole, as before
    out, loss, got = _step(am, input_ids=ids, labels=labels)  # a new graph, captured with the pass in order
    assert out.logits is None
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(got, want)


def test_lora_on_the_head_is_left_unchunked_and_adapters_added_later_see_the_head():
    ids, labels = _batch(2, 6)
    am = _inject(tiny_llama(seed=0), ids, labels)
    am.chunked_loss(chunk_size=4)
    # A LoRA adapter on lm_head added after chunking: the LoRA pass finds the head's linear op (the pass
    # manager hands it back), and the head with an adapter is left unchunked (a note says so).
    am.add_adapter("head", targets=["lm_head"], r=2, dropout=0.0)
    with torch.no_grad():
        for p in am.adapter_parameters("head"):
            p.normal_(0, 0.1)
    assert [s.name for s in am.adapter_sites("head")] == ["lm_head"]
    notes = am.chunked_loss(chunk_size=4)
    assert len(notes) == 1 and notes[0].startswith("left unchunked:") and "LoRA" in notes[0], notes
    out, loss, got = _step(am, input_ids=ids, labels=labels)
    assert out.logits is not None  # the plain graph
    am.chunked_loss(False)
    _, want_loss, want = _step(am, input_ids=ids, labels=labels)
    torch.testing.assert_close(loss, want_loss)
    _assert_close_grads(got, want)
    am.chunked_loss(chunk_size=4)
    am.delete_adapter("head")  # the head is plain again: chunked again
    am.set_adapter("default")
    assert am.chunked_loss(chunk_size=4)[0].startswith("chunked:")
    assert am(input_ids=ids, labels=labels).logits is None


class _TinyLM(nn.Module):
    """A causal LM written by hand: the loss ops come from plain torch calls, not transformers."""

    def __init__(self, loss: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, VOCAB, bias=True)
        self.loss = loss

    def forward(self, input_ids, labels):
        logits = self.lm_head(torch.tanh(self.proj(self.embed(input_ids))))
        flat, target = logits.view(-1, VOCAB), labels.view(-1)
        if self.loss == "nll":
            loss = F.nll_loss(F.log_softmax(flat, dim=-1), target)
        elif self.loss == "smoothing":
            loss = F.cross_entropy(flat, target, label_smoothing=0.1)
        elif self.loss == "sin":  # an op the pass does not handle between the head and the loss
            loss = F.cross_entropy(torch.sin(logits).view(-1, VOCAB), target)
        else:  # the logits read by something other than the loss
            loss = F.cross_entropy(flat, target) + logits.square().mean()
        return loss, logits


@pytest.mark.parametrize("loss", ["nll", "smoothing", "sin", "second-reader"])
def test_hand_written_losses(loss):
    ids, labels = _batch(3, 5)
    torch.manual_seed(1)
    am = _inject(_TinyLM(loss), ids, labels, targets=["proj"])
    am.base_model.lm_head.bias.requires_grad_(True)  # a trained head bias: its gradient is summed over chunks
    _, want_loss, want = _step(am, lambda out: out[0], input_ids=ids, labels=labels)
    notes = am.chunked_loss(chunk_size=4)
    handled = loss in ("nll", "smoothing")
    assert len(notes) == 1 and notes[0].startswith("chunked:" if handled else "left unchunked:"), notes
    out, got_loss, got = _step(am, lambda out: out[0], input_ids=ids, labels=labels)
    assert (out[1] is None) == handled
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    _assert_close_grads(got, want)


def test_autocast_is_recomputed_the_same_way():
    """The backward recomputes each chunk under the forward's autocast (bf16 here): grads agree to bf16's precision."""
    ids, labels = _batch(3, 5)
    am = _inject(_TinyLM("smoothing"), ids, labels, targets=["proj"])
    am.base_model.lm_head.weight.requires_grad_(True)

    def step():
        for p in am.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = am(input_ids=ids, labels=labels)[0]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}

    want_loss, want = step()
    am.chunked_loss(chunk_size=4)
    loss, got = step()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=2e-2 * want[name].abs().max().item())


def test_options_are_checked():
    ids, labels = _batch(2, 4)
    am = _inject(tiny_llama(seed=0), ids, labels)
    for bad in (dict(chunk_size=0), dict(chunk_size=2.5), dict(logits="yes"), dict(enabled="on")):
        with pytest.raises(ConfigError):
            am.chunked_loss(**bad)


# --- memory -----------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensors made during a block and alive at once (storages, each counted once)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                held = self.live.get(key)
                if key not in self.exclude and (held is None or held[0].expired()):
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def measure_step(am, ids, labels) -> dict[str, int]:
    """One training step's saved-for-backward bytes and peak live bytes (model weights excluded)."""
    weights = [p for p in am.parameters()] + [b for b in am.buffers()] + [ids, labels]
    weight_ptrs = {t.untyped_storage().data_ptr() for t in weights}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in weight_ptrs:
            saved[key] = t.untyped_storage().nbytes()
        return t

    for p in am.parameters():
        p.grad = None
    tracker = LiveBytes(weights)
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = am(input_ids=ids, labels=labels).loss
        loss.backward()
    return {"saved": sum(saved.values()), "largest saved": max(saved.values()), "peak": tracker.peak}


def large_vocab_llama(vocab: int = 8192):
    return tiny_llama(seed=0, vocab_size=vocab, hidden_size=64, intermediate_size=128, max_position_embeddings=512)


def test_large_vocab_step_holds_less():
    vocab, batch, length, chunk = 8192, 2, 256, 128
    ids = torch.randint(0, vocab, (batch, length))
    labels = ids.clone()
    labels[:, :16] = -100
    am = adaptc.inject(large_vocab_llama(vocab), "lora", example_inputs=dict(input_ids=ids, labels=labels), r=8)
    am.train()
    plain = measure_step(am, ids, labels)
    am.chunked_loss(chunk_size=chunk)
    chunked = measure_step(am, ids, labels)
    logits_bytes = batch * length * vocab * 4
    # Plain keeps the log-softmax of the logits for the backward; chunked keeps the hidden states instead.
    assert plain["largest saved"] >= logits_bytes > 8 * chunked["largest saved"], (plain, chunked)
    assert plain["saved"] - chunked["saved"] >= 0.95 * logits_bytes, (plain, chunked)
    # At the peak, plain holds logits-sized tensors several times over; chunked a few [chunk, vocab] ones.
    assert plain["peak"] - chunked["peak"] >= 3 * logits_bytes // 2, (plain, chunked)
    assert chunked["peak"] < plain["peak"] / 2, (plain, chunked)


if __name__ == "__main__":  # the figures in docs/training.md
    torch.manual_seed(0)
    for vocab, batch, length, chunk in [(8192, 2, 256, 128), (32000, 4, 512, 1024)]:
        ids = torch.randint(0, vocab, (batch, length))
        am = adaptc.inject(large_vocab_llama(vocab), "lora", example_inputs=dict(input_ids=ids, labels=ids), r=8)
        am.train()
        plain = measure_step(am, ids, ids)
        am.chunked_loss(chunk_size=chunk)
        chunked = measure_step(am, ids, ids)
        mib = 2**20
        print(f"vocab {vocab}, batch {batch}, length {length}, chunk {chunk} (logits: "
              f"{batch * length * vocab * 4 / mib:.0f} MiB in float32)")
        for what in ("saved", "largest saved", "peak"):
            print(f"  {what:13s}: plain {plain[what] / mib:8.1f} MiB   chunked {chunked[what] / mib:8.1f} MiB")
