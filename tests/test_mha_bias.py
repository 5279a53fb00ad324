"""targets/mha_bias.py: onnxscript's MultiHeadAttention bias fusion takes 1-D biases only, and the rule it
replaces is put back afterwards.

The graphs are written by hand: ``MultiHeadAttention(Add(x @ Wq, addend), x @ Wk, x @ Wv)``, the shape the
rule matches, with the addend a true bias or a per-token tensor (an unmerged LoRA's delta).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest
from adaptc.targets.mha_bias import true_bias_mha
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter.ort_fusions import _core

D, HEADS = 8, 2


def attention_model(addend: str) -> ir.Model:
    """``addend``: 'bias' (a [D] initializer), 'broadcast' (a [1, 1, D] initializer) or 'delta' (a
    [batch, seq, D] graph input)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), f"w{n}") for n in "qkv"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])
    inputs = [x]
    if addend == "delta":
        inputs.append(helper.make_tensor_value_info("addend", TensorProto.FLOAT, ["batch", "seq", D]))
    else:
        shape = (D,) if addend == "bias" else (1, 1, D)
        weights.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "addend"))
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_mm"]) for n in "qkv"]
    nodes.append(helper.make_node("Add", ["q_mm", "addend"], ["q"]))
    nodes.append(helper.make_node("MultiHeadAttention", ["q", "k_mm", "v_mm"], ["y"], domain="com.microsoft",
                                  num_heads=HEADS))
    graph = helper.make_graph(nodes, "mha", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                   ["batch", "seq", D])], weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model = ir.from_proto(proto)
    common_passes.ShapeInferencePass()(model)  # the rule reads the MatMuls' shapes, as in optimize_for_ort
    return model


def run(model: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def mha_bias(model: ir.Model) -> ir.Value | None:
    (node,) = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    return node.inputs[3] if len(node.inputs) > 3 else None


@pytest.mark.integration
@pytest.mark.parametrize("addend", ["bias", "broadcast", "delta"])
def test_only_a_one_dimensional_bias_is_fused(addend):
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, D)).astype(np.float32)}
    if addend == "delta":
        feeds["addend"] = rng.standard_normal((2, 3, D)).astype(np.float32)
    expected = run(attention_model(addend), feeds)
    model = attention_model(addend)
    with true_bias_mha():
        fused = _core.fuse_mha_bias(model)
    assert fused == (addend == "bias")
    assert (mha_bias(model) is not None) == (addend == "bias")
    np.testing.assert_allclose(run(model, feeds), expected, atol=1e-5, rtol=0)


def test_the_original_rule_is_put_back():
    original = _core.fuse_mha_bias
    with true_bias_mha():
        guarded = _core.fuse_mha_bias
        assert guarded is not original
        with true_bias_mha():
            assert _core.fuse_mha_bias is guarded
        assert _core.fuse_mha_bias is guarded
    assert _core.fuse_mha_bias is original
