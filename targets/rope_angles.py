"""Rotary embeddings: let onnxscript fuse them into ORT's ``RotaryEmbedding``.

transformers computes the RoPE angles as ``(inv_freq[None, :, None] @ position_ids[:, None, :]).transpose(1, 2)``.
torch.export records that matmul over a length-1 axis as a broadcast multiply,
``float(position_ids[..., None]) * inv_freq``, which onnxscript's cos/sin-cache rule does not
match: ``RotaryEmbedding`` never fused and every layer ran the rotation as Slice / Neg / Concat /
Mul / Add. :data:`RULE` writes the multiply back as the matmul (the same numbers: one term each).

ORT's ``RotaryEmbedding`` takes position ids of shape [batch, seq]; transformers builds one row,
[1, seq], for the whole batch, so after the fusion :func:`expand_rotary_positions` broadcasts them.
Measured (Llama, 4 layers, hidden 256, batch 8 x 128, 2 threads): ORT 104.9 -> 100.4 ms.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRule, RewriteRuleSet

CONTRIB_DOMAIN = "com.microsoft"
FLOAT = ir.DataType.FLOAT


def _angles_by_mul(op, positions, axes, inv_freq):  # noqa: D103 - patterns: names are what they match
    angles = op.Mul(op.Cast(op.Unsqueeze(positions, axes), to=FLOAT), inv_freq)
    return op.Concat(angles, angles, axis=-1)


def _angles_by_matmul(op, positions, axes, inv_freq):
    del axes
    column = ir.convenience.get_const_tensor(inv_freq).numpy().reshape(1, -1, 1)
    row = op.Cast(op.Unsqueeze(positions, op.Constant(value_ints=[1])), to=FLOAT)
    angles = op.Transpose(op.MatMul(op.Constant(value=ir.tensor(column)), row), perm=[0, 2, 1])
    return op.Concat(angles, angles, axis=-1)


def _is_rope_angles(context, positions: ir.Value, axes: ir.Value, inv_freq: ir.Value, **_) -> bool:
    """[B, S] positions times a constant 1-d frequency vector along a new last axis."""
    del context
    axes_value, freqs = ir.convenience.get_const_tensor(axes), ir.convenience.get_const_tensor(inv_freq)
    if axes_value is None or freqs is None or axes_value.numpy().tolist() not in ([2], [-1]):
        return False
    return len(freqs.shape) == 1 and _rank(positions) == 2


def _rank(value: ir.Value) -> int | None:
    """The value's rank, from its shape or, where the exporter recorded none, from the ops that made it."""
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "Range":
        return 1
    if producer.op_type == "Unsqueeze" and len(producer.inputs) == 2:
        axes, inner = ir.convenience.get_const_tensor(producer.inputs[1]), _rank(producer.inputs[0])
        return None if axes is None or inner is None else inner + axes.numpy().size
    return None


# remove_nodes=False: the cast positions are often read elsewhere too; unused nodes are dropped later.
RULE = RewriteRule(_angles_by_mul, _angles_by_matmul, _is_rope_angles, remove_nodes=False, name="RoPEAnglesAsMatMul")


def rope_angles_as_matmul(model: ir.Model) -> int:
    """Apply :data:`RULE` in place; how many angle computations were rewritten."""
    return RewriteRuleSet([RULE]).apply_to_model(model)


def expand_rotary_positions(model: ir.Model) -> int:
    """Broadcast one row of position ids to the batch for each fused ``RotaryEmbedding``; how many."""
    graph = model.graph
    expanded: dict[ir.Value, ir.Value] = {}  # q and k of a layer (and every layer) share their positions
    count = 0
    for node in list(graph):
        if node.op_type != "RotaryEmbedding" or node.domain != CONTRIB_DOMAIN:
            continue
        x, positions = node.inputs[0], node.inputs[1]
        if positions in expanded:
            node.replace_input_with(1, expanded[positions])
            count += 1
            continue
        if positions is None or positions.shape is None or len(positions.shape) != 2 or positions.shape[0] != 1:
            continue
        batch = ir.Node("", "Shape", [x], [ir.AttrInt64("start", 0), ir.AttrInt64("end", 1)])
        length = ir.Node("", "Shape", [positions], [ir.AttrInt64("start", 1), ir.AttrInt64("end", 2)])
        shape = ir.Node("", "Concat", [batch.outputs[0], length.outputs[0]], [ir.AttrInt64("axis", 0)])
        expand = ir.Node("", "Expand", [positions, shape.outputs[0]])
        for new in (batch, length, shape, expand):
            graph.insert_before(node, new)
        node.replace_input_with(1, expand.outputs[0])
        expanded[positions] = expand.outputs[0]
        count += 1
    return count
