"""A LoRA training step's memory peak: adaptc's no higher than PEFT's on the same model.

The peak is counted, not timed: a TorchDispatchMode sees every op of the step (forward, backward,
AdamW) and adds the bytes of each new storage an op returns; a finalizer on the storage takes them
off when it dies. The running sum's maximum is the step's peak over what lived before it (weights,
optimizer state), the same from run to run. The one allowance is the adapter's own size: adaptc's
fused LoRA groups keep the concatenated A matrices of a group for the backward (a copy of adapter
weights, not of activations); any activation kept longer than PEFT keeps it (a per-layer float copy
of the attention mask, a second [tokens, vocab] copy of the logits) exceeds it many times over.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import adaptc

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class PeakTracker(TorchDispatchMode):
    """Bytes of the storages ops create while active: ``now`` (alive) and ``peak`` (their maximum)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _dead(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.live or ptr in inputs:  # a view, or an op writing in place
                continue
            self.live[ptr] = storage.nbytes()
            weakref.finalize(storage, self._dead, ptr)
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        return out


def llama(vocab: int = 1024) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                      attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def step_peak(model: torch.nn.Module, batch: dict) -> int:
    """Bytes one training step (forward, backward, AdamW) adds at its peak, after two warm-up steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    step()
    gc.collect()
    tracker = PeakTracker()
    with tracker:
        step()
    return tracker.peak


def adapter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_adaptc_step_peak_at_most_peft(padded: bool) -> None:
    base = llama()
    ids = torch.randint(0, 1024, (1, 256), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    if padded:  # a mask that is not the causal triangle: one float mask for every layer
        mask = torch.ones_like(ids)
        mask[:, :8] = 0
        batch["attention_mask"] = mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=batch, targets="all-linear", r=16,
                             alpha=32, dropout=0.0)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                          target_modules="all-linear"))
    ours.train()
    theirs.train()
    peak_ours, peak_theirs = step_peak(ours, batch), step_peak(theirs, batch)
    assert peak_ours <= peak_theirs + adapter_bytes(ours), (
        f"adaptc's step peak {peak_ours / 2**20:.2f} MiB is above PEFT's {peak_theirs / 2**20:.2f} MiB "
        f"(+ the adapter's {adapter_bytes(ours) / 2**20:.2f} MiB)")


def test_the_tracker_sees_a_kept_copy() -> None:
    """The measure itself: a step that keeps one more [tokens, vocab] float tensor alive peaks higher."""
    x = torch.randn(256, 1024, requires_grad=True)

    def peak(extra: bool) -> int:
        tracker = PeakTracker()
        with tracker:
            y = x * 2
            kept = y.exp() if extra else None
            loss = torch.log_softmax(y, -1).sum()
            loss.backward()
            del kept
        x.grad = None
        return tracker.peak

    assert peak(True) - peak(False) >= 256 * 1024 * 4
