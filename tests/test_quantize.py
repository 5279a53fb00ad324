"""QLoRA: NF4 / int8 frozen base weights under LoRA (passes/quantize.py).

References: the NF4 codebook computed here from the QLoRA paper's definition with erfinv
(the module uses ndtri) and the published table; round-trip errors against the bound the
format allows (half the gap between neighbouring codes times the block's absmax); the
quantized model against an fp model holding the dequantized weights; ONNX Runtime against
PyTorch.
"""

from __future__ import annotations

import math
import re

import model_zoo
import numpy as np
import onnxruntime as ort
import pytest
import torch
from adaptc.passes import quantize as q
from model_zoo import VOCAB, tiny_gpt2
from torch import nn
from transformers import LlamaForCausalLM

import adaptc
from adaptc.errors import ConfigError, ExportError

# bitsandbytes' NF4 table (functional.py), as published with the QLoRA paper (its delta is rounded to 0.9677083).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def reference_nf4() -> torch.Tensor:
    """Paper, sec. 3: q_i from quantiles of N(0,1) with delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2.

    Phi^-1(p) = sqrt(2) erfinv(2p - 1); 8 positive quantiles on [0.5, delta], 7 negative, and 0.
    """
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))

    def ppf(p: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2) * torch.erfinv(2 * p - 1)

    pos = [ppf(torch.tensor(delta - (delta - 0.5) * i / 8, dtype=torch.float64)) for i in range(8)]
    neg = [-ppf(torch.tensor(delta - (delta - 0.5) * i / 7, dtype=torch.float64)) for i in range(7)]
    values = torch.stack(pos + neg + [torch.tensor(0.0, dtype=torch.float64)]).sort().values
    return values / values.abs().max()


def test_nf4_codebook_matches_the_papers_definition() -> None:
    code = q.nf4_codebook().double()
    assert code.shape == (16,)
    torch.testing.assert_close(code, reference_nf4(), atol=1e-7, rtol=0)
    torch.testing.assert_close(code, torch.tensor(PUBLISHED_NF4, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(48, 64), (7, 100), (3, 5)], ids=["whole-blocks", "padded", "tiny"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_within_the_format_bound(shape: tuple[int, int], double_quant: bool) -> None:
    w = torch.randn(shape) * 0.05
    w[0, :3] = torch.tensor([0.3, -0.3, 0.0])  # an outlier sets one block's absmax
    packed, absmax = q.quantize_nf4(w, 64)
    numel = w.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 64) * 32
    code = reference_nf4().float()
    half_gap = ((code[1:] - code[:-1]) / 2).max()
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, -numel % 64)).reshape(-1, 64)
    torch.testing.assert_close(absmax, blocks.abs().amax(1))
    scales = absmax
    if double_quant:
        q8, scale2, offset = q.quantize_scales(absmax)
        scales = q.dequantize_scales(q8, scale2, offset, absmax.numel())
        scale_bound = scale2.repeat_interleave(256)[: absmax.numel()] / 2 + 1e-7
        assert ((scales - absmax).abs() <= scale_bound).all()
    back = q.dequantize_nf4(packed, scales, q.nf4_codebook(), shape, 64)
    assert back.shape == shape
    # |w - c*s'| <= |w - c*s| + |c| |s - s'| with |c| <= 1.
    bound = absmax * half_gap + (scales - absmax).abs() + 1e-6
    err = torch.nn.functional.pad((back - w).reshape(-1), (0, -numel % 64)).reshape(-1, 64)
    assert (err.abs() <= bound[:, None]).all()
    # Each value takes the nearest code: no other code is closer (checked without double quantization).
    if not double_quant:
        normalized = blocks / absmax[:, None].clamp_min(1e-12)
        nearest = code[(normalized[..., None] - code).abs().argmin(-1)]
        got = torch.nn.functional.pad(back.reshape(-1), (0, -numel % 64)).reshape(-1, 64) / absmax[:, None].clamp_min(1e-12)
        torch.testing.assert_close(got, nearest, atol=1e-6, rtol=0)


