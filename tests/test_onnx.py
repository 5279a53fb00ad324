"""export_onnx: merged and unmerged (ORT LoRA adapters) exports checked against PyTorch, and bad input.

References are independent of the export: the adapted model run in PyTorch, the unadapted
model, and each adapter's own merged export. Nothing here times anything.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torchaudio
from model_zoo import (
    VOCAB,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_timm_vit,
    tiny_vit,
    tiny_wav2vec2,
)
from torch import nn
from transformers import BertForSequenceClassification, GPT2LMHeadModel, OPTForCausalLM

import adaptc
from adaptc.errors import ExportError

pytestmark = pytest.mark.integration  # ONNX export and ONNX Runtime sessions


def randomize(am: adaptc.AdaptedModel, name: str | None = None, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in am.adapter_parameters(name):
            p.add_(torch.randn_like(p) * std)


def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2(n_positions=32, bos_token_id=0, eos_token_id=0).eval()


def gpt2_inputs(batch: int = 2, length: int = 8) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (batch, length)), "use_cache": False}


def opt() -> OPTForCausalLM:
    return tiny_opt(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64).eval()


def bert() -> BertForSequenceClassification:
    return tiny_bert(max_position_embeddings=32).eval()


def session_outputs(path: str, feeds: dict, adapters: list[str] = ()) -> list[np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    for file in adapters:
        adapter = ort.LoraAdapter()
        adapter.Load(file)
        options.add_active_adapter(adapter)
    return session.run(None, feeds, options)


def only_files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- merged -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    torch.manual_seed(0)
    model = gpt2()
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), r=4, alpha=8)
    randomize(am)
    before = {n: p.clone() for n, p in am.named_parameters()}
    path = tmp_path_factory.mktemp("gpt2") / "model.onnx"
    report = adaptc.export_onnx(am, path, quantize="int8")
    return am, before, path, report


def test_gpt2_merged_export_matches_the_adapted_model(gpt2_export):
    am, before, path, report = gpt2_export
    assert report.merged and report.parity_max_abs_diff <= 1e-4
    assert report.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert str(path) in report.files and report.files[str(path)] == os.path.getsize(path)
    assert report.fused_ops  # ORT fused at least something (SkipLayerNormalization, FastGelu, ...)
    # GPT-2's Conv1D exports as Reshape -> Gemm -> Reshape; targets/flat_gemm.py lets attention fuse anyway.
    assert report.fused_ops.get("MultiHeadAttention", 0) + report.fused_ops.get("Attention", 0) == 2, report.fused_ops
    assert not any("skipped" in name for name in report.fusions), report.fusions
    # Our own check at yet another shape: ORT vs the adapted model in PyTorch.
    check = gpt2_inputs(4, 5)
    (logits,) = session_outputs(str(path), {"input_ids": check["input_ids"].numpy()})
    am.eval()
    with torch.no_grad():
        expected = am(**check).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    # The user's AdaptedModel keeps its adapters and weights: merging was for the export only.
    assert list(am.adapters) == ["default"]
    assert all(torch.equal(p, before[n]) for n, p in am.named_parameters())
    with torch.no_grad(), am.disable_adapters():
        assert (am(**check).logits - expected).abs().max() > 1e-3


def test_int8_model_is_written_and_close(gpt2_export):
    _, _, path, report = gpt2_export
    q = report.quantized
    int8 = path.with_name("model.int8.onnx")
    assert q["path"] == str(int8) and int8.exists() and q["size"] < os.path.getsize(path)
    assert 0 < q["max_abs_change"] < 0.5  # int8 changes the numbers, but not wildly
    ops = {n.op_type for n in __import__("onnx").load(str(int8)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}


@pytest.mark.parametrize("case", ["bert", "resnet18"])
def test_merged_export_bert_and_resnet(case, tmp_path):
    torch.manual_seed(0)
    if case == "bert":
        model = bert()
        inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    else:
        model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
        inputs = (torch.randn(2, 3, 64, 64),)
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=4)
    randomize(am)
    report = adaptc.export_onnx(am, tmp_path / "m.onnx")
    assert report.parity_max_abs_diff <= 1e-4
    assert report.dynamic_axes[next(iter(report.dynamic_axes))][0] == "batch"
    assert only_files(tmp_path) == {"m.onnx"}


@pytest.mark.parametrize("case", ["gpt2", "resnet18"])
def test_external_data_export_runs_from_its_folder(case, tmp_path):
    """Weights in ``m.onnx.data`` beside the model: GPT-2's file is rewritten after ORT's optimization
    (skip-norms split back), ResNet's moved as ORT wrote it; either must still find its weights."""
    torch.manual_seed(0)
    if case == "gpt2":
        model, inputs = gpt2(), gpt2_inputs()
    else:
        model, inputs = timm.create_model("resnet18", pretrained=False, num_classes=10).eval(), (torch.randn(2, 3, 64, 64),)
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=4)
    randomize(am)
    report = adaptc.export_onnx(am, tmp_path / "m.onnx", external_data=True, latency_runs=1)
    assert only_files(tmp_path) == {"m.onnx", "m.onnx.data"}
    assert ("skip-norms split back (adaptc)" in report.fusions) == (case == "gpt2")
    feeds = {"input_ids": inputs["input_ids"].numpy()} if case == "gpt2" else {"x": inputs[0].numpy()}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: next(iter(feeds.values())) for i in session.get_inputs()}
    with torch.no_grad():
        expected = am(**inputs) if case == "gpt2" else am(*inputs)
    expected = expected.logits if case == "gpt2" else expected
    np.testing.assert_allclose(session.run(None, feeds)[0], expected.numpy(), atol=1e-4, rtol=1e-4)


