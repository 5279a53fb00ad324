"""ORT's fused ``Skip[Simplified]LayerNormalization`` back to ``Add`` + the plain normalization.

onnxscript's ORT fusions turn every residual ``Add`` followed by a layer norm into one
``SkipLayerNormalization`` (``SkipSimplifiedLayerNormalization`` for RMSNorm). On ONNX Runtime's
CPU provider the fused kernel is the slower one: it normalises each row in a scalar loop, while
``Add`` and ``LayerNormalization`` are vectorised. Measured with onnxruntime 1.32 on 2 AVX2 cores,
[8, 128, 256] float32, 1 thread: SkipLayerNormalization 1.87 ms against Add + LayerNormalization
0.41 ms; SkipSimplifiedLayerNormalization 0.45 ms against Add + SimplifiedLayerNormalization 0.28 ms.

Where the residual sum is also read further on (pre-norm transformers: GPT-2, Llama, ViT), ORT's own
optimizer does not fuse the pair again when the model is loaded. In a post-norm model (BERT) the
sum has one reader and ORT re-fuses it at load; the split is then harmless.

Only nodes whose mean / inverse-deviation outputs nobody reads are split.
"""

from __future__ import annotations

import onnx_ir as ir

from .names import derived_name

CONTRIB_DOMAIN = "com.microsoft"
# fused op -> (index of its optional bias input, the plain normalization and its domain)
_SPLITS = {
    "SkipLayerNormalization": (4, "LayerNormalization", ""),
    "SkipSimplifiedLayerNormalization": (3, "SimplifiedLayerNormalization", ""),
}
SKIP_NORMS = frozenset(_SPLITS)  # the op types split_skip_norms rewrites
_SUM_OUTPUT = 3
_FUSED_DEFAULT_EPSILON = 1e-12  # ORT's contrib skip-norm schemas


def split_skip_norms(model: ir.Model) -> int:
    """Rewrite every fused skip-norm node of ``model`` that can be; how many were rewritten."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.domain == CONTRIB_DOMAIN and node.op_type in _SPLITS and _splittable(node):
            _split(graph, node)
            count += 1
    return count


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _splittable(node: ir.Node) -> bool:
    statistics = node.outputs[1:_SUM_OUTPUT]  # mean and inverse standard deviation
    return all(not out.uses() and not out.is_graph_output() for out in statistics)


def _split(graph: ir.Graph, node: ir.Node) -> None:
    bias_index, norm_op, norm_domain = _SPLITS[node.op_type]
    add = ir.Node("", "Add", [node.inputs[0], node.inputs[1]], name=derived_name(node, ".residual"))
    graph.insert_before(node, add)
    total = add.outputs[0]
    bias = _input(node, bias_index)
    if bias is not None:
        add_bias = ir.Node("", "Add", [total, bias], name=derived_name(node, ".bias"))
        graph.insert_before(node, add_bias)
        total = add_bias.outputs[0]
    weights = [node.inputs[2]]
    if node.op_type == "SkipLayerNormalization" and _input(node, 3) is not None:
        weights.append(node.inputs[3])  # beta
    epsilon = node.attributes.get("epsilon")  # always written: the fused and plain ops default differently
    epsilon = epsilon.as_float() if epsilon is not None else _FUSED_DEFAULT_EPSILON
    attributes = [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", epsilon)]
    norm = ir.Node(norm_domain, norm_op, [total, *weights], attributes, name=derived_name(node, ".norm"))
    graph.insert_before(node, norm)
    outputs = [(node.outputs[0], norm.outputs[0])]
    if len(node.outputs) > _SUM_OUTPUT:
        outputs.append((node.outputs[_SUM_OUTPUT], total))
    names = [old.name for old, _ in outputs]
    for old, new in outputs:
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    for name, (_, new) in zip(names, outputs):
        new.name = name  # the values keep the names they had (graph outputs are known by them)