def test_nf4_codes_round_trip_exactly_and_pack_high_nibble_first() -> None:
    code = q.nf4_codebook()
    w = (code[torch.arange(64) % 16] * 0.5).reshape(2, 32)  # every code, absmax 0.5
    packed, absmax = q.quantize_nf4(w)
    assert packed[0].item() == (0 << 4) | 1  # first value in the high nibble
    torch.testing.assert_close(q.dequantize_nf4(packed, absmax, code, (2, 32)), w, atol=0, rtol=0)
    zero_packed, zero_absmax = q.quantize_nf4(torch.zeros(4, 64))
    assert torch.equal(q.dequantize_nf4(zero_packed, zero_absmax, code, (4, 64)), torch.zeros(4, 64))


def test_int8_round_trip_within_half_a_step_per_row() -> None:
    w = torch.randn(16, 40)
    w[3] = 0.0
    qw, scale = q.quantize_int8(w)
    assert qw.dtype == torch.int8
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    back = q.dequantize_int8(qw, scale)
    assert ((back - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(back[3], torch.zeros(40))


# --- the quantized model ------------------------------------------------------------------------------

def tiny_llama() -> LlamaForCausalLM:
    return model_zoo.tiny_llama(hidden_size=64, intermediate_size=96, max_position_embeddings=2048,
                                tie_word_embeddings=False, seed=0).eval()


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def dequantized_reference(model: nn.Module, fmt: str) -> nn.Module:
    """An fp model whose linear weights are replaced by their quantize -> dequantize round trip."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and name != "lm_head":
                if fmt == "nf4":
                    packed, absmax = q.quantize_nf4(module.weight)
                    q8, s2, off = q.quantize_scales(absmax)
                    absmax = q.dequantize_scales(q8, s2, off, absmax.numel())
                    module.weight.copy_(q.dequantize_nf4(packed, absmax, q.nf4_codebook(), tuple(module.weight.shape)))
                else:
                    module.weight.copy_(q.dequantize_int8(*q.quantize_int8(module.weight)))
    return model


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama with an NF4 base and LoRA, trained 12 steps on one fixed batch."""
    torch.manual_seed(0)
    model = tiny_llama()
    reference = dequantized_reference(tiny_llama(), "nf4")
    inputs = batch()
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=4, alpha=8, quantize="nf4")
    with torch.no_grad():
        initial = am(**inputs)
        expected = reference(**inputs)
    before = quantized_state(model)
    optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = am(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"am": am, "model": model, "initial": initial, "expected": expected, "before": before,
            "losses": losses, "inputs": inputs}


@pytest.mark.integration  # by time (make test-unit under 2 minutes): the quantized Llama end to end
def test_quantized_llama_matches_dequantized_reference_and_keeps_every_site(trained) -> None:
    am, model = trained["am"], trained["model"]
    quantized = q.quantized_modules(model)
    assert len(quantized) == 14 and "lm_head" not in quantized  # 7 projections x 2 layers; the head stays fp
    assert {s.name for s in am.sites} == set(quantized)
    assert all(s.op == "adaptc.quant_linear" for s in am.sites)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.uint8
    # LoRA's B starts at zero: the adapted quantized model is the dequantized base.
    torch.testing.assert_close(trained["initial"].logits, trained["expected"].logits, atol=1e-5, rtol=1e-5)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): the quantized Llama end to end
def test_quantized_llama_trains_only_lora_and_keeps_base_bytes(trained) -> None:
    am, losses = trained["am"], trained["losses"]
    assert losses[-1] < 0.8 * losses[0], losses
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = trained["model"].state_dict()
    for name, value in trained["before"].items():
        assert torch.equal(after[name], value), name
    bytes_ = q.weight_bytes(trained["model"])
    fp_bytes = sum(m.in_features * m.out_features * 4 for m in q.quantized_modules(trained["model"]).values())
    assert bytes_["quantized"] <= 0.2 * fp_bytes


