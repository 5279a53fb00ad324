"""The model zoo: LoRA on every linear-like op of text, vision and audio models, and a custom module.

For each model, built small from a config (no weights are downloaded):
- ``inject(..., targets="all-linear", r=4)`` adapts the projections we expect and not the head;
- at init (B = 0) the adapted model computes exactly the base model's output;
- 20 Adam steps on a fixed batch lower the loss, leave every base parameter bit-identical and
  change every adapter parameter;
- the adapted model runs at a second batch size and sequence/time length (a second batch size
  where the model has a fixed image size), with the right output shape; with its adapters
  disabled it computes the base model's output there.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchaudio
from model_zoo import (
    CONFORMER_DIM,
    VOCAB,
    FunctionalConvNet,
    conformer_inputs,
    images,
    tiny_bert,
    tiny_conformer,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    tiny_timm_vit,
    tiny_vit,
    tiny_wav2vec2,
    token_ids,
    wav2vec2_frames,
)
from torch import nn

import adaptc

STEPS = 20


@dataclass
class Case:
    """One model of the zoo.

    ``inputs(batch, length)`` builds a call's inputs (a dict of keywords or a tuple of positional
    inputs); ``output`` picks the main tensor of the model's output; ``shape(batch, length)`` is that
    tensor's expected shape. ``sites`` are patterns (``re.fullmatch``) each of which must name an
    adapted site; ``not_sites`` must name none (the output head).
    """

    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]
    output: Callable[[Any], torch.Tensor]
    shape: Callable[[int, int], tuple[int, ...]]
    sizes: tuple[int, int]
    other_sizes: tuple[int, int]
    sites: tuple[str, ...]
    count: int
    not_sites: tuple[str, ...] = ()
    warns: tuple[str, ...] = ()
    lr: float = 1e-2


def call(module: nn.Module, inputs: Any) -> Any:
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def logits(out: Any) -> torch.Tensor:
    return out.logits


def first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# --- inputs of the shared zoo's models (tests/model_zoo.py) ------------------------------------------

def t5_inputs(batch: int, length: int) -> dict:
    return {"input_ids": token_ids(batch, length), "decoder_input_ids": token_ids(batch, length - 2)}


def audio(batch: int, samples: int) -> tuple:
    return (torch.randn(batch, samples),)


def torchaudio_wav2vec2_frames(samples: int) -> int:
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:  # wav2vec2_base's feature extractor
        samples = (samples - kernel) // stride + 1
    return samples


CASES = [
    Case(
        "hf-gpt2", tiny_gpt2, lambda b, t: {"input_ids": token_ids(b, t)}, logits, lambda b, t: (b, t, VOCAB),
        sizes=(2, 8), other_sizes=(3, 13),
        count=8,  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
        sites=(r"transformer\.h\.\d\.attn\.c_attn", r"transformer\.h\.\d\.attn\.c_proj", r"transformer\.h\.1\.mlp\.c_fc",
               r"transformer\.h\.1\.mlp\.c_proj"),
        not_sites=(r"lm_head", r".*wte"),
    ),
    Case(
        "hf-llama-gqa", tiny_llama, lambda b, t: {"input_ids": token_ids(b, t)}, logits, lambda b, t: (b, t, VOCAB),
        sizes=(2, 8), other_sizes=(3, 13),
        count=14,  # 2 layers x (q, k, v, o, gate, up, down)
        sites=tuple(rf"model\.layers\.1\.self_attn\.{p}_proj" for p in "qkvo")
        + tuple(rf"model\.layers\.0\.mlp\.{p}_proj" for p in ("gate", "up", "down")),
        not_sites=(r"lm_head",),
    ),
    Case(
        "hf-bert", tiny_bert, lambda b, t: {"input_ids": token_ids(b, t), "attention_mask": torch.ones(b, t, dtype=torch.long)},
        logits, lambda b, t: (b, 3),
        sizes=(2, 8), other_sizes=(3, 13),
        count=13,  # 2 layers x (query, key, value, attention output, intermediate, output) + pooler
        sites=(r"bert\.encoder\.layer\.\d\.attention\.self\.(query|key|value)", r"bert\.encoder\.layer\.1\.output\.dense",
               r"bert\.pooler\.dense"),
        not_sites=(r"classifier",),
    ),
    Case(
        "hf-t5", tiny_t5, t5_inputs, logits, lambda b, t: (b, t - 2, VOCAB),
        sizes=(2, 8), other_sizes=(3, 13),
        count=32,  # encoder 2 x (q, k, v, o, wi, wo) + decoder 2 x (self q k v o, cross q k v o, wi, wo)
        sites=(r"encoder\.block\.1\.layer\.0\.SelfAttention\.[qkvo]", r"decoder\.block\.1\.layer\.1\.EncDecAttention\.[qkvo]",
               r"decoder\.block\.0\.layer\.2\.DenseReluDense\.w[io]"),
        not_sites=(r"lm_head",),
    ),
    Case(
        "hf-vit", tiny_vit, lambda b, s: {"pixel_values": images(b, s)}, logits, lambda b, s: (b, 5),
        sizes=(2, 32), other_sizes=(3, 32),
        count=12,  # 2 layers x (q, k, v, o, fc1, fc2)
        sites=(r"vit\.layers\.\d\.attention\.[qkvo]_proj", r"vit\.layers\.1\.mlp\.fc[12]"),
        not_sites=(r"classifier", r".*patch_embeddings\.projection"),
    ),
    Case(
        "hf-wav2vec2-ctc", tiny_wav2vec2, lambda b, n: {"input_values": torch.randn(b, n)}, logits,
        lambda b, n: (b, wav2vec2_frames(n), VOCAB),
        sizes=(2, 1600), other_sizes=(3, 2400),
        count=13,  # feature projection + 2 layers x (q, k, v, out, intermediate, output)
        sites=(r"wav2vec2\.feature_projection\.projection", r"wav2vec2\.encoder\.layers\.\d\.attention\.[qkv]_proj",
               r"wav2vec2\.encoder\.layers\.1\.feed_forward\.output_dense"),
        not_sites=(r"lm_head",),
        warns=(r".*layer drop.*", r".*SpecAugment.*"),
    ),
    Case(
        "timm-vit_tiny_patch16_224",
        tiny_timm_vit,
        lambda b, s: (images(b, s),), first, lambda b, s: (b, 10),
        sizes=(2, 32), other_sizes=(3, 32),
        count=8,  # 2 blocks x (qkv, proj, fc1, fc2)
        sites=(r"blocks\.\d\.attn\.qkv", r"blocks\.\d\.attn\.proj", r"blocks\.1\.mlp\.fc[12]"),
        not_sites=(r"head", r"patch_embed\.proj"),
    ),
    Case(
        "timm-resnet18",
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
        lambda b, s: (images(b, s),), first, lambda b, s: (b, 10),
        sizes=(2, 64), other_sizes=(3, 96),
        count=3,  # the 1x1 downsample convs; every other conv is 3x3 or 7x7
        sites=(r"layer2\.0\.downsample\.0", r"layer3\.0\.downsample\.0", r"layer4\.0\.downsample\.0"),
        not_sites=(r"fc", r".*conv\d"),
    ),
    Case(
        "timm-convnext_atto",
        lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
        lambda b, s: (images(b, s),), first, lambda b, s: (b, 10),
        sizes=(2, 64), other_sizes=(3, 96),
        count=24,  # 12 blocks (2, 2, 6, 2) x (fc1, fc2); the 7x7 depthwise convs are not linear-like
        sites=(r"stages\.\d\.blocks\.\d\.mlp\.fc1", r"stages\.3\.blocks\.1\.mlp\.fc2"),
        not_sites=(r"head\.fc", r".*conv_dw"),
    ),
    Case(
        "timm-swin_tiny_patch4_window7_224",
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4, embed_dim=32,
            depths=(2, 2, 1, 1), num_heads=(2, 2, 4, 4), num_classes=10,
        ),
        lambda b, s: (images(b, s),), first, lambda b, s: (b, 10),
        sizes=(2, 64), other_sizes=(3, 64),
        count=27,  # 6 blocks x (qkv, proj, fc1, fc2) + 3 patch-merging reductions
        sites=(r"layers\.\d\.blocks\.\d\.attn\.qkv", r"layers\.0\.blocks\.1\.attn\.proj", r"layers\.\d\.downsample\.reduction",
               r"layers\.3\.blocks\.0\.mlp\.fc2"),
        not_sites=(r"head\.fc",),
    ),
    Case(
        "torchaudio-wav2vec2_base", torchaudio.models.wav2vec2_base, audio, first,
        lambda b, n: (b, torchaudio_wav2vec2_frames(n), 768),
        sizes=(2, 4000), other_sizes=(3, 5600),
        count=73,  # feature projection + 12 layers x (q, k, v, out, intermediate, output)
        sites=(r"encoder\.feature_projection\.projection", r"encoder\.transformer\.layers\.11\.attention\.[kqv]_proj",
               r"encoder\.transformer\.layers\.\d+\.feed_forward\.output_dense"),
        warns=(r".*layer drop.*",),
        lr=3e-3,
    ),
    Case(
        "torchaudio-conformer", tiny_conformer, conformer_inputs, first, lambda b, t: (b, t, CONFORMER_DIM),
        sizes=(2, 20), other_sizes=(3, 31),
        count=16,  # 2 layers x (2 ffn x 2 linears, in_proj_weight, out_proj, 2 pointwise convs)
        sites=(r"conformer_layers\.\d\.self_attn\.in_proj_weight", r"conformer_layers\.1\.self_attn\.out_proj",
               r"conformer_layers\.\d\.ffn[12]\.sequential\.[14]", r"conformer_layers\.0\.conv_module\.sequential\.[05]"),
        not_sites=(r"conformer_layers\.\d\.conv_module\.sequential\.2",),  # the depthwise conv
    ),
    Case(
        "custom-functional", FunctionalConvNet, lambda b, s: (images(b, s),), first, lambda b, s: (b, 7),
        sizes=(2, 12), other_sizes=(3, 17),
        count=3,  # the 1x1 conv, F.linear, h @ mix; not the 3x3 stem nor the head
        sites=(r"pointwise", r"fc_weight", r"mix"),
        not_sites=(r"stem", r"head"),
    ),
]


# By time (make test-unit under 2 minutes), the integration tier runs all but four models of the sweep (a GPT-2,
# a grouped-query Llama, a timm ViT, the functional module): `make test` runs every one.
UNIT_CASES = {"hf-gpt2", "hf-llama-gqa", "timm-vit_tiny_patch16_224", "custom-functional"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=() if c.id in UNIT_CASES else pytest.mark.integration)
                                  for c in CASES])
def test_lora_all_linear_trains_only_the_adapter(case: Case):
    torch.manual_seed(0)
    model = case.build().train()
    inputs = case.inputs(*case.sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        am = adaptc.inject(model, "lora", example_inputs=inputs, targets="all-linear", r=4)
    said = [str(w.message) for w in caught if str(w.message).startswith("adaptc:")]
    for pattern in case.warns:
        assert any(re.fullmatch(pattern, m, re.S) for m in said), f"no warning matches {pattern!r}: {said}"
    unexpected = [m for m in said if not any(re.fullmatch(p, m, re.S) for p in case.warns)]
    assert not unexpected

    names = [site.name for site in am.sites]
    for pattern in case.sites:
        assert any(re.fullmatch(pattern, name) for name in names), f"no adapted site matches {pattern!r}: {names}"
    for pattern in case.not_sites:
        assert not any(re.fullmatch(pattern, name) for name in names), f"{pattern!r} must not be adapted: {names}"
    assert len(names) == case.count, names
    assert all(site.linear_like for site in am.sites)

    adapter = am.adapter_parameters()
    assert {id(p) for p in am.parameters() if p.requires_grad} == {id(p) for p in adapter}
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapter_start = [p.detach().clone() for p in adapter]

    # At init B = 0: exactly the base model.
    am.eval()
    model.eval()
    with torch.no_grad():
        reference = case.output(call(model, inputs))
        assert torch.equal(case.output(call(am, inputs)), reference)
    # Both modes were captured whole, with dynamic shapes: no static fallback, no fx.
    assert am.graph_module.captured_with == {"train": "export", "eval": "export"}

    # Train the adapter on one batch.
    target = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(adapter, lr=case.lr)
    am.train()
    losses = []
    for _ in range(STEPS):
        loss = F.mse_loss(case.output(call(am, inputs)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    for name, p in model.named_parameters():
        assert torch.equal(p, base[name]), f"base parameter {name} changed"
        assert p.grad is None, f"base parameter {name} got a gradient"
    for p, start in zip(adapter, adapter_start):
        assert not torch.equal(p, start)

    # Another batch size and sequence/time length, in both modes.
    other = case.inputs(*case.other_sizes)
    expected_shape = case.shape(*case.other_sizes)
    optimizer.zero_grad()
    out = case.output(call(am, other))
    assert out.shape == expected_shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter)

    am.eval()
    with torch.no_grad():
        trained = case.output(call(am, inputs))
        assert F.mse_loss(trained, target) < F.mse_loss(reference, target)  # the eval graph applies the adapter too
        out = case.output(call(am, other))
        assert out.shape == expected_shape
        assert torch.isfinite(out).all()
        with am.disable_adapters():
            plain = case.output(call(am, other))
        torch.testing.assert_close(plain, case.output(call(model, other)))
        assert not torch.equal(out, plain)