def test_llama_exported_from_one_row_runs_any_batch_and_length(tmp_path):
    """torch.export specialises a size-1 axis to the constant 1; an export from a single prompt must still
    serve batches. The adapter was captured from other keywords, so the export captures anew from 1 row."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    capture = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
               "use_cache": False}
    am = adaptc.inject(model, "lora", example_inputs=capture, r=4)
    randomize(am)
    path = tmp_path / "llama.onnx"
    report = adaptc.export_onnx(am, path, example_inputs={"input_ids": torch.randint(0, VOCAB, (1, 10)), "use_cache": False})
    assert report.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    ids = torch.randint(0, VOCAB, (3, 13))  # another batch and a new length, neither seen in capture or export
    (got,) = session_outputs(str(path), {"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = am(input_ids=ids, use_cache=False).logits.numpy()
    assert got.shape == expected.shape == (3, 13, VOCAB)
    assert np.abs(got - expected).max() <= 1e-4


# --- unmerged: one session, adapters switched per run ------------------------------------------------

def test_unmerged_adapters_equal_their_merged_exports_and_base(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), r=4, alpha=8)
    randomize(am, "default")
    am.add_adapter("other", targets=["c_attn", "wpe"], r=2, alpha=4, use_dora=False)
    randomize(am, "other")
    report = adaptc.export_onnx(am, tmp_path / "u.onnx", merge=False)
    assert set(report.adapters) == {"default", "other"}
    # The adapters' Gemms on flattened inputs no longer break the fusions (targets/flat_gemm.py), and the
    # LoRA inputs survive them (targets/ort.py::_restore_inputs): the checks below feed them.
    assert not any("skipped" in name for name in report.fusions), report.fusions
    assert report.fused_ops.get("MultiHeadAttention") == 2, report.fused_ops
    assert all(os.path.exists(f) and f.endswith(".onnx_adapter") for f in report.adapters.values())

    feeds = {"input_ids": gpt2_inputs(3, 6)["input_ids"].numpy()}
    for name in ("default", "other"):
        am.set_adapter(name)
        adaptc.export_onnx(am, tmp_path / f"merged_{name}.onnx")
        (merged,) = session_outputs(str(tmp_path / f"merged_{name}.onnx"), feeds)
        (swapped,) = session_outputs(str(tmp_path / "u.onnx"), feeds, [report.adapters[name]])
        np.testing.assert_allclose(swapped, merged, atol=1e-4, rtol=0)
    (plain,) = session_outputs(str(tmp_path / "u.onnx"), feeds)
    with torch.no_grad():
        base = model(input_ids=torch.from_numpy(feeds["input_ids"]), use_cache=False).logits
    np.testing.assert_allclose(plain, base.numpy(), atol=1e-4, rtol=0)
    assert np.abs(swapped - plain).max() > 1e-3


@pytest.mark.parametrize("case", ["opt", "bert"])
def test_unmerged_lora_on_biased_qkv_is_not_fused_as_the_attention_bias(case, tmp_path):
    """q/k/v projections with a bias whose Adds feed attention directly (OPT, BERT, BART, ViT, CLIP ...): unmerged,
    each is ``Add(x @ W + b, lora_delta)``, and onnxscript's MHA bias fusion took the [batch, seq, D] delta for
    the 1-D bias, so ORT failed at run time ("Input 'bias' is expected to have 1 dimension, got 3");
    targets/mha_bias.py lets it take only true biases."""
    torch.manual_seed(0)
    model = opt() if case == "opt" else bert()
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": torch.randint(0, VOCAB, (2, 8))},
                       targets="all-linear", r=4)
    randomize(am)  # lora_B nonzero: the adapter changes the outputs
    report = adaptc.export_onnx(am, tmp_path / "u.onnx", merge=False, latency_runs=1)
    assert not any("skipped" in name for name in report.fusions), report.fusions
    assert report.fused_ops.get("MultiHeadAttention") == 2, report.fused_ops

    ids = torch.randint(0, VOCAB, (3, 6))  # neither the capture's batch nor its length
    (adapted,) = session_outputs(str(tmp_path / "u.onnx"), {"input_ids": ids.numpy()}, [report.adapters["default"]])
    (plain,) = session_outputs(str(tmp_path / "u.onnx"), {"input_ids": ids.numpy()})
    am.eval()
    with torch.no_grad():
        expected = am(input_ids=ids).logits.numpy()
        base = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(adapted, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(plain, base, atol=1e-4, rtol=0)
    assert np.abs(expected - base).max() > 1e-3


def test_merged_opt_still_fuses_its_true_qkv_bias(tmp_path):
    """The guard refuses per-token addends only: a merged export's 1-D q/k/v biases still go into the attention."""
    torch.manual_seed(0)
    am = adaptc.inject(opt(), "lora", example_inputs={"input_ids": torch.randint(0, VOCAB, (2, 8))},
                       targets="all-linear", r=4)
    randomize(am)
    report = adaptc.export_onnx(am, tmp_path / "m.onnx", latency_runs=1)
    assert report.fusions.get("mha_bias") == 2, report.fusions
    assert report.parity_max_abs_diff <= 1e-4


