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
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
)

import adaptc

STEPS = 20
VOCAB = 64


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


def token_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# --- transformers -------------------------------------------------------------------------------

def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4))


def llama_gqa():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def bert():
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config)


def t5():
    config = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def t5_inputs(batch: int, length: int) -> dict:
    return {"input_ids": token_ids(batch, length), "decoder_input_ids": token_ids(batch, length - 2)}


def vit():
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=5,
    )
    return ViTForImageClassification(config)


WAV2VEC2_CONV = dict(conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4))


def hf_wav2vec2():
    config = Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **WAV2VEC2_CONV,
    )
    return Wav2Vec2ForCTC(config)


def hf_wav2vec2_frames(samples: int) -> int:
    for kernel, stride in zip(WAV2VEC2_CONV["conv_kernel"], WAV2VEC2_CONV["conv_stride"]):
        samples = (samples - kernel) // stride + 1
    return samples


# --- torchaudio ---------------------------------------------------------------------------------

def audio(batch: int, samples: int) -> tuple:
    return (torch.randn(batch, samples),)


def wav2vec2_frames(samples: int) -> int:
    for kernel, stride in [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2:  # wav2vec2_base's feature extractor
        samples = (samples - kernel) // stride + 1
    return samples


CONFORMER_DIM = 32


def conformer():
    return torchaudio.models.Conformer(
        input_dim=CONFORMER_DIM, num_heads=4, ffn_dim=64, num_layers=2, depthwise_conv_kernel_size=7, dropout=0.1,
    )


def conformer_inputs(batch: int, frames: int) -> tuple:
    lengths = torch.full((batch,), frames, dtype=torch.int64)
    lengths[1:] = torch.randint(frames // 2, frames + 1, (batch - 1,))  # the first is full: max(lengths) == frames
    return (torch.randn(batch, frames, CONFORMER_DIM), lengths)


# --- a custom module: functional ops on its own parameters --------------------------------------

class Functional(nn.Module):
    """No nn.Linear / nn.Conv2d submodules: F.conv2d, F.linear and ``@`` on bare parameters."""

    def __init__(self, classes: int = 7):
        super().__init__()
        self.stem = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.2)  # 3x3: a conv site, not linear-like
        self.pointwise = nn.Parameter(torch.randn(24, 16, 1, 1) * 0.25)  # 1x1: linear-like
        self.fc_weight = nn.Parameter(torch.randn(32, 24) * 0.2)
        self.fc_bias = nn.Parameter(torch.zeros(32))
        self.mix = nn.Parameter(torch.randn(32, 32) * 0.2)  # applied as h @ mix
        self.head = nn.Parameter(torch.randn(classes, 32) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.stem, padding=1))
        x = F.relu(F.conv2d(x, self.pointwise))
        h = x.mean(dim=(2, 3))
        h = F.gelu(F.linear(h, self.fc_weight, self.fc_bias))
        h = torch.tanh(h @ self.mix)
        return F.linear(h, self.head)


