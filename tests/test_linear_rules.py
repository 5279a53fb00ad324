"""targets/linear_rules.py: onnxscript's multi-output rule (SlicesSplit) still rewrites what it rewrote,
searches only the readers of the shared tensor, and the default rules are restored afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from adaptc.targets.linear_rules import _FirstOutputFilter, _Neighbourhood, prefiltered_default_rules
from onnx import TensorProto, helper
from onnxscript import optimizer, rewriter

WIDTH = 8
CHAIN = 40  # unrelated nodes that share the Slices' constant `axes`


def halves_model() -> onnx.ModelProto:
    """``x[..., :4] + x[..., 4:]`` written as two Slices (SlicesSplit's pattern), next to a long chain of
    Slices of another tensor that read the same axes constant.

    The second half is sliced first: onnxscript's multi-output matcher offers the node it starts from as
    its own partner first and gives up when the rule's check rejects that pairing, so SlicesSplit only
    fires when the second-half Slice comes earlier in the graph.
    """
    ints = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [1], [v])  # noqa: E731
    consts = [ints("zero", 0), ints("half", WIDTH // 2), ints("end", WIDTH), ints("axes", -1)]
    nodes = [helper.make_node("Slice", ["x", "half", "end", "axes"], ["high"]),
             helper.make_node("Slice", ["x", "zero", "half", "axes"], ["low"]),
             helper.make_node("Add", ["low", "high"], ["sum"])]
    previous = "z"
    for i in range(CHAIN):  # Slice(z, 0, 8) is the whole tensor; Relu keeps each step a real op
        nodes.append(helper.make_node("Slice", [previous, "zero", "end", "axes"], [f"s{i}"]))
        nodes.append(helper.make_node("Relu", [f"s{i}"], [f"r{i}"]))
        previous = f"r{i}"
    graph = helper.make_graph(
        nodes, "halves",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, WIDTH]) for n in ("x", "z")],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, WIDTH // 2]),
         helper.make_tensor_value_info(previous, TensorProto.FLOAT, [2, WIDTH])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def optimized(prefiltered: bool) -> ir.Model:
    model = ir.from_proto(halves_model())
    if prefiltered:
        with prefiltered_default_rules():
            optimizer.optimize(model)
    else:
        optimizer.optimize(model)
    return model


@pytest.mark.integration
def test_slices_split_rewrites_the_same_with_the_prefilter():
    plain, filtered = optimized(False), optimized(True)
    ops = [node.op_type for node in filtered.graph]
    assert ops == [node.op_type for node in plain.graph]
    assert "Split" in ops  # the rule fired, with and without the prefilter
    x, z = np.random.default_rng(0).standard_normal((2, 2, WIDTH)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(filtered).SerializeToString(), providers=["CPUExecutionProvider"])
    got_sum, got_chain = session.run(None, {"x": x, "z": z})
    np.testing.assert_allclose(got_sum, x[:, :4] + x[:, 4:], rtol=1e-6)  # a hand computation
    np.testing.assert_allclose(got_chain, np.maximum(z, 0), rtol=1e-6)


def test_the_search_is_the_shared_tensors_readers_only():
    model = ir.from_proto(halves_model())
    low = next(node for node in model.graph if node.outputs[0].name == "low")
    (wrapped,) = [rule for rule in _prefiltered() if isinstance(rule, _FirstOutputFilter)]
    assert wrapped._positions == [0]  # both Slices of the pattern read `x`, input 0
    nearby = list(_Neighbourhood(model.graph, low, wrapped._positions))
    assert [n.outputs[0].name for n in nearby] == ["high", "low"]  # graph order; not the Slices sharing `axes`


def _prefiltered() -> tuple:
    with prefiltered_default_rules():
        return rewriter._DEFAULT_REWRITE_RULES


def test_default_rules_are_restored_even_after_an_error():
    original = rewriter._DEFAULT_REWRITE_RULES
    with pytest.raises(RuntimeError), prefiltered_default_rules():
        assert rewriter._DEFAULT_REWRITE_RULES is not original
        raise RuntimeError("boom")
    assert rewriter._DEFAULT_REWRITE_RULES is original


def test_nested_and_overlapping_blocks_restore_the_rules_once_all_close():
    """Two exports in two threads: the second block opens before the first closes, and closes after it."""
    import threading

    original = rewriter._DEFAULT_REWRITE_RULES
    first_open, second_open, first_closed = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first() -> None:
        with prefiltered_default_rules():
            first_open.set()
            second_open.wait(5)
        first_closed.set()

    def second() -> None:
        first_open.wait(5)
        with prefiltered_default_rules():
            second_open.set()
            first_closed.wait(5)
            seen["after first closed"] = rewriter._DEFAULT_REWRITE_RULES
            with prefiltered_default_rules():  # nested
                seen["nested"] = rewriter._DEFAULT_REWRITE_RULES

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen["after first closed"] is not original  # still prefiltered for the open block
    assert seen["nested"] is seen["after first closed"]  # not wrapped twice
    assert rewriter._DEFAULT_REWRITE_RULES is original
