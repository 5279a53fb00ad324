"""An ONNX rewrite run before onnxscript's ORT fusions: ``Reshape -> Gemm -> Reshape`` back to ``MatMul``.

GPT-2's ``Conv1D`` (and any ``addmm`` on a flattened batch) exports as ``Reshape(x, [-1, K])
-> Gemm -> Reshape(.., [batch, seq, N])``. onnxscript's attention fusion (``mha2``) then
rewires such a Gemm to the 3-d input and ORT refuses the model ("Gemm input 0 expected to
have rank 2"), so adaptc used to drop every fusion for GPT-2. onnxscript's own rule for this
needs static shapes; this one accepts dynamic batch and sequence axes: it fires when the
first reshape only flattens the leading axes and the second restores them, so the result is
exactly ``x @ W (+ b)`` on the 3-d input.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRule, rewrite


def _flat_gemm(op, x, w, shape_in, shape_out):  # noqa: D103 - patterns: names are what they match
    gemm = op.Gemm(op.Reshape(x, shape_in), w, alpha=1.0, beta=1.0, transA=0, transB=0)
    return op.Reshape(gemm, shape_out)


def _flat_gemm_bias(op, x, w, b, shape_in, shape_out):
    gemm = op.Gemm(op.Reshape(x, shape_in), w, b, alpha=1.0, beta=1.0, transA=0, transB=0)
    return op.Reshape(gemm, shape_out)


def _input_3d(op, x, shape_out):
    """``x`` with its trailing axes merged so it has the output's rank (a no-op when it has it)."""
    rank = shape_out.shape[0]
    if len(x.shape) == rank:
        return x
    return op.Reshape(x, op.Constant(value_ints=[0] * (rank - 1) + [-1]))


def _matmul(op, x, w, shape_out, **_):
    return op.MatMul(_input_3d(op, x, shape_out), w)


def _matmul_add(op, x, w, b, shape_out, **_):
    return op.Add(op.MatMul(_input_3d(op, x, shape_out), w), b)


def _final_reshape(x: ir.Value, shape_out: ir.Value) -> ir.Node | None:
    for use in shape_out.uses():
        node = use.node
        gemm = node.inputs[0].producer() if node.op_type == "Reshape" and node.inputs[0] is not None else None
        if gemm is not None and gemm.op_type == "Gemm":
            first = gemm.inputs[0].producer()
            if first is not None and first.op_type == "Reshape" and first.inputs[0] is x:
                return node
    return None


def _restores_leading_axes(context, x: ir.Value, w: ir.Value, shape_in: ir.Value, shape_out: ir.Value, **_) -> bool:
    """The first reshape merges x's leading axes (and maybe trailing ones into K); the last gives them back."""
    del context
    flat = shape_in.const_value
    if flat is None or x.shape is None or w.shape is None or len(w.shape) != 2 or shape_out.shape is None:
        return False
    dims = flat.numpy().tolist()
    rank = shape_out.shape[0]
    if len(dims) != 2 or dims[0] != -1 or not isinstance(rank, int) or rank < 2 or len(x.shape) < rank:
        return False
    trailing = x.shape[rank - 1:]
    if not all(isinstance(d, int) for d in trailing) or _product(trailing) != dims[1]:
        return False
    final = _final_reshape(x, shape_out)
    out = final.outputs[0] if final is not None else None
    if out is None or out.shape is None or len(out.shape) != rank:
        return False
    return [str(d) for d in out.shape[:-1]] == [str(d) for d in x.shape[: rank - 1]]


def _product(dims) -> int:
    result = 1
    for d in dims:
        result *= int(d)
    return result


RULES = [
    RewriteRule(_flat_gemm_bias, _matmul_add, _restores_leading_axes),
    RewriteRule(_flat_gemm, _matmul, _restores_leading_axes),
]


# --- a flattened Gemm whose result is not reshaped straight back ------------------------------------
# An unmerged LoRA export adds the adapter's Gemms to the base Gemm before the reshape back, so the
# rules above do not see the pair. The attention fusion then rewires the flattening Reshape of the
# attention output and leaves a Gemm on a rank-3 input, which ORT refuses: every fusion was dropped
# for unmerged exports. These rules move each such Gemm onto the unflattened input and flatten its
# result instead: Flatten(x' @ W (+ b)) is exactly Gemm(Reshape(x, [-1, K]), W (+ b)).

def _gemm(op, flat, w):
    return op.Gemm(flat, w, alpha=1.0, beta=1.0, transA=0, transB=0)


def _gemm_t(op, flat, w):
    return op.Gemm(flat, w, alpha=1.0, beta=1.0, transA=0, transB=1)


def _gemm_bias(op, flat, w, b):
    return op.Gemm(flat, w, b, alpha=1.0, beta=1.0, transA=0, transB=0)


def _gemm_t_bias(op, flat, w, b):
    return op.Gemm(flat, w, b, alpha=1.0, beta=1.0, transA=0, transB=1)


def _kept_axes(flat: ir.Value) -> int | None:
    """How many leading axes of the flattened input the Reshape merged, when it merged only those
    (and possibly trailing axes into K); None when ``flat`` is not such a Reshape."""
    reshape = flat.producer()
    if reshape is None or reshape.op_type != "Reshape" or len(reshape.inputs) != 2:
        return None
    x, shape_in = reshape.inputs
    target = ir.convenience.get_const_tensor(shape_in)
    if target is None or x is None or x.shape is None or len(x.shape) < 3:
        return None
    dims = target.numpy().tolist()
    if len(dims) != 2 or dims[0] != -1:
        return None
    product = 1
    for axis in range(len(x.shape) - 1, 0, -1):  # trailing axes until their product is K
        if not isinstance(x.shape[axis], int):
            return None
        product *= x.shape[axis]
        if product == dims[1]:
            return axis
    return None


def _flattened_input(context, flat: ir.Value, w: ir.Value, **_) -> bool:
    del context
    return _kept_axes(flat) is not None and w.shape is not None and len(w.shape) == 2


def _unflattened_matmul(op, flat, w, b=None, transposed=False):
    kept = _kept_axes(flat)
    x = flat.producer().inputs[0]
    if len(x.shape) > kept + 1:  # merge the trailing axes into K, keep the leading ones
        x = op.Reshape(x, op.Constant(value_ints=[0] * kept + [-1]))
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]) if transposed else w)
    if b is not None:
        y = op.Add(y, b)
    return op.Flatten(y, axis=kept)


FLAT_INPUT_RULES = [
    RewriteRule(_gemm_bias, lambda op, flat, w, b: _unflattened_matmul(op, flat, w, b), _flattened_input),
    RewriteRule(_gemm_t_bias, lambda op, flat, w, b: _unflattened_matmul(op, flat, w, b, True), _flattened_input),
    RewriteRule(_gemm, lambda op, flat, w: _unflattened_matmul(op, flat, w), _flattened_input),
    RewriteRule(_gemm_t, lambda op, flat, w: _unflattened_matmul(op, flat, w, transposed=True), _flattened_input),
]


def unflatten_gemms(model: ir.Model) -> ir.Model:
    """Apply :data:`RULES`, then :data:`FLAT_INPUT_RULES` to the Gemms left, in place (and return the model)."""
    rewrite(model, RULES)
    rewrite(model, FLAT_INPUT_RULES)
    return model
