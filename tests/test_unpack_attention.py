"""targets/unpack_attention.py: ORT's packed Attention rewritten as three MatMuls + MultiHeadAttention.

The reference is ONNX Runtime's own ``Attention`` kernel on the packed graph; the int8 check
exports a BERT (whose Q/K/V onnxscript packs into ``Attention``) and looks at what got quantized.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from adaptc.targets.unpack_attention import unpack_attention
from model_zoo import tiny_bert
from onnx import TensorProto, helper

import adaptc

HIDDEN, HEADS = 16, 2


def packed_attention_model(mask_index: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32) * 0.3
    bias = rng.standard_normal(3 * HIDDEN).astype(np.float32) * 0.1
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
              helper.make_tensor_value_info("attention_bias", TensorProto.FLOAT, ["batch", 1, "seq", "seq"])]
    names = ["x", "weight", "bias", "", "", "attention_bias"]
    if mask_index:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, ["batch"]))
        names[3] = "mask"
    node = helper.make_node("Attention", names, ["y"], domain="com.microsoft", num_heads=HEADS,
                            qkv_hidden_sizes=[HIDDEN] * 3, unidirectional=0)
    graph = helper.make_graph(
        [node], "packed", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel()),
         helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.integration
def test_unpacked_attention_computes_what_the_packed_kernel_does():
    packed = packed_attention_model()
    rng = np.random.default_rng(1)
    bias = np.where(rng.random((3, 1, 5, 5)) < 0.3, -1e4, 0).astype(np.float32)  # some keys masked out
    feeds = {"x": rng.standard_normal((3, 5, HIDDEN)).astype(np.float32), "attention_bias": bias}
    expected = run(packed, feeds)

    model = ir.from_proto(packed)
    assert unpack_attention(model) == 1
    unpacked = ir.to_proto(model)
    ops = Counter(n.op_type for n in unpacked.graph.node)
    assert ops == {"MatMul": 3, "MultiHeadAttention": 1}, ops
    assert [o.name for o in unpacked.graph.output] == ["y"]
    np.testing.assert_allclose(run(unpacked, feeds), expected, atol=1e-5, rtol=0)


def test_attention_with_a_mask_index_is_left_packed():
    model = ir.from_proto(packed_attention_model(mask_index=True))
    assert unpack_attention(model) == 0
    assert [n.op_type for n in model.graph] == ["Attention"]


@pytest.fixture(scope="module")
def bert_int8(tmp_path_factory):
    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    am = adaptc.inject(tiny_bert(max_position_embeddings=32).eval(), "lora", example_inputs=inputs, r=4)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("bert") / "m.onnx"
    return adaptc.export_onnx(am, path, quantize="int8"), path


@pytest.mark.integration
def test_bert_int8_quantizes_the_attention_projections(bert_int8):
    report, path = bert_int8
    assert report.fused_ops.get("Attention") == 2, report.fused_ops  # the fp32 model keeps the packed kernel
    int8 = onnx.load(report.quantized["path"])
    ops = Counter(n.op_type for n in int8.graph.node)
    assert "Attention" not in ops and ops["MultiHeadAttention"] == 2, ops
    weights = {i.name for i in int8.graph.initializer}
    float_matmuls = [n.name for n in int8.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert not float_matmuls  # every projection with a stored weight runs in int8
    quantized = ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] + ops["MatMulInteger"]
    assert quantized >= 2 * 6, ops  # per layer: q, k, v, attention output, intermediate, output
    assert report.quantized["max_abs_diff_vs_torch"] < 0.1  # int8 changes the logits a little, not wildly
    assert not (path.parent / "int8-stage").exists()