@pytest.mark.integration  # by time (make test-unit under 2 minutes): the quantized Llama end to end
def test_save_and_load_adapter_on_a_quantized_base(trained, tmp_path) -> None:
    am, inputs = trained["am"], trained["inputs"]
    am.save_adapter(tmp_path)
    fresh = tiny_llama()
    adaptc.quantize_model(fresh, "nf4")
    loaded = adaptc.load_adapter(fresh, tmp_path, example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, am(**inputs).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.integration
@pytest.mark.slow
def test_onnx_export_of_the_merged_quantized_llama(trained, tmp_path) -> None:
    am, inputs = trained["am"], trained["inputs"]
    report = adaptc.export_onnx(am, tmp_path / "qlora.onnx", optimize=False, latency_runs=1)
    assert max(report.parity.values()) <= 1e-4
    assert q.quantized_modules(trained["model"])  # the user's model is still quantized and adapted
    session = ort.InferenceSession(str(tmp_path / "qlora.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        expected = am(**inputs).logits  # the quantized model with its adapter, unmerged
    np.testing.assert_allclose(outputs["logits"], expected.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportError, match="quantized base"):
        adaptc.export_onnx(am, tmp_path / "u.onnx", merge=False)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): the quantized Llama end to end
def test_merge_keep_fp_then_requantize(trained) -> None:
    """Last user of the fixture: merge(requantize=True) consumes the adapter."""
    from adaptc.targets.merge import merged_copy

    am, inputs = trained["am"], trained["inputs"]
    with torch.no_grad():
        adapted = am(**inputs).logits
    merged = merged_copy(am)  # dequantize + delta, full precision, am untouched
    assert not q.quantized_modules(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=1e-5)

    fp_weight = merged.model.layers[1].mlp.up_proj.weight.detach().clone()
    requantized = am.merge(requantize=True)
    layer = requantized.model.layers[1].mlp.up_proj
    assert isinstance(layer, q.QuantLinear) and layer.weight.dtype == torch.uint8
    # The re-quantized layer holds exactly the NF4 round trip of the fp merged weight.
    packed, absmax = q.quantize_nf4(fp_weight)
    assert torch.equal(layer.weight, packed)
    q8, s2, off = q.quantize_scales(absmax)
    torch.testing.assert_close(layer.dequantize(), q.dequantize_nf4(
        packed, q.dequantize_scales(q8, s2, off, absmax.numel()), q.nf4_codebook(), tuple(fp_weight.shape)))
    with torch.no_grad():
        drift = (requantized(**inputs).logits - adapted).abs().max().item()
        assert 0 < drift < 0.5  # quantization error, not a wrong merge
        # am's graph reads the same (re-quantized) tensors and no longer adds the adapter.
        torch.testing.assert_close(am(**inputs).logits, requantized(**inputs).logits, atol=1e-5, rtol=1e-5)


# --- small models: int8, bf16, bad input ------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(100, 128)  # 100 inputs: not a multiple of the block size
        self.down = nn.Linear(128, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("fmt,compute", [("int8", "fp32"), ("nf4", "bf16"), ("int8", "bf16")])
def test_formats_and_compute_dtypes_train(fmt: str, compute: str) -> None:
    model = MLP()
    x, target = torch.randn(16, 100), torch.randn(16, 8)
    with torch.no_grad():
        fp = model(x)
    config = q.QuantConfig(format=fmt, compute_dtype=compute)
    am = adaptc.inject(model, "lora", example_inputs=(x,), r=4, targets=["up", "down"], quantize=config)
    assert {s.name for s in am.sites} == {"up", "down"}
    assert model.up.compute_dtype == (torch.bfloat16 if compute == "bf16" else torch.float32)
    with torch.no_grad():
        out = am(x)
    assert out.dtype == torch.float32
    tol = {"int8": 0.02, "nf4": 0.15}[fmt] + (0.05 if compute == "bf16" else 0)
    assert (out - fp).abs().max() < tol * fp.abs().max()
    before = quantized_state(model)
    optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(am(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        adapted = am(x)
        merged = am.merge()  # dequantize + delta into plain nn.Linear layers of the user's model
        assert merged is model and type(model.up) is nn.Linear and model.up.weight.dtype == torch.float32
        tol = 1e-5 if compute == "fp32" else 2e-2 * adapted.abs().max().item()  # bf16 compute vs fp32 merged
        torch.testing.assert_close(merged(x), adapted, atol=tol, rtol=0)


def test_bad_quantize_options_fail_before_the_model_changes() -> None:
    model = MLP()
    x = torch.randn(2, 100)
    for bad, match in [("nf3", "quantize must be one of"), (3, "quantize must be"),
                       (q.QuantConfig(compute_dtype="fp16"), "compute_dtype"),
                       (q.QuantConfig(block_size=63), "block_size")]:
        with pytest.raises(ConfigError, match=match):
            adaptc.inject(model, "lora", example_inputs=(x,), quantize=bad)
        assert type(model.up) is nn.Linear
    with pytest.raises(ConfigError, match="plain LoRA"):
        adaptc.inject(model, "lora", example_inputs=(x,), quantize="nf4", use_dora=True)
    assert type(model.up) is nn.Linear and model.up.weight.requires_grad


def test_failed_inject_puts_the_linear_layers_back() -> None:
    model = MLP()
    with pytest.raises(adaptc.InputError):
        adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 7),), quantize="nf4")  # wrong input size
    assert type(model.up) is nn.Linear and type(model.down) is nn.Linear


@pytest.mark.integration
def test_onnx_export_of_a_merged_nf4_model(tmp_path) -> None:
    model = MLP()
    x = torch.randn(4, 100)
    am = adaptc.inject(model, "lora", example_inputs=(x,), r=4, targets=["up", "down"], quantize="nf4")
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a non-zero update to merge
    report = adaptc.export_onnx(am, tmp_path / "mlp.onnx", optimize=False, latency_runs=1)
    assert max(report.parity.values()) <= 1e-4
    assert isinstance(model.up, q.QuantLinear)  # export merges into a copy; the user's model is untouched
    session = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"])
    fresh = torch.randn(3, 100)
    (got,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, am(fresh).numpy(), atol=1e-5, rtol=1e-5)  # vs the unmerged NF4 model
    with pytest.raises(ExportError, match="quantized base"):
        adaptc.export_onnx(am, tmp_path / "u.onnx", merge=False)


@pytest.mark.slow
def test_cli_inject_quantize_nf4_on_gpt2_conv1d(capsys, tmp_path) -> None:
    from pathlib import Path

    from adaptc.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_gpt2.py")
    assert main(["inject", tiny, "--method", "lora", "--quantize", "nf4", "--compute-dtype", "bf16", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "adaptc.quant_linear" in line]
    assert len(rows) == 8  # GPT-2's Conv1D projections (c_attn, c_proj, c_fc, mlp.c_proj) x 2 layers
    assert re.search(r"quantized base: nf4 linear weights take [0-9.]+ MiB \(compute torch.bfloat16\)", out)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_cli_rejects_an_unknown_format_before_building_the_model(capsys) -> None:
    from pathlib import Path

    from adaptc.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_gpt2.py")
    assert main(["inject", tiny, "--quantize", "nf3"]) == 2
    assert "invalid choice: 'nf3'" in capsys.readouterr().err


def test_gpt2_conv1d_layers_quantize_to_the_transposed_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = dict(n_positions=16, n_embd=64, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0)
    model, reference = tiny_gpt2(**config).eval(), tiny_gpt2(**config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, Conv1D):  # weight stored [in, out]: quantize it as the [out, in] linear weight
                packed, absmax = q.quantize_nf4(module.weight.T)
                module.weight.copy_(q.dequantize_nf4(packed, absmax, q.nf4_codebook(), tuple(module.weight.T.shape)).T)
    replaced = adaptc.quantize_model(model, "nf4", double_quant=False)
    assert len(replaced) == 4 and isinstance(model.transformer.h[0].attn.c_attn, q.QuantLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head stays as it was
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_quantize_with_nothing_to_quantize_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ConfigError, match="no nn.Linear"):
        adaptc.inject(model, "lora", example_inputs=(torch.tensor([[1, 2]]),), quantize="int8")
