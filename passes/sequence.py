"""Matchers for the prompt methods: attention ops and the op that starts the token sequence.

Both look only at ops, shapes and the module path recorded on each node, never at class
names, so they serve text, vision and audio models alike:

- :func:`find_attention_sites`: every ``scaled_dot_product_attention``, with its head layout
  (query heads, key/value heads before any grouped-query repeat, head size).
- :func:`find_sequence_entry`: for text models the token-embedding lookup fed straight from an
  integer input (PEFT inserts virtual tokens there); otherwise the residual stream entering the
  first attention (a ViT's patch tokens plus class token, a wav2vec2's projected features, a
  Conformer's frames), located in the graph and tied to the module whose forward returns it or,
  failing that, takes it as its first argument. The stream may be laid out [batch, sequence,
  hidden] or [sequence, batch, hidden] (nn.MultiheadAttention's layout, inside the module even
  with ``batch_first=True``); its sequence axis is the one that has the attention's query length.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.errors import TargetError
from adaptc.inputs import Inputs

from . import speedups
from .attention import _MATMUL, _SOFTMAX, _match

_SDPA = {torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
_EMBEDDING = {torch.ops.aten.embedding.default, F.embedding}
_LINEAR = {torch.ops.aten.linear.default, F.linear, torch.ops.aten.addmm.default, torch.ops.aten.matmul.default,
           torch.ops.aten.mm.default, torch.matmul}
# Ops that keep a tensor's data and only change its layout: walked through when tracing an operand back.
_LAYOUT = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default, torch.ops.aten.contiguous.default, torch.ops.aten.clone.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.unbind.int, torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default, torch.ops.aten.alias.default, torch.ops.aten._to_copy.default,
    torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.chunk.default,
    torch.ops.aten.dropout.default, torch.ops.aten.layer_norm.default, torch.ops.aten.native_layer_norm.default,
    operator.getitem, speedups.dropout,
}
_LAYOUT_METHODS = {"view", "reshape", "expand", "unsqueeze", "transpose", "permute", "contiguous", "chunk",
                   "split", "unbind", "to", "float", "type_as", "clone"}


@dataclass
class AttentionSite:
    """One attention op: where it is and the shape of its keys."""

    name: str  # the module whose forward calls it
    node: str
    heads: int  # query heads at the op
    kv_heads: int  # key/value heads at the op (== heads when the model repeats them before the op)
    source_kv_heads: int  # key/value heads before a grouped-query repeat (what a prefix needs)
    head_dim: int
    value_dim: int

    @property
    def kind(self) -> str:
        return "attention"


@dataclass
class SequenceEntry:
    """Where virtual tokens enter the sequence."""

    kind: str  # "token-embedding" (text) or "sequence" (any other)
    module: str  # the module whose forward output gets the virtual tokens
    hidden: int
    insert_at: int = 0  # index in the sequence (after class/distillation tokens in a ViT)
    ids_input: str | None = None  # the input holding token ids (text)
    vocab: int = 0
    table: str | None = None  # the looked-up parameter, when the model's own forward calls F.embedding on it
    axis: int = 1  # the sequence axis of the stream: 1 for [batch, sequence, hidden], 0 for [sequence, batch, hidden]
    where: str = "output"  # the stream is the module's output, or ("input") its first argument
    # Modules after the insertion that count leading tokens (timm's num_prefix_tokens): they count the virtual ones too.
    prefix_modules: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "token-embedding":
            where = f"F.embedding on {self.table!r}" if self.table else self.module
            return f"token embedding {where} (ids from {self.ids_input!r}, vocab {self.vocab}, hidden {self.hidden})"
        layout = "[sequence, batch, hidden]" if self.axis == 0 else "[batch, sequence, hidden]"
        text = (f"sequence at the {self.where} of {self.module or 'the model input'} ({layout}, hidden {self.hidden}, "
                f"inserted at {self.insert_at})")
        if self.prefix_modules:
            text += f"; counted as prefix tokens by {len(self.prefix_modules)} modules (no rotary position)"
        return text


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: Any) -> tuple | None:
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA


def _static(size: Any) -> int | None:
    try:
        return int(size)
    except (TypeError, ValueError):
        return None


def _source_heads(k: fx.Node, heads: int, head_dim: int) -> int:
    """Key/value heads before a grouped-query repeat (``repeat_kv``: expand + reshape), if any."""
    best = heads
    node, seen = k, 0
    while isinstance(node, fx.Node) and seen < 12:
        shape = _shape(node)
        if shape is not None and len(shape) == 4:
            h, d = _static(shape[1]), _static(shape[3])
            if h and d == head_dim and heads % h == 0:
                best = min(best, h)
        if node.op != "call_function" or node.target not in _LAYOUT or not node.args:
            break
        node, seen = node.args[0], seen + 1
    return best


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention op, in graph order, named by the module that calls it."""
    sites, counts = [], {}
    for index, node in enumerate(n for n in gm.graph.nodes if is_attention(n)):
        q, k, v = node.args[:3]
        q_shape, k_shape, v_shape = _shape(q), _shape(k), _shape(v)
        if not (q_shape and k_shape and v_shape) or len(k_shape) != 4:
            continue  # no shape metadata (fx fallback) or an unusual layout: not adaptable
        heads, kv_heads = _static(q_shape[1]), _static(k_shape[1])
        head_dim, value_dim = _static(k_shape[3]), _static(v_shape[3])
        if None in (heads, kv_heads, head_dim, value_dim):
            continue
        name = _module_path(node) or f"attention_{index}"
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > 1:
            name = f"{name}#{counts[name]}"
        sites.append(AttentionSite(name, node.name, heads, kv_heads, _source_heads(k, kv_heads, head_dim),
                                   head_dim, value_dim))
    return sites


