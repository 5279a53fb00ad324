"""Rewrites of the frozen model's own ops that keep its math and make training steps cheaper.

Module wrapping cannot touch the base model's code; a captured graph can. Five rewrites, applied
to the graphs adaptc captures:

* **tanh-GELU**: GPT-2's ``gelu_new`` (and its copies in GPT-J, CodeGen, Phi, ...) is written
  as ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))))``: seven elementwise ops
  forward, more backward, each a pass over the widest activation. It becomes one
  ``aten.gelu(x, approximate='tanh')`` (the same formula, one kernel each way). Training graphs only.
* **dropout**: ``aten.dropout`` draws a float mask with ``bernoulli_`` and keeps it for the
  backward. :func:`dropout` draws a bool mask from packed random bits (passes/dropout_mask.py's
  ``keep_mask``: about 3x cheaper to draw, a quarter of the memory kept). Same distribution
  (p resolved to 1/65536), different random numbers than eager PyTorch.

* **RMSNorm**: Llama's (and T5's, Mistral's, Qwen's ...) ``weight * (x * rsqrt(mean(x**2) + eps))``,
  written out as six ops each way, becomes one ``F.rms_norm`` (ATen's fused kernel; measured on
  the CPU, forward + backward of a [8, 128, 256] activation: 4.5 ms against 6.2). Training graphs
  only, and only in one dtype throughout (no cast between the normalisation and the weight).

* **RoPE**: ``x * cos + rotate_half(x) * sin`` (Llama and the models that copied its
  ``rotate_half``), seven ops each way on q and on k, becomes one :func:`rotary` (three passes each
  way; measured on the CPU, q and k of [8, 4, 128, 64], forward + backward: 3.2 ms against 7.1).
  Training graphs only.

* **attention mask**: a boolean mask every layer's SDPA takes (transformers' causal mask, traced) is
  turned once per step into ``is_causal`` when it is the causal triangle, else into one float mask
  shared by the layers (:func:`attention_mask`); SDPA made and kept a float copy per layer, each
  [batch, 1, tokens, tokens]. Training graphs only.

* **no-ops**: export's dtype assertions, casts to the dtype a tensor already has, evaluation
  dropout: erased (:func:`drop_no_ops`), a Python call fewer each at every step.

Under ``torch.compile`` / ``torch.export`` (ONNX) :func:`dropout` is plain ``F.dropout`` and
:func:`rotary` the formula written out.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx
from torch.nn import functional as F

from .dropout_mask import effective_keep, keep_mask, masked

aten = torch.ops.aten


class _MaskedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return masked(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return masked(grad, keep, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """``aten.dropout(x, p, train)`` with a bool mask from packed random bits."""
    if not train or p == 0 or torch.compiler.is_compiling() or not x.is_floating_point():
        return F.dropout(x, p, train)
    if p >= 1:
        return x * 0
    keep = keep_mask(x.shape, p, x.device)
    return _MaskedDropout.apply(x, keep, 1.0 / effective_keep(p))


torch.fx.wrap("dropout")  # a leaf if a graph holding it is ever traced again with fx


def fuse_kernels(gm: fx.GraphModule) -> int:
    """Fused tanh-GELU, RMSNorm and RoPE in ``gm.graph`` (in place); returns how many were fused.

    The pass manager runs it on training graphs only: the fused kernels round differently (~1e-7),
    and an evaluation graph with a zero adapter stays bit-identical to the base model.
    """
    return (_fuse_tanh_gelu(gm.graph) + _fuse_rms_norm(gm) + _fuse_rotary(gm.graph)
            + _share_attention_mask(gm.graph))


def drop_no_ops(gm: fx.GraphModule) -> int:
    """Erase nodes that compute nothing at run time; returns how many.

    - export's dtype assertions (``aten._assert_tensor_metadata``): a graph only ever runs inputs
      of the dtypes it was captured for (AdaptedModel captures again for others);
    - casts to the dtype a tensor already has (``aten.to`` without ``copy=True``: it returns its input);
    - dropout with ``train=False`` (an evaluation graph's).

    Each is a Python call at every step of generation.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
            count += 1
        elif _same(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return count


def _same(node: fx.Node) -> bool:
    """Whether ``node`` returns its first argument unchanged (see drop_no_ops)."""
    if node.target is aten.dropout.default:
        train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None)
        return train is False
    if node.target is not aten.to.dtype or node.kwargs.get("copy") or (len(node.args) > 3 and node.args[3]):
        return False
    source, dtype = node.args[0], node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == dtype and node.kwargs.get("memory_format") is None


def fast_dropout(gm: fx.GraphModule) -> int:
    """Dropout with a bool mask (:func:`dropout`) in ``gm.graph``; returns how many were replaced."""
    return _fast_dropout(gm.graph)


def _fast_dropout(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.dropout.default:
            x, p, train = (list(node.args) + [None, None])[:3]
            p = node.kwargs.get("p", p)
            train = node.kwargs.get("train", train)
            if isinstance(p, (int, float)) and isinstance(train, bool):
                node.target = dropout
                node.args, node.kwargs = (x, float(p), train), {}
                count += 1
    return count


# --- tanh-GELU --------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_MUL = {aten.mul.Tensor, aten.mul.Scalar, operator.mul}
_ADD = {aten.add.Tensor, aten.add.Scalar, operator.add}
_POW = {aten.pow.Tensor_Scalar, operator.pow}


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _close(value, expected: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value - expected) < 1e-6 * max(1, abs(expected))


def _scaled(node, constant: float):
    """If ``node`` is ``a * constant`` (either order), return ``a``."""
    if not _is(node, _MUL) or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if _close(b, constant) and isinstance(a, fx.Node):
        return a
    if _close(a, constant) and isinstance(b, fx.Node):
        return b
    return None


def _plus(node):
    """The operands of ``a + b`` (no alpha), or None."""
    if not _is(node, _ADD) or len(node.args) != 2 or node.kwargs:
        return None
    return node.args


def _match_tanh_gelu(tanh: fx.Node):
    """From a ``tanh`` node: the input ``x``, the output node and the chain's nodes, or None."""
    scaled = tanh.args[0]
    inner = _scaled(scaled, _SQRT_2_OVER_PI)
    operands = _plus(inner) if inner is not None else None
    if operands is None:
        return None
    x = term = cube = None
    for a, b in (operands, operands[::-1]):
        cubed = _scaled(b, 0.044715) if isinstance(b, fx.Node) else None
        if cubed is not None and _is(cubed, _POW) and cubed.args[0] is a and _close(cubed.args[1], 3.0):
            x, term, cube = a, b, cubed
            break
    if x is None or len(tanh.users) != 1:
        return None
    one_plus = next(iter(tanh.users))
    operands = _plus(one_plus)
    if operands is None or not any(_close(v, 1.0) for v in operands) or len(one_plus.users) != 1:
        return None
    out = next(iter(one_plus.users))
    if not _is(out, _MUL) or len(out.args) != 2:
        return None
    half = out.args[0] if out.args[1] is one_plus else out.args[1]
    if _scaled(half, 0.5) is not x:
        return None
    return x, out, [out, half, one_plus, tanh, scaled, inner, term, cube]


def _fuse_tanh_gelu(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if not _is(node, {aten.tanh.default, torch.tanh}):
            continue
        found = _match_tanh_gelu(node)
        if found is None:
            continue
        x, out, chain = found
        with graph.inserting_after(out):
            gelu = graph.call_function(aten.gelu.default, (x,), {"approximate": "tanh"})
        gelu.meta = {k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
        out.replace_all_uses_with(gelu)
        for old in chain:  # outputs first; a node another part of the model still reads stays
            if not old.users:
                graph.erase_node(old)
        count += 1
    return count


# --- RMSNorm --------------------------------------------------------------------------------------

_TO = {aten.to.dtype, aten._to_copy.default}
_ASSERT_META = getattr(aten, "_assert_tensor_metadata", None)


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _skip_noop_cast(node):
    """``node``'s input when ``node`` is a cast that keeps the dtype, else ``node``."""
    if _is(node, _TO) and isinstance(node.args[0], fx.Node) and _dtype(node) == _dtype(node.args[0]):
        return node.args[0]
    return node


def _match_rms_norm(out: fx.Node, params: dict):
    """From ``weight * normed``: (x, weight, eps, chain) for Llama-style RMSNorm, or None."""
    if not _is(out, _MUL) or len(out.args) != 2 or out.kwargs:
        return None
    for weight, normed in (out.args, out.args[::-1]):
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(normed, fx.Node)):
            continue
        w = params.get(weight.target)
        cast = normed
        normed = _skip_noop_cast(normed)
        if not _is(normed, _MUL) or len(normed.args) != 2:
            continue
        for x, rsqrt in (normed.args, normed.args[::-1]):
            if not _is(rsqrt, {aten.rsqrt.default}):
                continue
            add = rsqrt.args[0]
            operands = _plus(add)
            if operands is None:
                continue
            mean, eps = operands if isinstance(operands[0], fx.Node) else operands[::-1]
            if not (_is(mean, {aten.mean.dim}) and isinstance(eps, float)):
                continue
            dims = mean.args[1] if len(mean.args) > 1 else None
            keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            square = mean.args[0]
            if dims not in ([-1], (-1,)) or keep is not True or not _is(square, _POW) or square.args[0] is not x \
                    or not _close(square.args[1], 2.0):
                continue
            val = x.meta.get("val") if isinstance(x, fx.Node) else None
            if not isinstance(val, torch.Tensor) or w is None or tuple(w.shape) != (val.shape[-1],):
                continue
            if not (val.dtype == w.dtype == _dtype(out) and val.is_floating_point()):
                continue
            return x, weight, eps, [out, cast, normed, rsqrt, add, mean, square]
    return None


def _fuse_rms_norm(gm: fx.GraphModule) -> int:
    graph = gm.graph
    params = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    count = 0
    for node in list(graph.nodes):
        found = _match_rms_norm(node, params)
        if found is None:
            continue
        x, weight, eps, chain = found
        size = x.meta["val"].shape[-1]
        with graph.inserting_after(node):
            fused = graph.call_function(F.rms_norm, (x, [int(size)], weight, eps))
        fused.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
        node.replace_all_uses_with(fused)
        for old in dict.fromkeys(chain):  # outputs first; a node the model still reads elsewhere stays
            for user in list(old.users):
                if _ASSERT_META is not None and _is(user, {_ASSERT_META.default}):
                    graph.erase_node(user)
            if not old.users:
                graph.erase_node(old)
        count += 1
    return count


# --- rotary position embedding ---------------------------------------------------------------------

class _Rotary(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) = cat(-x2, x1)``, in three passes each way.

    Written out, it is seven ops forward (two slices, neg, cat, two muls, add) and as many backward,
    each a pass over q or k. Here: ``x * cos``, then the two halves of ``rotate_half(x) * sin`` added in
    place (``addcmul_``); the backward is the transpose, ``g * cos`` plus the other half rotated back.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        dx[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return dx, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (the RoPE of Llama, Mistral, Qwen, Gemma, ...)."""
    plain = torch.compiler.is_compiling() or cos.requires_grad or sin.requires_grad
    if plain or torch.broadcast_shapes(x.shape, cos.shape, sin.shape) != x.shape:
        return x * cos + _rotate_half(x) * sin
    return _Rotary.apply(x, cos, sin)


torch.fx.wrap("rotary")


def _slice_of(node, x: fx.Node, start: int, stop: int | None) -> bool:
    """Whether ``node`` is ``x[..., start:stop]`` (a slice of the last dim; stop None: to the end)."""
    if not _is(node, {aten.slice.Tensor}) or node.args[0] is not x or len(node.args) < 4:
        return False
    rank = len(x.meta["val"].shape)
    step = node.args[4] if len(node.args) > 4 else 1
    end = node.args[3]
    ends = end is not None and end >= x.meta["val"].shape[-1] if stop is None else end == stop
    return node.args[1] % rank == rank - 1 and node.args[2] == start and ends and step == 1


def _match_rotary(add: fx.Node):
    """From ``a + b``: (x, cos, sin, chain) when it is ``x * cos + cat(-x[..., h:], x[..., :h]) * sin``."""
    operands = _plus(add)
    if operands is None or not all(_is(v, _MUL) and len(v.args) == 2 for v in operands):
        return None
    for direct, rotated in (operands, operands[::-1]):
        for cat, sin in (rotated.args, rotated.args[::-1]):
            if not _is(cat, {aten.cat.default}) or len(cat.args[0]) != 2 or not isinstance(sin, fx.Node):
                continue
            neg, first = cat.args[0]
            if not _is(neg, {aten.neg.default}):
                continue
            x = first.args[0] if _is(first, {aten.slice.Tensor}) else None
            for y, cos in (direct.args, direct.args[::-1]):
                if y is not x or not isinstance(cos, fx.Node) or not isinstance(x.meta.get("val"), torch.Tensor):
                    continue
                val = x.meta["val"]
                width, rank = val.shape[-1], len(val.shape)
                if not isinstance(width, int) or width % 2 or (cat.args[1] if len(cat.args) > 1 else 0) % rank != rank - 1:
                    continue
                half = width // 2
                if not (_slice_of(first, x, 0, half) and _slice_of(neg.args[0], x, half, None)):
                    continue
                if not (_dtype(cos) == _dtype(sin) == val.dtype == _dtype(add)) or not val.is_floating_point():
                    continue
                return x, cos, sin, [add, direct, rotated, cat, neg, first, neg.args[0]]
    return None


def _fuse_rotary(graph: fx.Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        found = _match_rotary(node)
        if found is None:
            continue
        x, cos, sin, chain = found
        with graph.inserting_after(node):
            fused = graph.call_function(rotary, (x, cos, sin))
        fused.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")}
        node.replace_all_uses_with(fused)
        for old in chain:  # outputs first; a node the model still reads elsewhere stays
            if not old.users:
                graph.erase_node(old)
        count += 1
    return count


# --- attention masks ----------------------------------------------------------------------------

def attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """What every attention op of a step takes for the boolean mask ``mask``: ``(None, True)`` when it is
    the plain causal triangle (SDPA's ``is_causal``: no mask kept, masked blocks skipped), else
    ``(float mask, False)``, the additive mask SDPA would make from it (0 where kept, -inf elsewhere).

    SDPA turns a boolean mask into a float [batch, 1, query, key] tensor in every layer and keeps that
    copy for the backward: one per layer, each as large as the attention scores of one head."""
    if (not torch.compiler.is_compiling() and mask.dim() >= 2 and mask.shape[-1] == mask.shape[-2]
            and torch.equal(mask, _causal(mask.shape[-1], mask.device).expand_as(mask))):
        return None, True
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")), False


def _causal(size: int, device: torch.device) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool, device=device).tril_()


torch.fx.wrap("attention_mask")

_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _share_attention_mask(graph: fx.Graph) -> int:
    """Attention ops with one boolean mask (a transformers model's causal mask, made once and passed to
    every layer) take it through :func:`attention_mask`, computed once: ``is_causal`` where it is the
    causal triangle, else one shared float mask instead of one kept per layer. The same math."""
    groups: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (aten.scaled_dot_product_attention.default,
                                                             F.scaled_dot_product_attention):
            continue
        bound = dict(zip(_SDPA_NAMES, node.args)) | {k: v for k, v in node.kwargs.items() if k in _SDPA_NAMES}
        mask, query = bound.get("attn_mask"), bound.get("query")
        if (set(node.kwargs) - set(_SDPA_NAMES) or bound.get("is_causal") or not isinstance(mask, fx.Node)
                or _dtype(mask) is not torch.bool or _dtype(query) not in (torch.float32, torch.float16, torch.bfloat16)):
            continue
        groups.setdefault((mask, _dtype(query)), []).append(node)
    for (mask, dtype), nodes in groups.items():
        with graph.inserting_after(mask):
            shared = graph.call_function(attention_mask, (mask, dtype))
        with graph.inserting_after(shared):
            float_mask = graph.call_function(operator.getitem, (shared, 0))
        with graph.inserting_after(float_mask):
            causal = graph.call_function(operator.getitem, (shared, 1))
        for new in (shared, float_mask, causal):
            new.meta = {k: v for k, v in mask.meta.items() if k in ("nn_module_stack", "stack_trace")}
        for node in nodes:
            bound = dict(zip(_SDPA_NAMES, node.args)) | dict(node.kwargs)
            node.args = (bound["query"], bound["key"], bound["value"], float_mask, bound.get("dropout_p", 0.0), causal)
            node.kwargs = {k: v for k, v in bound.items() if k not in _SDPA_NAMES[:6]}
    return sum(len(nodes) for nodes in groups.values())
