"""Prompt tuning, P-tuning and prefix tuning on text, vision, audio and custom models.

- On GPT-2, BERT and Llama (grouped-query attention) the same virtual-token weights give
  PEFT's logits (PEFT is the independent reference). Where PEFT cannot run (prefix tuning on
  BERT in transformers 5), a test shows PEFT failing and checks adaptc against a hand-written
  eager reference instead.
- On every model of the zoo: 30 Adam steps on a fixed batch lower the loss and change only
  adapter parameters; the adapted model runs at a second batch size and length.
- Masks: padded rows equal the same rows run alone; causal outputs ignore later tokens.
- A model without attention gets a clear error naming LoRA.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import timm
import torch
import torch.nn.functional as F
import torchaudio
from adaptc.passes.sites import site_key
from model_zoo import (
    VOCAB,
    FunctionalSDPA,
    images,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_timm_vit,
    tiny_torchaudio_wav2vec2,
    tiny_vit,
    tiny_wav2vec2,
    token_ids,
)
from torch import nn

import adaptc

V = 4  # virtual tokens


def _peft_model(model: nn.Module, method: str, task: str):
    config = {
        "prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=V),
        "ptuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=V, encoder_hidden_size=16),
        "ptuning-lstm": lambda: peft.PromptEncoderConfig(
            task_type=task, num_virtual_tokens=V, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=V),
    }[method]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).eval()


def _copy_peft_weights(am, pm, method: str) -> None:
    """Give adaptc's adapter PEFT's (random) virtual-token weights."""
    ours = am.adapters["default"]
    theirs = pm.prompt_encoder["default"]
    with torch.no_grad():
        if method.startswith("ptuning") or method == "prompt":
            ours["prompt"].load_state_dict(theirs.state_dict(), strict=True)
            return
        # PEFT's prefix: [V, layers * 2 * heads * head_dim], per layer keys then values.
        config = pm.peft_config["default"]
        heads = config.num_attention_heads
        table = theirs.embedding.weight.view(V, -1, heads, config.token_dim // heads)
        for layer, site in enumerate(am.adapter_sites("default")):
            prefix = ours[site_key(site.name)]
            prefix.key.copy_(table[:, 2 * layer].transpose(0, 1))
            prefix.value.copy_(table[:, 2 * layer + 1].transpose(0, 1))


PARITY = [
    ("gpt2", tiny_gpt2, "CAUSAL_LM", "prompt"),
    ("gpt2", tiny_gpt2, "CAUSAL_LM", "ptuning"),
    ("gpt2", tiny_gpt2, "CAUSAL_LM", "prefix"),
    ("bert", tiny_bert, "SEQ_CLS", "prompt"),
    ("bert", tiny_bert, "SEQ_CLS", "ptuning-lstm"),
    ("llama", tiny_llama, "CAUSAL_LM", "prompt"),
    ("llama", tiny_llama, "CAUSAL_LM", "ptuning"),
    ("llama", tiny_llama, "CAUSAL_LM", "prefix"),
]


def _padded_batch() -> dict:
    torch.manual_seed(1)
    ids = token_ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
@pytest.mark.parametrize("name,build,task,method", PARITY, ids=[f"{p[0]}-{p[3]}" for p in PARITY])
def test_matches_peft(name, build, task, method):
    torch.manual_seed(0)
    model = build().eval()
    batch = _padded_batch()
    options = {"encoder_hidden_size": 16} if method.startswith("ptuning") else {}
    if method == "ptuning-lstm":
        options["encoder"] = "lstm"
    am = adaptc.inject(model, method.split("-")[0], example_inputs=batch, num_virtual_tokens=V, **options)
    pm = _peft_model(model, method, task)
    _copy_peft_weights(am, pm, method)
    with torch.no_grad():
        expected = pm(**batch).logits
        got = am(**batch).logits
        base = model(**batch).logits
    if expected.dim() == 3:
        if method != "prefix":
            expected = expected[:, V:]  # PEFT returns the virtual positions too; adaptc drops them
        real = batch["attention_mask"].bool()
        expected, got, base = expected[real], got[real], base[real]
    assert got.shape == expected.shape
    assert (got - base).abs().max() > 1e-3, "the adapter must change the output for this comparison to mean anything"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _eager_prefix_reference(model, am, batch) -> torch.Tensor:
    """BERT with prefix tuning computed by hand: every attention call gets the prefix keys/values
    (visible to all queries) and positions start after the prefix, as PEFT does for decoders."""
    prefixes = [am.adapters["default"][site_key(s.name)] for s in am.adapter_sites("default")]
    calls = iter(prefixes)
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        layer = next(calls)
        b = q.shape[0]
        k = torch.cat([layer.key.expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([layer.value.expand(b, -1, -1, -1), v], dim=2)
        if attn_mask is not None:
            ones = torch.ones(*attn_mask.shape[:-1], V, dtype=attn_mask.dtype)
            attn_mask = torch.cat([ones if attn_mask.dtype == torch.bool else ones * 0, attn_mask], dim=-1)
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)

    length = batch["input_ids"].shape[1]
    positions = torch.arange(V, V + length).expand(batch["input_ids"].shape[0], length)
    F.scaled_dot_product_attention = sdpa
    try:
        with torch.no_grad():
            return model(**batch, position_ids=positions).logits
    finally:
        F.scaled_dot_product_attention = original


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
def test_bert_prefix_where_peft_fails():
    torch.manual_seed(0)
    model = tiny_bert().eval()
    batch = _padded_batch()
    pm = _peft_model(model, "prefix", "SEQ_CLS")
    with pytest.raises(ValueError, match="past key values"):  # PEFT 0.21 on transformers 5: BERT has no cache
        pm(**batch)
    am = adaptc.inject(model, "prefix", example_inputs=batch, num_virtual_tokens=V)
    with torch.no_grad():
        got = am(**batch).logits
        base = model(**batch).logits
    expected = _eager_prefix_reference(model, am, batch)
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- the zoo -----------------------------------------------------------------------------------

def _main(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Zoo:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]
    sizes: tuple[int, int]
    other: tuple[int, int]


def _call(module: nn.Module, inputs: Any) -> Any:
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


ZOO = {
    "gpt2": Zoo("gpt2", tiny_gpt2, lambda b, s: {"input_ids": token_ids(b, s)}, (2, 8), (3, 11)),
    "llama": Zoo("llama", tiny_llama, lambda b, s: {"input_ids": token_ids(b, s)}, (2, 8), (3, 11)),
    "bert": Zoo("bert", tiny_bert, lambda b, s: {"input_ids": token_ids(b, s)}, (2, 8), (3, 11)),
    "hf-vit": Zoo("hf-vit", tiny_vit, lambda b, s: {"pixel_values": images(b, s)}, (2, 32), (3, 32)),
    "hf-wav2vec2": Zoo("hf-wav2vec2", tiny_wav2vec2, lambda b, n: {"input_values": torch.randn(b, n)}, (2, 1600), (3, 2400)),
    "timm-vit": Zoo("timm-vit", tiny_timm_vit, lambda b, s: (images(b, s),), (2, 32), (3, 32)),
    "timm-deit": Zoo("timm-deit", lambda: timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=10),
        lambda b, s: (images(b, s),), (2, 32), (3, 32)),
    "torchaudio-wav2vec2-small": Zoo("torchaudio-wav2vec2-small", tiny_torchaudio_wav2vec2,
                                     lambda b, n: (torch.randn(b, n),), (2, 1600), (3, 2400)),
    "torchaudio-wav2vec2_base": Zoo("torchaudio-wav2vec2_base", torchaudio.models.wav2vec2_base,
                                    lambda b, n: (torch.randn(b, n),), (2, 4000), (3, 5600)),
    "custom-sdpa": Zoo("custom-sdpa", FunctionalSDPA, lambda b, t: (torch.randn(b, t, 8),), (2, 10), (3, 13)),
}
FAST = {("gpt2", "prompt"), ("llama", "prefix"), ("timm-deit", "ptuning"), ("torchaudio-wav2vec2-small", "prompt"),
        ("custom-sdpa", "prefix")}
UNIT = {("custom-sdpa", "prefix")}  # the other FAST cells: integration, by time (make test-unit under 2 minutes)
MATRIX = [
    pytest.param(zoo, method, id=f"{key}-{method}",
                 marks=(() if (key, method) in UNIT else (pytest.mark.integration,)) if (key, method) in FAST
                 else (pytest.mark.slow,))
    for key, zoo in ZOO.items() for method in ("prompt", "ptuning", "prefix")
]


@pytest.mark.parametrize("zoo,method", MATRIX)
def test_trains_only_the_adapter(zoo: Zoo, method: str):
    torch.manual_seed(0)
    model = zoo.build()
    batch = zoo.inputs(*zoo.sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        am = adaptc.inject(model, method, example_inputs=batch, num_virtual_tokens=V)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter_before = {n: p.detach().clone() for n, p in am.adapters.named_parameters()}
    assert adapter_before and all(p.requires_grad for p in am.adapters.parameters())
    assert not any(p.requires_grad for p in model.parameters())

    am.eval()  # a fixed batch without dropout noise, so the loss curve is the adapter's doing
    with torch.no_grad():  # a reachable target: the output of the same adapter with other weights
        for p in am.adapters.parameters():
            p.add_(torch.randn_like(p))
        target = _main(_call(am, batch)).detach()
        for name, p in am.adapters.named_parameters():
            p.copy_(adapter_before[name])
    optimizer = torch.optim.Adam([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(_main(_call(am, batch)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, param in model.named_parameters():
        assert torch.equal(param, base_before[name]), f"base parameter {name} changed"
    for name, param in am.adapters.named_parameters():
        assert not torch.equal(param, adapter_before[name]), f"adapter parameter {name} did not train"

    am.train()
    other = zoo.inputs(*zoo.other)
    with torch.no_grad():
        out = _main(_call(am, other))
        base = _main(_call(model.eval(), other))
    assert out.shape == base.shape  # virtual positions are not in the output


# --- masks -------------------------------------------------------------------------------------

SLOW = pytest.mark.slow


@pytest.mark.parametrize("build,method", [
    pytest.param(tiny_gpt2, "prefix", id="gpt2-prefix"), pytest.param(tiny_bert, "prompt", id="bert-prompt"),
    pytest.param(tiny_gpt2, "prompt", id="gpt2-prompt", marks=SLOW), pytest.param(tiny_bert, "prefix", id="bert-prefix", marks=SLOW),
])
def test_padded_rows_equal_rows_alone(build, method):
    torch.manual_seed(0)
    model = build().eval()
    ids = token_ids(3, 9)
    lengths = [9, 6, 4]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    am = adaptc.inject(model, method, example_inputs={"input_ids": ids, "attention_mask": mask}, num_virtual_tokens=V)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.normal_()
        batched = am(input_ids=ids, attention_mask=mask).logits
        for row, n in enumerate(lengths):
            alone = am(input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n]).logits
            expected = alone[0] if alone.dim() == 2 else alone[0, :n]
            got = batched[row] if batched.dim() == 2 else batched[row, :n]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prompt", pytest.param("ptuning", marks=SLOW), "prefix"])
def test_causal_outputs_ignore_later_tokens(method):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = token_ids(2, 10)
    am = adaptc.inject(model, method, example_inputs={"input_ids": ids}, num_virtual_tokens=V)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    with torch.no_grad():
        a = am(input_ids=ids).logits
        b = am(input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-5, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prompt", pytest.param("ptuning", marks=SLOW), "prefix"])
def test_model_without_attention_is_refused(method):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(adaptc.TargetError, match=r"no attention.*method='lora'"):
        adaptc.inject(model, method, example_inputs=(images(1, 32),), num_virtual_tokens=V)


def test_one_prompt_method_per_model():
    model = tiny_gpt2().eval()
    am = adaptc.inject(model, "prompt", example_inputs={"input_ids": token_ids(2, 8)}, num_virtual_tokens=V)
    with pytest.raises(adaptc.ConfigError, match="one prompt-method adapter"):
        am.add_adapter("other", "prefix", num_virtual_tokens=V)
    am.add_adapter("lora", "lora", r=2)  # LoRA on top of a prompt is fine
    assert am(input_ids=token_ids(2, 8)).logits.shape == (2, 8, VOCAB)


@pytest.mark.parametrize("options,match", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
    ({"init": "a text"}, "pass tokenizer="),
    ({"encoder": "gru"}, "encoder must be 'mlp' or 'lstm'"),
])
def test_bad_prompt_options(options, match):
    method = "ptuning" if "encoder" in options else "prompt"
    with pytest.raises(adaptc.ConfigError, match=match):
        adaptc.inject(tiny_gpt2(), method, example_inputs={"input_ids": token_ids(1, 4)}, **options)


class _LooksUpItsOwnTokens(nn.Module):
    """F.embedding on a bare parameter in its own forward (no nn.Embedding to hook), matmul attention."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, dim))
        self.qkv = nn.Parameter(torch.randn(3 * dim, dim) * dim ** -0.5)
        self.head = nn.Parameter(torch.randn(VOCAB, dim) * dim ** -0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.table)
        b, t, d = x.shape
        q, k, v = F.linear(x, self.qkv).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        y = torch.softmax(q @ k.transpose(-2, -1) / (d // 2) ** 0.5, dim=-1) @ v
        return F.linear(x + y.transpose(1, 2).reshape(b, t, d), self.head)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_functional_token_lookup_gets_the_prompt(method):
    """Reference: the unadapted model with the prompt appended to its table as extra rows, fed those rows'
    ids before the real ones; its outputs at the real positions."""
    torch.manual_seed(0)
    model = _LooksUpItsOwnTokens().eval()
    ids = token_ids(2, 6)
    am = adaptc.inject(model, method, example_inputs=(ids,), num_virtual_tokens=V).eval()
    assert am.adapter_sites("default")[0].table == "table"
    with torch.no_grad():
        prompt = am.adapters["default"]["prompt"].prompt()
        got = am(ids)
        table = model.table.data.clone()
        model.table.data = torch.cat([table, prompt])
        extra = torch.arange(VOCAB, VOCAB + V).expand(2, V)
        expected = model(torch.cat([extra, ids], dim=1))[:, V:]
        model.table.data = table
        base = model(ids)
    assert got.shape == base.shape
    assert (got - base).abs().max() > 1e-3  # the prompt changes the outputs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): a second attention implementation
def test_unfused_attention_gets_the_same_prefix():
    """transformers' eager attention (matmul, scale, mask, softmax, dropout, matmul) is matched too:
    with the same prefix it computes what the SDPA model computes."""
    def build(impl: str) -> nn.Module:
        return tiny_gpt2(attn_implementation=impl, seed=0).eval()

    fused, unfused = build("sdpa"), build("eager")
    batch = _padded_batch()
    a = adaptc.inject(fused, "prefix", example_inputs=batch, num_virtual_tokens=V)
    b = adaptc.inject(unfused, "prefix", example_inputs=batch, num_virtual_tokens=V)
    assert [s.name for s in b.sites] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert not any("softmax" in str(n.target) for n in b.graph_module.graph.nodes)
    b.adapters.load_state_dict(a.adapters.state_dict())
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        expected, got = a(**batch).logits[real], b(**batch).logits[real]
        base = unfused(**batch).logits[real]
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_labels_given_as_the_same_tensor_as_input_ids():
    """HF users pass labels=input_ids (one tensor object); export then has one placeholder for both.
    Reference: the same call with a copy of the ids as labels."""
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    am = adaptc.inject(model, "prompt", example_inputs={"input_ids": ids, "labels": ids}, num_virtual_tokens=V)
    assert am.adapter_configs()["default"].method == "prompt"
    with torch.no_grad():
        shared = am(input_ids=ids, labels=ids)
        copied = am(input_ids=ids, labels=ids.clone())
    assert shared.logits.shape == (2, 6, VOCAB)
    torch.testing.assert_close(shared.loss, copied.loss, atol=1e-6, rtol=0)