def attention_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Attention nodes by site name (the same naming as :func:`find_attention_sites`)."""
    by_node = {site.node: site.name for site in find_attention_sites(gm)}
    return {by_node[n.name]: n for n in gm.graph.nodes if n.name in by_node}


# --- the sequence entry ---------------------------------------------------------------------

def _embedding_lookups(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, str]]:
    """(lookup node, ids placeholder, weight target) for embedding ops indexed by a graph input."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _EMBEDDING:
            continue
        weight, ids = (node.args[0], node.args[1]) if node.target is torch.ops.aten.embedding.default else (
            node.args[1], node.args[0])
        steps = 0
        while isinstance(ids, fx.Node) and ids.op == "call_function" and ids.target in _LAYOUT and steps < 4:
            ids, steps = ids.args[0], steps + 1  # input_ids.view(-1, length) and the like
        if not (isinstance(ids, fx.Node) and ids.op == "placeholder" and isinstance(weight, fx.Node)):
            continue
        if weight.op != "get_attr":
            continue
        ids_val = _val(ids)
        if isinstance(ids_val, torch.Tensor) and (ids_val.dim() != 2 or ids_val.is_floating_point()):
            continue
        found.append((node, ids, weight.target))
    return found


_NOT_IDS = ("labels", "attention_mask", "token_type_ids", "position_ids")


def _placeholder_input_name(placeholder: fx.Node, model: nn.Module, inputs: Inputs) -> str:
    import inspect

    params = list(inspect.signature(model.forward).parameters)
    name = str(placeholder.target)
    given = inputs.kwargs.get(name)
    if given is not None:
        # One tensor passed under several names (labels=input_ids, as HF users do) is one placeholder,
        # named after any of them: the ids are the one that is not labels or a mask.
        aliases = [k for k, v in inputs.kwargs.items() if v is given]
        name = next((k for k in aliases if k not in _NOT_IDS), name)
    if name in params or name in inputs.kwargs:
        return name
    raise TargetError(
        f"the token ids reach the embedding from graph input {name!r}, which is not a parameter of "
        f"{type(model).__name__}.forward; pass the ids as a keyword input"
    )


def _first_attention(gm: fx.GraphModule) -> fx.Node | None:
    """The first attention op: a fused one, or the q @ k^T matmul of an unfused one (both take q first)."""
    for node in gm.graph.nodes:
        if is_attention(node) or (node.op == "call_function" and node.target in _MATMUL and _match(node)):
            return node
    return None


def _query_projection_input(attention: fx.Node) -> fx.Node | None:
    """The input of the linear op that makes the attention's queries."""
    return _query_projection_input_from(attention.args[0], 0)


