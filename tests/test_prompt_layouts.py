"""Prompt tuning and P-tuning on every sequence layout.

- nn.MultiheadAttention, ``batch_first`` either way: the module runs time-first inside
  ([sequence, batch, hidden]), so adaptc sees the sequence after its internal transpose.
- torchaudio's Conformer: time-first layers, a key padding mask made from ``lengths``.
- timm's EVA-02: rotary position embeddings on every token after the class token.

The reference throughout is built by hand, independent of adaptc's hooks: the base model run with
the adapter's prompt concatenated at the right axis by a forward hook written here, its masks
widened by hand (the virtual tokens unmasked), EVA's rotary table given identity rows (no rotation)
for the virtual tokens, and the virtual positions cut from the output by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_zoo import conformer_inputs, tiny_conformer
from torch import nn

import adaptc

V = 3  # virtual tokens
SLOW = pytest.mark.slow


def _randomize(am: adaptc.AdaptedModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _prompt(am: adaptc.AdaptedModel) -> torch.Tensor:
    with torch.no_grad():
        return am.adapters["default"]["prompt"].prompt().detach().clone()


def _options(method: str) -> dict:
    return {"num_virtual_tokens": V, **({"encoder_hidden_size": 16} if method == "ptuning" else {})}


def _along(prompt: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """The prompt [V, hidden] repeated over the batch axis of ``like`` (3-d, sequence at ``axis``)."""
    return (
        prompt[None].expand(like.shape[0], -1, -1)
        if axis == 1
        else prompt[:, None].expand(-1, like.shape[1], -1)
    )


# --- a custom model with nn.MultiheadAttention ---------------------------------------------------


class MHANet(nn.Module):
    """Features -> linear -> nn.MultiheadAttention (with a key padding mask) -> residual, norm -> head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)
        return self.head(self.norm(h + a))


def _mha_inputs(batch_first: bool, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, length, 8)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1:, length - 2 :] = True  # every row but the first ends in padding
    return (x if batch_first else x.transpose(0, 1).contiguous()), padding


def _mha_reference(
    model: MHANet, prompt: torch.Tensor, x: torch.Tensor, padding: torch.Tensor
) -> torch.Tensor:
    """The base model with the prompt in front of the embedded sequence and its mask columns unmasked."""
    axis = 1 if model.attn.batch_first else 0

    def insert(_module, _args, out):
        return torch.cat([_along(prompt, out, axis), out], dim=axis)

    handle = model.embed.register_forward_hook(insert)
    wide = torch.cat([torch.zeros(padding.shape[0], V, dtype=torch.bool), padding], dim=1)
    try:
        with torch.no_grad():
            out = model(x, wide)
    finally:
        handle.remove()
    return out[:, V:] if axis == 1 else out[V:]


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
def test_multihead_attention_matches_hand_reference(batch_first: bool, method: str):
    torch.manual_seed(0)
    model = MHANet(batch_first).eval()
    am = adaptc.inject(
        model, method, example_inputs=_mha_inputs(batch_first, 2, 7), **_options(method)
    ).eval()
    entry = am.adapter_sites("default")[0]
    assert (entry.module, entry.axis) == ("embed", 1 if batch_first else 0)
    _randomize(am)
    prompt = _prompt(am)
    for batch, length in ((2, 7), (3, 11)):  # the capture's sizes and others
        x, padding = _mha_inputs(batch_first, batch, length)
        with torch.no_grad():
            got, base = am(x, padding), model(x, padding)
        assert got.shape == base.shape
        assert (got - base).abs().max() > 1e-2  # the prompt has an effect
        torch.testing.assert_close(got, _mha_reference(model, prompt, x, padding), atol=2e-5, rtol=0)


def _ort(path, inputs: tuple) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})