CASES = [
    Case(
        "hf-gpt2", gpt2, lambda b, t: {"input_ids": token_ids(b, t)}, logits, lambda b, t: (b, t, VOCAB),
        sizes=(2, 8), other_sizes=(3, 13),
        count=8,  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
        sites=(r"transformer\.h\.\d\.attn\.c_attn", r"transformer\.h\.\d\.attn\.c_proj", r"transformer\.h\.1\.mlp\.c_fc",
               r"transformer\.h\.1\.mlp\.c_proj"),
        not_sites=(r"lm_head", r".*wte"),
    ),
    Case(
        "hf-llama-gqa", llama_gqa, lambda b, t: {"input_ids": token_ids(b, t)}, logits, lambda b, t: (b, t, VOCAB),
        sizes=(2, 8), other_sizes=(3, 13),
        count=14,  # 2 layers x (q, k, v, o, gate, up, down)
        sites=tuple(rf"model\.layers\.1\.self_attn\.{p}_proj" for p in "qkvo")
        + tuple(rf"model\.layers\.0\.mlp\.{p}_proj" for p in ("gate", "up", "down")),
        not_sites=(r"lm_head",),
    ),
    Case(
        "hf-bert", bert, lambda b, t: {"input_ids": token_ids(b, t), "attention_mask": torch.ones(b, t, dtype=torch.long)},
        logits, lambda b, t: (b, 3),
        sizes=(2, 8), other_sizes=(3, 13),
        count=13,  # 2 layers x (query, key, value, attention output, intermediate, output) + pooler
        sites=(r"bert\.encoder\.layer\.\d\.attention\.self\.(query|key|value)", r"bert\.encoder\.layer\.1\.output\.dense",
               r"bert\.pooler\.dense"),
        not_sites=(r"classifier",),
    ),
    Case(
        "hf-t5", t5, t5_inputs, logits, lambda b, t: (b, t - 2, VOCAB),
        sizes=(2, 8), other_sizes=(3, 13),
        count=32,  # encoder 2 x (q, k, v, o, wi, wo) + decoder 2 x (self q k v o, cross q k v o, wi, wo)
        sites=(r"encoder\.block\.1\.layer\.0\.SelfAttention\.[qkvo]", r"decoder\.block\.1\.layer\.1\.EncDecAttention\.[qkvo]",
               r"decoder\.block\.0\.layer\.2\.DenseReluDense\.w[io]"),
        not_sites=(r"lm_head",),
    ),
    Case(
        "hf-vit", vit, lambda b, s: {"pixel_values": images(b, s)}, logits, lambda b, s: (b, 5),
        sizes=(2, 32), other_sizes=(3, 32),
        count=12,  # 2 layers x (q, k, v, o, fc1, fc2)
        sites=(r"vit\.layers\.\d\.attention\.[qkvo]_proj", r"vit\.layers\.1\.mlp\.fc[12]"),
        not_sites=(r"classifier", r".*patch_embeddings\.projection"),
    ),
    Case(
        "hf-wav2vec2-ctc", hf_wav2vec2, lambda b, n: {"input_values": torch.randn(b, n)}, logits,
        lambda b, n: (b, hf_wav2vec2_frames(n), VOCAB),
        sizes=(2, 1600), other_sizes=(3, 2400),
        count=13,  # feature projection + 2 layers x (q, k, v, out, intermediate, output)
        sites=(r"wav2vec2\.feature_projection\.projection", r"wav2vec2\.encoder\.layers\.\d\.attention\.[qkv]_proj",
               r"wav2vec2\.encoder\.layers\.1\.feed_forward\.output_dense"),
        not_sites=(r"lm_head",),
        warns=(r".*layer drop.*", r".*SpecAugment.*"),
    ),
    Case(
        "timm-vit_tiny_patch16_224",
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=10),
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
        lambda b, n: (b, wav2vec2_frames(n), 768),
        sizes=(2, 4000), other_sizes=(3, 5600),
        count=73,  # feature projection + 12 layers x (q, k, v, out, intermediate, output)
        sites=(r"encoder\.feature_projection\.projection", r"encoder\.transformer\.layers\.11\.attention\.[kqv]_proj",
               r"encoder\.transformer\.layers\.\d+\.feed_forward\.output_dense"),
        warns=(r".*layer drop.*",),
        lr=3e-3,
    ),
    Case(
        "torchaudio-conformer", conformer, conformer_inputs, first, lambda b, t: (b, t, CONFORMER_DIM),
        sizes=(2, 20), other_sizes=(3, 31),
        count=16,  # 2 layers x (2 ffn x 2 linears, in_proj_weight, out_proj, 2 pointwise convs)
        sites=(r"conformer_layers\.\d\.self_attn\.in_proj_weight", r"conformer_layers\.1\.self_attn\.out_proj",
               r"conformer_layers\.\d\.ffn[12]\.sequential\.[14]", r"conformer_layers\.0\.conv_module\.sequential\.[05]"),
        not_sites=(r"conformer_layers\.\d\.conv_module\.sequential\.2",),  # the depthwise conv
    ),
    Case(
        "custom-functional", Functional, lambda b, s: (images(b, s),), first, lambda b, s: (b, 7),
        sizes=(2, 12), other_sizes=(3, 17),
        count=3,  # the 1x1 conv, F.linear, h @ mix; not the 3x3 stem nor the head
        sites=(r"pointwise", r"fc_weight", r"mix"),
        not_sites=(r"stem", r"head"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
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