def _query_projection_input_from(node: Any, steps: int) -> fx.Node | None:
    while isinstance(node, fx.Node) and steps < 16:
        if node.op == "call_function" and node.target in _LINEAR:
            x = node.args[1] if node.target is torch.ops.aten.addmm.default else node.args[0]
            return x if isinstance(x, fx.Node) else None
        if node.op == "call_function" and node.target in (torch.ops.aten.cat.default, torch.cat):
            # Rotary embeddings applied to all but the prefix tokens (EVA): cat([q[:, :, :n], rope(q[:, :, n:])]).
            parts = [p for p in node.args[0] if isinstance(p, fx.Node)]
            found = (_query_projection_input_from(p, steps + 1) for p in parts)
            return next((x for x in found if x is not None), None)
        if node.op == "call_module":
            return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if not node.args:
            return None
        if node.op == "call_method" and node.target not in _LAYOUT_METHODS:
            return None
        node, steps = node.args[0], steps + 1
    return None


def _class_tokens(stream: fx.Node, axis: int = 1) -> int:
    """Tokens concatenated in front of the main sequence (class / distillation tokens), if any."""
    frontier, seen = [stream], set()
    while frontier:
        node = frontier.pop(0)
        if not isinstance(node, fx.Node) or node in seen or len(seen) > 24:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target in (torch.ops.aten.cat.default, torch.cat):
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            shapes = [_shape(p) for p in parts]
            if all(s and len(s) == 3 for s in shapes) and dim in (axis, axis - 3):
                sizes = [_static(s[axis]) for s in shapes]
                main = max(range(len(parts)), key=lambda i: sizes[i] if sizes[i] is not None else 1 << 30)
                if all(s is not None for s in sizes[:main]):
                    return sum(sizes[:main])
            continue
        if node.op == "call_function":
            frontier.extend(a for a in node.args if isinstance(a, fx.Node))
    return 0


def _has_softmax(gm: fx.GraphModule) -> bool:
    return any(node.op == "call_function" and node.target in _SOFTMAX for node in gm.graph.nodes)


def find_sequence_entry(gm: fx.GraphModule, model: nn.Module, inputs: Inputs, method: str) -> SequenceEntry:
    """Where ``method``'s virtual tokens go, or a TargetError saying why there is no such place."""
    attention = _first_attention(gm)
    lookups = _embedding_lookups(gm)
    # A state-space model (Mamba) mixes its tokens without any attention: its token embeddings are still a
    # sequence to extend. A softmax means attention adaptc did not recognize (hand-written, soft-capped): refused.
    if attention is None and not (lookups and not _has_softmax(gm)):
        raise TargetError(
            f"{type(model).__name__} has no attention op (scaled_dot_product_attention), so it has no token "
            f"sequence for {method!r} to extend; use method='lora', which adapts its linear and conv layers"
        )
    if lookups:
        node, ids, weight_target = max(lookups, key=lambda item: _static(_shape(item[0].args[0])[0]) or 0)
        # The module whose forward does the lookup (a tied weight may be named after the head).
        module = _module_path(node) or weight_target.rpartition(".")[0]
        vocab, hidden = (int(s) for s in _shape(node.args[0] if node.target is torch.ops.aten.embedding.default
                                                else node.args[1]))
        ids_input = _placeholder_input_name(ids, model, inputs)
        if not module:  # the model's own forward calls F.embedding on a bare parameter: the edit patches F.embedding
            try:
                model.get_parameter(weight_target)
            except AttributeError:
                raise TargetError(
                    f"{type(model).__name__} looks up its token embeddings ({weight_target!r}) in its own forward, "
                    f"and that is not one of its parameters, so adaptc cannot find the lookup to put {method!r}'s "
                    "virtual tokens into; move the lookup into an nn.Embedding submodule, or use method='prefix' or 'lora'"
                ) from None
            return SequenceEntry("token-embedding", "", hidden, 0, ids_input, vocab, table=weight_target)
        return SequenceEntry("token-embedding", module, hidden, 0, ids_input, vocab)
    x = _query_projection_input(attention)
    if x is None or _shape(x) is None or len(_shape(x)) != 3:
        raise TargetError(
            f"could not find the token sequence (a [batch, sequence, hidden] or [sequence, batch, hidden] tensor) "
            f"that feeds {type(model).__name__}'s first attention; {method!r} needs it. Use method='lora'"
        )
    query = _shape(attention.args[0])
    return _stream_entry(gm, model, inputs, method, x, query[-2] if query else None)


# --- the sequence entry of a model without token ids --------------------------------------------

