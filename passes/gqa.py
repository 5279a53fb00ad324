"""Grouped-query attention without the repeated keys and values.

transformers' ``repeat_kv`` copies every key/value head ``heads / kv_heads`` times before the
attention op (``unsqueeze -> expand -> reshape``): in generation that is a copy of the whole
key/value cache at every step and layer. Eager transformers skips it when no attention mask is
passed (``enable_gqa=True``); a captured graph always carries the mask, so it always copied. This
pass hands the attention op the un-repeated keys and values with ``enable_gqa=True`` (the same
result: SDPA pairs query head ``h`` with key head ``h // repeat``, as the repeat did).

Generation graphs only: evaluation graphs whose keys and values come from the cache
(``cat(past, new)``). The graphs the methods search for attention sites keep the plain op. Under
``torch.export`` (ONNX) :func:`gqa_attention` repeats the heads itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """SDPA with fewer key/value heads than query heads (``q.shape[1]`` a multiple of ``k.shape[1]``)."""
    if torch.compiler.is_exporting():
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)


torch.fx.wrap("gqa_attention")


def _unrepeated(node: object) -> fx.Node | None:
    """``x`` when ``node`` is ``reshape(expand(unsqueeze(x[:], 2)[:, :, :, 0:], [b, kv, r, L, d]), [b, kv * r, L, d])``
    and ``x`` is the cache's ``cat(past, new)`` (full slices, ``[:]``, may come and go)."""
    if not isinstance(node, fx.Node) or node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default or len(expand.users) != 1:
        return None
    source = expand.args[0]
    while isinstance(source, fx.Node) and source.target is aten.slice.Tensor and _full_slice(source):
        source = source.args[0]
    if not isinstance(source, fx.Node) or source.target is not aten.unsqueeze.default or source.args[1] != 2:
        return None
    x = source.args[0]
    while isinstance(x, fx.Node) and x.target is aten.slice.Tensor and _full_slice(x):  # x[:] (a dynamic batch)
        x = x.args[0]
    if not isinstance(x, fx.Node) or x.target is not aten.cat.default:  # not the cache's cat(past, new)
        return None
    shape = getattr(x.meta.get("val"), "shape", None)
    return x if shape is not None and len(shape) == 4 else None


def _full_slice(node: fx.Node) -> bool:
    _, dim, start, end = (list(node.args) + [0, None, None])[:4]
    return start in (0, None) and (end is None or end >= 2**62)


def use_gqa(gm: fx.GraphModule) -> int:
    """Rewrite every attention op fed repeated keys and values; returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA or node.kwargs.get("enable_gqa"):
            continue
        if len(node.args) < 3:
            continue
        k, v = _unrepeated(node.args[1]), _unrepeated(node.args[2])
        if k is None or v is None:
            continue
        q, _, _, *rest = node.args
        options = dict(zip(("attn_mask", "dropout_p", "is_causal"), rest))
        options.update({key: value for key, value in node.kwargs.items() if key in ("attn_mask", "dropout_p", "is_causal", "scale")})
        repeated = (node.args[1], node.args[2])
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(gqa_attention, (q, k, v), options)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        for dead in repeated:
            _erase_chain(gm.graph, dead)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _erase_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the producers only it used (the reshape / expand / slice / unsqueeze chain)."""
    while isinstance(node, fx.Node) and not node.users and node.op == "call_function":
        source = node.args[0]
        graph.erase_node(node)
        node = source
