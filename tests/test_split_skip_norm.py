"""targets/split_skip_norm.py: fused skip-norms split into Add + normalization, checked against ORT's
fused kernels themselves, and in a real export (GPT-2: the file holds no fused skip-norm, parity holds).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from adaptc.targets.split_skip_norm import split_skip_norms
from model_zoo import tiny_gpt2
from onnx import TensorProto, helper

import adaptc

HIDDEN = 16


def fused_model(op: str, read_mean: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(HIDDEN).astype(np.float32) for name in ("gamma", "beta", "bias")}
    if op == "SkipLayerNormalization":
        inputs = ["x", "skip", "gamma", "beta", "bias"]
    else:
        inputs = ["x", "skip", "gamma", "bias"]
    outputs = ["y", "mean" if read_mean else "", "", "sum"]
    nodes = [helper.make_node(op, inputs, outputs, domain="com.microsoft", epsilon=1e-5)]
    graph_outputs = ["y", "sum"] + (["mean"] if read_mean else [])
    graph = helper.make_graph(
        nodes, "fused",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", HIDDEN]) for n in ("x", "skip")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in graph_outputs],
        [helper.make_tensor(n, TensorProto.FLOAT, [HIDDEN], v) for n, v in weights.items() if n in inputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the kernels as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.integration
@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_split_norm_computes_what_the_fused_kernel_does(op):
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 5, HIDDEN)).astype(np.float32) * 3 for n in ("x", "skip")}
    fused = fused_model(op)
    expected = run(fused, feeds)

    model = ir.from_proto(fused)
    assert split_skip_norms(model) == 1
    split = ir.to_proto(model)
    assert [n.op_type for n in split.graph.node] == ["Add", "Add", op.removeprefix("Skip")]
    assert [o.name for o in split.graph.output] == ["y", "sum"]
    for got, want in zip(run(split, feeds), expected):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_norm_whose_statistics_are_read_stays_fused():
    model = ir.from_proto(fused_model("SkipLayerNormalization", read_mean=True))
    assert split_skip_norms(model) == 0
    assert [n.op_type for n in model.graph] == ["SkipLayerNormalization"]


@pytest.mark.integration
def test_gpt2_export_has_no_fused_skip_norm_and_keeps_parity(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2(n_positions=32).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=4)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    report = adaptc.export_onnx(am, tmp_path / "m.onnx")
    assert report.fusions.get("skip-norms split back (adaptc)", 0) >= 4, report.fusions  # 2 per layer
    assert not any(op.startswith("Skip") for op in report.fused_ops), report.fused_ops
    assert report.parity_max_abs_diff <= 1e-4  # the export's own check: ORT against the model in PyTorch
