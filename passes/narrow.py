"""Row narrowing: compute only the token a pooled output reads, from where the tokens stop mixing.

A classifier that pools the first token (``hidden[:, 0]``: BERT's pooler, ViT's class token)
reads one row of the last block's output, yet the module runs every token through the last
block's output projection, MLP, norms and adapters, forward and backward. Only attention mixes
tokens, and even there only the query side is per token. The graph shows this; module wrapping
cannot act on it. This pass walks up from each ``aten.select`` along the rows it reads and
rewrites every op whose other users read the same row to compute that row only
(``[B, N, C]`` becomes ``[B, 1, C]``), stopping at ops that mix rows; it stops at attention's
key / value side and narrows its query.

The values read are the same math on fewer rows (GEMMs on fewer rows may round differently in the
last bit), so gradients are too. Ops narrowed: elementwise ops and dropout, layer / RMS norm, linear,
transpose / permute, reshapes and (un)flattens that keep the leading dims, no-op slices, and non-causal
``scaled_dot_product_attention`` (query and mask rows). Anything else keeps every row. Needs the
shapes ``torch.export`` records (``node.meta["val"]``): fx-traced graphs are left as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import fx

from .speedups import dropout as adaptc_dropout

aten = torch.ops.aten

Row = tuple[int, int]  # (dim, index): the one row of ``dim`` that the users read
Rebuild = Callable[[Callable[[fx.Node, Row], fx.Node]], tuple[tuple, dict]]

# Ops whose output row i along any dim is computed from row i of their first argument only.
_ELEMENTWISE = {
    aten.gelu.default, aten.tanh.default, aten.relu.default, aten.silu.default, aten.sigmoid.default,
    aten.contiguous.default, aten.clone.default, aten.dropout.default, aten.to.dtype,
    aten._to_copy.default, adaptc_dropout,
}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_FULL_SLICE = 2**62  # a slice end at or past this keeps every row


def narrow_rows(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s graph in place; returns how many ops now compute one row."""
    graph = gm.graph
    demand = _demands(graph)
    narrowed: dict[fx.Node, fx.Node] = {}
    slices: dict[tuple[fx.Node, int, int], fx.Node] = {}

    def row_of(node: fx.Node, row: Row) -> fx.Node:
        if node in narrowed and demand[node] == row:
            return narrowed[node]
        dim, index = row
        key = (node, dim, index)
        if key not in slices:
            with graph.inserting_after(node):
                slices[key] = graph.call_function(aten.slice.Tensor, (node, dim, index, index + 1))
            _set_val(slices[key], node, dim)
        return slices[key]

    for node in list(graph.nodes):
        row = demand.get(node)
        if row is None or node.op != "call_function":
            continue
        rule = _rule(node, *row)
        if rule is None:
            continue
        _, rebuild = rule
        args, kwargs = rebuild(row_of)
        # A view of a narrowed tensor may not be expressible with its strides: reshape copies only then.
        target = aten.reshape.default if node.target in _VIEWS else node.target
        with graph.inserting_before(node):
            new = graph.call_function(target, args, kwargs)
        new.meta = dict(node.meta)
        _set_val(new, node, row[0])
        narrowed[node] = new
    replaced = set(narrowed)
    for select in _seeds(graph):
        source = select.args[0]
        if source in narrowed:
            with graph.inserting_before(select):
                new = graph.call_function(aten.select.int, (narrowed[source], select.args[1], 0))
            new.meta = dict(select.meta)
            select.replace_all_uses_with(new)
            replaced.add(select)
    for node in reversed(list(graph.nodes)):
        if node in replaced and not node.users:
            graph.erase_node(node)
    return len(narrowed)


# --- analysis: which rows each node's users read -------------------------------------------------

def _demands(graph: fx.Graph) -> dict[fx.Node, Row | None]:
    """For every node, the one row all its users read, or None where some user needs them all."""
    demand: dict[fx.Node, Row | None] = {}
    for node in reversed(list(graph.nodes)):
        wanted: set[Row | None] = set()
        for user in node.users:
            wanted.add(_demand_by(user, node, demand.get(user)))
        demand[node] = wanted.pop() if len(wanted) == 1 else None
        shape = _shape(node)
        if demand[node] is not None and shape is not None and _same(shape[demand[node][0]], 1):
            demand[node] = None  # one row already: nothing to gain (and the pass stays idempotent)
    return demand


def _demand_by(user: fx.Node, node: fx.Node, user_row: Row | None) -> Row | None:
    """The row of ``node`` that ``user`` reads (given the row ``user``'s own users read)."""
    if user.op != "call_function":
        return None
    if user.target is aten.select.int and user.args[0] is node:
        return _select_row(user)
    if user_row is None:
        return None
    rule = _rule(user, *user_row)
    if rule is None:
        return None
    return rule[0].get(node)


def _seeds(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is aten.select.int
            and _select_row(n) is not None]


def _select_row(select: fx.Node) -> Row | None:
    shape = _shape(select.args[0])
    dim, index = select.args[1], select.args[2]
    if shape is None or not isinstance(dim, int) or not isinstance(index, int):
        return None
    dim = dim % len(shape)
    if index < 0:
        if not isinstance(shape[dim], int):
            return None
        index += shape[dim]
    return dim, index


# --- rules: per op, which row of each input a row of the output needs, and the narrowed call -------