# --- bad input: clear errors, no files left -------------------------------------------------------

class Noisy(nn.Module):
    """Adds fresh noise on every call: no two runtimes can agree, so parity must fail."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + torch.rand_like(x)


def small_adapted(model=None):
    model = model or nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    return adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 8),), targets=["fc"] if isinstance(model, Noisy) else "all-linear", r=2)


def test_parity_failure_raises_and_leaves_nothing(tmp_path):
    am = small_adapted(Noisy().eval())
    with pytest.raises(ExportError, match=r"parity check failed: ONNX Runtime differs from PyTorch by [\d.e+-]+ \(> atol"):
        adaptc.export_onnx(am, tmp_path / "n.onnx")
    assert only_files(tmp_path) == set()


def test_unwritable_paths(tmp_path):
    am = small_adapted()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="does not exist"):
        adaptc.export_onnx(am, blocker / "m.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        adaptc.export_onnx(am, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="must end in .onnx"):
        adaptc.export_onnx(am, tmp_path / "m.txt")
    assert only_files(tmp_path) == {"file.txt"}


def test_bad_opset_and_options(tmp_path):
    am = small_adapted()
    with pytest.raises(ExportError, match="opset must be an integer from 18"):
        adaptc.export_onnx(am, tmp_path / "m.onnx", opset=99)
    with pytest.raises(ExportError, match="quantize='int8' applies to a merged export"):
        adaptc.export_onnx(am, tmp_path / "m.onnx", merge=False, quantize="int8")
    assert only_files(tmp_path) == set()


@torch.library.custom_op("adaptc_test::twist", mutates_args=())
def twist(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


@twist.register_fake
def _(x):
    return torch.empty_like(x)


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return twist(self.fc(x))


def test_op_without_onnx_lowering_names_the_op(tmp_path):
    am = small_adapted(CustomOp().eval()) if False else adaptc.inject(
        CustomOp().eval(), "lora", example_inputs=(torch.randn(2, 8),), targets=["fc"], r=2)
    with pytest.raises(ExportError, match=r"torch.onnx.export failed.*twist.*Hint"):
        adaptc.export_onnx(am, tmp_path / "c.onnx")
    assert only_files(tmp_path) == set()


# --- the rest of the zoo (slow) -------------------------------------------------------------------------

def _zoo():
    return {
        "llama": (lambda: tiny_llama().eval(), lambda: {"input_ids": torch.randint(0, VOCAB, (2, 8)), "use_cache": False}),
        "hf-vit": (lambda: tiny_vit().eval(), lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
        "timm-vit_tiny": (lambda: tiny_timm_vit().eval(), lambda: (torch.randn(2, 3, 32, 32),)),
        "hf-wav2vec2": (lambda: tiny_wav2vec2().eval(), lambda: {"input_values": torch.randn(2, 1600)}),
        "torchaudio-wav2vec2_base": (lambda: torchaudio.models.wav2vec2_base().eval(), lambda: (torch.randn(1, 4000),)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_zoo()))
def test_zoo_merged_export(case, tmp_path):
    torch.manual_seed(0)
    build, inputs = _zoo()[case]
    am = adaptc.inject(build(), "lora", example_inputs=inputs(), r=4)
    randomize(am)
    report = adaptc.export_onnx(am, tmp_path / "m.onnx")
    assert report.parity_max_abs_diff <= 1e-4
    assert "batch" in report.dynamic_axes[next(iter(report.dynamic_axes))].values()