# Ops a sequence passes through unchanged in length on its way to the query projection (norms,
# casts, dropout, the [batch, sequence] <-> [sequence, batch] transposes of nn.MultiheadAttention).
_PASS_THROUGH = {
    torch.ops.aten.layer_norm.default, torch.ops.aten.native_layer_norm.default, operator.getitem,
    torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.contiguous.default,
    torch.ops.aten.clone.default, torch.ops.aten.alias.default, torch.ops.aten._to_copy.default,
    torch.ops.aten.to.dtype, torch.ops.aten.dropout.default, speedups.dropout, F.layer_norm, F.dropout,
}
_ADD = {torch.ops.aten.add.Tensor, operator.add, torch.add}
_NORMS = {torch.ops.aten.layer_norm.default, torch.ops.aten.native_layer_norm.default, operator.getitem}


def _is_ancestor(candidate: fx.Node, node: fx.Node, limit: int = 400) -> bool:
    """Whether ``candidate`` is upstream of ``node`` (bounded search)."""
    frontier, seen = [node], set()
    while frontier and len(seen) < limit:
        current = frontier.pop()
        if current is candidate:
            return True
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(a for a in current.all_input_nodes)
    return False


_SHAPE_ONLY = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
               torch.ops.aten._assert_tensor_metadata.default}


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users that read the tensor's values, not only its shape."""
    return [user for user in node.users if not (user.op == "call_function" and user.target in _SHAPE_ONLY)
            and "_guards_fn" not in str(user.target)]  # torch.export's input guards read shapes only


def _stream_candidates(x: fx.Node) -> list[tuple[fx.Node, bool]]:
    """Nodes that may hold the token stream, from the query projection's input upstream, each with
    whether virtual tokens inserted there reach every later use of the stream.

    Steps back through norms and layout ops, and through residual additions ``f(s) + s`` to ``s``
    (a Conformer block's half-step feed-forward runs before its attention). A node whose stream is
    also read past it (a pre-norm block's residual reads the stream, not the norm's output) is not
    a complete insertion point: the residual would add a shorter sequence.
    """
    chain, node = [], x
    while isinstance(node, fx.Node) and len(chain) < 32:
        chain.append(node)
        if node.op != "call_function" or not node.args:
            break
        if node.target in _PASS_THROUGH and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        elif node.target in _ADD and all(isinstance(a, fx.Node) for a in node.args[:2]):
            a, b = node.args[:2]
            node = b if _is_ancestor(b, a) else a if _is_ancestor(a, b) else None
        else:
            break
    found, complete = [], True
    for index in range(len(chain) - 1, -1, -1):  # upstream first, to know what reads past each node
        node = chain[index]
        shape = _shape(node)
        if shape is None or len(shape) == 3:  # no shape metadata (an fx capture): the value is checked later
            found.append((node, complete))
        downstream = chain[index - 1] if index else None
        if downstream is not None and downstream.target not in _ADD and len(_data_users(node)) > 1:
            complete = False  # something besides the chain reads the stream here
    return list(reversed(found))


def _sequence_axis(shape: tuple, length: Any, batch: int | None) -> int | None:
    """Which of the first two axes of a 3-d stream is the sequence: the one of the attention's query
    length (a symbol in a dynamic capture, so exact), else the one that is not the batch."""
    same = [0, 1] if length is None else [axis for axis in (0, 1) if str(shape[axis]) == str(length)]
    if len(same) == 1:
        return same[0]
    if not same:
        return None
    if batch is not None and _static(shape[0]) == batch != _static(shape[1]):
        return 1
    if batch is not None and _static(shape[1]) == batch != _static(shape[0]):
        return 0
    return 1