def _rule(node: fx.Node, dim: int, index: int) -> tuple[dict[fx.Node, Row | None], Rebuild] | None:
    """None where ``node`` cannot compute row ``index`` of ``dim`` alone; else the rows it reads of
    each input (None: the input as it is) and a function building its narrowed (args, kwargs)."""
    target, args, kwargs = node.target, node.args, node.kwargs
    out = _shape(node)
    if out is None or not args or not isinstance(args[0], fx.Node):
        return None
    first = args[0]
    rank = len(out)

    def same():  # the same row of the first argument, the other arguments as they are
        return _one_input(first, (dim, index), args[1:], kwargs)

    if target in _ELEMENTWISE or (target in _BINARY and not isinstance(args[1], fx.Node)):
        return same()
    if target is aten.layer_norm.default or target is aten.rms_norm.default:
        return same() if dim < rank - len(args[1]) else None
    if target is aten.linear.default:
        return same() if dim < rank - 1 else None
    if target is aten.flatten.using_ints or target is aten.unflatten.int:
        before = _shape(first)
        return same() if before is not None and dim < args[1] % len(before) else None  # dims ahead of it
    if target is aten.slice.Tensor:
        step = args[4] if len(args) > 4 else 1
        start = args[2] if len(args) > 2 else 0
        end = args[3] if len(args) > 3 else _FULL_SLICE
        full = start in (0, None) and isinstance(end, int) and end >= _FULL_SLICE and step == 1
        return same() if full and args[1] % rank != dim else None
    if target is aten.transpose.int:
        a, b = args[1] % rank, args[2] % rank
        source = b if dim == a else a if dim == b else dim
        return _one_input(first, (source, index), args[1:], kwargs)
    if target is aten.permute.default:
        return _one_input(first, (args[1][dim] % rank, index), args[1:], kwargs)
    if target in _VIEWS:
        return _view_rule(node, dim, index)
    if target in _BINARY:
        return _broadcast_rule(node, dim, index)
    if target is aten.scaled_dot_product_attention.default:
        return _attention_rule(node, dim, index)
    return None


def _one_input(first: fx.Node, row: Row, rest: tuple, kwargs: dict):
    def rebuild(row_of):
        return (row_of(first, row), *rest), dict(kwargs)
    return {first: row}, rebuild


def _view_rule(node: fx.Node, dim: int, index: int):
    """A reshape that keeps every dim up to ``dim``: the same row of the input, shape entry 1."""
    source, shape = node.args[0], list(node.args[1])
    before, after = _shape(source), _shape(node)
    if before is None or len(before) <= dim or len(shape) != len(after):
        return None
    if not all(_same(before[i], after[i]) for i in range(dim + 1)):
        return None
    if not (isinstance(shape[dim], int) and shape[dim] == -1):
        shape[dim] = 1
    return _one_input(source, (dim, index), (shape, *node.args[2:]), node.kwargs)


def _broadcast_rule(node: fx.Node, dim: int, index: int):
    out = _shape(node)
    reads: dict[fx.Node, Row | None] = {}
    for arg in node.args[:2]:
        if not isinstance(arg, fx.Node):
            continue
        shape = _shape(arg)
        if shape is None:
            return None
        aligned = dim - (len(out) - len(shape))
        reads[arg] = (aligned, index) if aligned >= 0 and not _same(shape[aligned], 1) else None

    def rebuild(row_of):
        new_args = tuple(row_of(a, reads[a]) if isinstance(a, fx.Node) and reads[a] is not None else a
                         for a in node.args)
        return new_args, dict(node.kwargs)
    return reads, rebuild


def _attention_rule(node: fx.Node, dim: int, index: int):
    """SDPA's output row i is query row i attending to every key: narrow the query (and mask)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    rank = len(_shape(node))
    if dim != rank - 2 or bound.get("is_causal", False):
        return None  # causal attention lines query i up with key i: a narrowed query would not
    query, mask = bound["query"], bound.get("attn_mask")
    reads: dict[fx.Node, Row | None] = {query: (dim, index), bound["key"]: None, bound["value"]: None}
    if isinstance(mask, fx.Node):
        shape = _shape(mask)
        if shape is None:
            return None
        aligned = len(shape) - 2
        reads[mask] = (aligned, index) if aligned >= 0 and not _same(shape[aligned], 1) else None

    def rebuild(row_of):
        def swap(value):
            return row_of(value, reads[value]) if isinstance(value, fx.Node) and reads.get(value) is not None else value
        return tuple(swap(a) for a in node.args), {k: swap(v) for k, v in node.kwargs.items()}
    if query is bound["key"] or query is bound["value"]:
        return None  # self-attention on one tensor: the key side needs every row of it
    return reads, rebuild


# --- shapes ------------------------------------------------------------------------------------------

def _shape(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a: object, b: object) -> bool:
    """Structural equality of two sizes (ints or the same symbol), without adding shape guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _set_val(new: fx.Node, old: fx.Node, dim: int) -> None:
    """``new``'s fake value: ``old``'s with one row along ``dim`` (later passes read shapes)."""
    val = old.meta.get("val")
    new.meta.pop("val", None)
    if isinstance(val, torch.Tensor):
        mode = getattr(val, "fake_mode", None)
        try:
            with mode if mode is not None else contextlib.nullcontext():
                new.meta["val"] = val.narrow(dim, 0, 1).clone()
        except Exception:  # noqa: BLE001 - a missing shape only stops later narrowing, it is never wrong
            pass