@pytest.mark.integration  # ONNX Runtime
# Every pair also equals the hand reference above (unit tier).
@pytest.mark.parametrize(
    "batch_first,method",
    [
        pytest.param(False, "ptuning", id="time_first-ptuning"),
        pytest.param(True, "prompt", id="batch_first-prompt", marks=SLOW),
        pytest.param(True, "ptuning", id="batch_first-ptuning", marks=SLOW),
        pytest.param(False, "prompt", id="time_first-prompt", marks=SLOW),
    ],
)
def test_multihead_attention_trains_saves_merges_exports(tmp_path, batch_first: bool, method: str):
    torch.manual_seed(0)
    model = MHANet(batch_first).eval()
    batch = _mha_inputs(batch_first, 2, 7)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    am = adaptc.inject(model, method, example_inputs=batch, **_options(method))
    with torch.no_grad():
        target = model(*batch) + 0.5
    optimizer = torch.optim.Adam([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    am.train()
    losses = []
    for _ in range(5):
        loss = F.mse_loss(am(*batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    am.eval()
    with torch.no_grad():
        expected = am(*batch)
    torch.testing.assert_close(expected, _mha_reference(model, _prompt(am), *batch), atol=2e-5, rtol=0)

    am.save_adapter(tmp_path / "adapter")
    again = adaptc.load_adapter(model, tmp_path / "adapter", example_inputs=batch).eval()
    with torch.no_grad():
        assert torch.equal(again(*batch), expected)

    merged = am.merge()
    assert not list(merged.adapters.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(*batch), expected, atol=1e-5, rtol=0)
    other = _mha_inputs(batch_first, 3, 10)
    report = adaptc.export_onnx(merged, tmp_path / "mha.onnx", example_inputs=batch, latency_runs=1)
    assert report.parity_max_abs_diff <= 1e-4
    with torch.no_grad():
        reference = am(*other)
    got = torch.from_numpy(_ort(tmp_path / "mha.onnx", other)[0])
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)


# --- torchaudio's Conformer ------------------------------------------------------------------------


def _conformer_reference(model: nn.Module, prompt: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor):
    """The base Conformer with the prompt in front of the frames entering its first layer ([time, batch,
    hidden]) and every layer's key padding mask widened with unmasked columns."""

    def extend(module, args):
        frames, mask = args
        if module is model.conformer_layers[0]:
            frames = torch.cat([_along(prompt, frames, 0), frames], dim=0)
        return frames, torch.cat([mask.new_zeros(mask.shape[0], V), mask], dim=1)

    handles = [layer.register_forward_pre_hook(extend) for layer in model.conformer_layers]
    try:
        with torch.no_grad():
            out, out_lengths = model(x, lengths)
    finally:
        for handle in handles:
            handle.remove()
    return out[:, V:], out_lengths


@pytest.mark.integration  # by time: a Conformer capture
@pytest.mark.parametrize("method", ["prompt", pytest.param("ptuning", marks=SLOW)])
def test_conformer_matches_hand_reference(method: str):
    torch.manual_seed(0)
    model = tiny_conformer().eval()
    am = adaptc.inject(model, method, example_inputs=conformer_inputs(2, 20), **_options(method)).eval()
    entry = am.adapter_sites("default")[0]
    assert (entry.module, entry.where, entry.axis) == ("conformer_layers.0", "input", 0)
    _randomize(am)
    prompt = _prompt(am)
    for batch, frames in ((2, 20), (3, 26)):
        x, lengths = conformer_inputs(batch, frames)
        # Rows with padding: the virtual tokens must stay unmasked there.
        lengths[1:] = frames - 4 - torch.arange(batch - 1)
        with torch.no_grad():
            got, got_lengths = am(x, lengths)
            base, _ = model(x, lengths)
        assert (got - base).abs().max() > 1e-2
        want, want_lengths = _conformer_reference(model, prompt, x, lengths)
        assert torch.equal(got_lengths, lengths) and torch.equal(want_lengths, lengths)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


# --- timm's EVA-02 (rotary position embeddings) ------------------------------------------------------


def _tiny_eva() -> nn.Module:
    from timm.models.eva import Eva

    # EVA-02's layout (rotary embeddings, SwiGLU, scaled MLP norm) at toy size; no head: pooled features out.
    return Eva(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        use_rot_pos_emb=True,
        ref_feat_shape=(4, 4),
        num_classes=0,
        global_pool="avg",
        swiglu_mlp=True,
        scale_mlp=True,
    )


def _eva_reference(model: nn.Module, prompt: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The base EVA with the prompt right after the class token and, in every block, the rotary
    table (sin | cos per patch) given identity rows for the virtual tokens: they are not rotated."""

    def insert(_module, _args, out):
        return torch.cat([out[:, :1], _along(prompt, out, 1), out[:, 1:]], dim=1)

    def identity_rows(_module, args, kwargs):
        rope = kwargs["rope"]
        half = rope.shape[-1] // 2
        still = torch.cat([rope.new_zeros(V, half), rope.new_ones(V, half)], dim=-1)  # sin 0, cos 1
        return args, {**kwargs, "rope": torch.cat([still, rope], dim=0)}

    handles = [model.pos_drop.register_forward_hook(insert)]
    handles += [block.register_forward_pre_hook(identity_rows, with_kwargs=True) for block in model.blocks]
    try:
        with torch.no_grad():
            return model(pixels)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.integration  # by time: ONNX Runtime
@pytest.mark.parametrize("method", ["ptuning", pytest.param("prompt", marks=SLOW)])
def test_eva02_rotary_vit(tmp_path, method: str):
    torch.manual_seed(0)
    model = _tiny_eva().eval()
    pixels = torch.randn(2, 3, 32, 32)
    am = adaptc.inject(model, method, example_inputs=(pixels,), **_options(method)).eval()
    entry = am.adapter_sites("default")[0]
    assert (entry.module, entry.insert_at, entry.axis) == ("pos_drop", 1, 1)
    assert entry.prefix_modules == ("blocks.0.attn", "blocks.1.attn")
    _randomize(am)
    with torch.no_grad():
        got, base = am(pixels), model(pixels)
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, _eva_reference(model, _prompt(am), pixels), atol=2e-5, rtol=0)
    assert all(block.attn.num_prefix_tokens == 1 for block in model.blocks)  # the model is left as it was

    # Training reaches the prompt through the rotary attention; merge and ONNX keep the outputs.
    am.train()
    loss = got.new_tensor(0.0) + am(pixels).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in am.adapters.parameters())
    am.eval()
    merged = am.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixels), got, atol=1e-5, rtol=0)
    report = adaptc.export_onnx(merged, tmp_path / "eva.onnx", latency_runs=1)
    assert report.parity_max_abs_diff <= 1e-4
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = am(other)
    torch.testing.assert_close(
        torch.from_numpy(_ort(tmp_path / "eva.onnx", (other,))[0]), reference, atol=1e-4, rtol=0
    )