def _stream_values(gm: fx.GraphModule, targets: list[fx.Node], inputs: Inputs) -> dict[fx.Node, torch.Tensor]:
    """Run the graph until every node in ``targets`` has a value; return them."""
    wanted, values = set(targets), {}

    class _Done(Exception):
        pass

    class _Runner(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                values[n] = value
                if len(values) == len(wanted):
                    raise _Done
            return value

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        with torch.no_grad():
            _Runner(gm).run(*inputs.flat()[: len(placeholders)])
    except _Done:
        pass
    return values


@dataclass
class _Call:
    order: int  # when the module's forward started, in the run's call order
    end: int = -1  # when it returned (-1: still running)


def _modules_holding(model: nn.Module, inputs: Inputs, values: list[torch.Tensor]
                     ) -> tuple[list[tuple[str, str] | None], dict[str, _Call]]:
    """For each value, the first module (in execution order) whose forward returns it ("output") or,
    failing that, takes it as its first argument ("input"); and when each module ran."""

    def matches(tensor: Any, value: torch.Tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.shape == value.shape and torch.equal(tensor, value)

    outputs: list[str | None] = [None] * len(values)
    takers: list[str | None] = [None] * len(values)
    calls: dict[str, _Call] = {}
    clock = [0]
    names = {m: n for n, m in model.named_modules()}

    def before(module, args):
        clock[0] += 1
        name = names[module]
        calls.setdefault(name, _Call(clock[0]))
        for i, value in enumerate(values):
            if takers[i] is None and args and matches(args[0], value):
                takers[i] = name

    def after(module, _args, out):
        clock[0] += 1
        call = calls[names[module]]
        call.end = call.end if call.end >= 0 else clock[0]
        for i, value in enumerate(values):
            if outputs[i] is None and matches(out, value):
                outputs[i] = names[module]

    handles = []
    for module in names:
        if module is not model:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    found = [("output", o) if o else ("input", t) if t else None for o, t in zip(outputs, takers)]
    return found, calls


def _prefix_counters(model: nn.Module, calls: dict[str, _Call], module: str, where: str, insert_at: int) -> tuple[str, ...]:
    """Modules that run on the extended sequence and keep a count of its leading tokens (timm's
    ``num_prefix_tokens``: rotary attention leaves those tokens unrotated, patch dropout keeps them)."""
    entry = calls.get(module)
    if entry is None:
        return ()
    start = entry.end if where == "output" else entry.order
    found = []
    for name, sub in model.named_modules():
        count = getattr(sub, "num_prefix_tokens", None)
        call = calls.get(name)
        if (sub is not model and isinstance(count, int) and not isinstance(count, bool) and call is not None
                and call.order > start and insert_at <= count):
            found.append(name)
    return tuple(found)


def _read_only_inside(node: fx.Node, module: str) -> bool:
    """Whether every op that reads ``node``'s values runs inside ``module``'s forward: then
    inserting tokens into that module's argument reaches them all."""
    for user in _data_users(node):
        stack = user.meta.get("nn_module_stack") or {}
        paths = {entry[0] for entry in stack.values() if isinstance(entry, tuple) and entry}
        if module not in paths:
            return False
    return True


def _stream_entry(gm: fx.GraphModule, model: nn.Module, inputs: Inputs, method: str, x: fx.Node,
                  length: Any) -> SequenceEntry:
    """The entry of a model whose sequence does not start at a token lookup: the token stream entering
    its first attention, laid out [batch, sequence, hidden] or [sequence, batch, hidden]."""
    complete = [node for node, ok in _stream_candidates(x) if ok]
    # Where both hold the stream, the norm's input goes before its output, then upstream nodes.
    stream = x
    while stream.op == "call_function" and stream.target in _NORMS and isinstance(stream.args[0], fx.Node):
        stream = stream.args[0]
    complete.sort(key=lambda node: 0 if node is stream else 1 if node is x else 2)
    values = _stream_values(gm, complete, inputs)
    complete = [node for node in complete if isinstance(values.get(node), torch.Tensor) and values[node].dim() == 3]
    holders, calls = _modules_holding(model, inputs, [values[node] for node in complete])
    batch = next((leaf.shape[0] for leaf in inputs.flat() if isinstance(leaf, torch.Tensor) and leaf.dim()), None)
    for node, holder in zip(complete, holders):
        if holder is None:
            continue
        value = values[node]
        axis = _sequence_axis(_shape(node) or tuple(value.shape), length, batch)
        if axis is None:
            continue
        where, module = holder
        if where == "input" and not _read_only_inside(node, module):
            continue  # the module is not the only reader (a pre-norm's norm, with the residual outside it)
        insert_at = _class_tokens(node, axis)
        return SequenceEntry("sequence", module, int(value.shape[-1]), insert_at, axis=axis, where=where,
                             prefix_modules=_prefix_counters(model, calls, module, where, insert_at))
    raise TargetError(
        f"the token sequence entering {type(model).__name__}'s first attention is neither the output nor the first "
        f"input of a submodule, so adaptc cannot add {method!r}'s virtual tokens there; use method='lora' or 'prefix'"
    )
