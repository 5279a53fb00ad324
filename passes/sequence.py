"""Matchers for the prompt methods: attention ops and the op that starts the token sequence.

Both look only at ops, shapes and the module path recorded on each node, never at class
names, so they serve text, vision and audio models alike:

- :func:`find_attention_sites`: every ``scaled_dot_product_attention``, with its head layout
  (query heads, key/value heads before any grouped-query repeat, head size).
- :func:`find_sequence_entry`: for text models the token-embedding lookup fed straight from an
  integer input (PEFT inserts virtual tokens there); otherwise the residual stream entering the
  first attention (a ViT's patch tokens plus class token, a wav2vec2's projected features),
  located in the graph and tied to the module whose forward returns it.
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
from .attention import _MATMUL, _match

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

    def describe(self) -> str:
        if self.kind == "token-embedding":
            where = f"F.embedding on {self.table!r}" if self.table else self.module
            return f"token embedding {where} (ids from {self.ids_input!r}, vocab {self.vocab}, hidden {self.hidden})"
        return f"sequence at the output of {self.module or 'the model input'} (hidden {self.hidden}, inserted at {self.insert_at})"


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
    node, steps = attention.args[0], 0
    while isinstance(node, fx.Node) and steps < 16:
        if node.op == "call_function" and node.target in _LINEAR:
            x = node.args[1] if node.target is torch.ops.aten.addmm.default else node.args[0]
            return x if isinstance(x, fx.Node) else None
        if node.op == "call_module":
            return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if not node.args:
            return None
        if node.op == "call_method" and node.target not in _LAYOUT_METHODS:
            return None
        node, steps = node.args[0], steps + 1
    return None


def _stream_value(gm: fx.GraphModule, target: fx.Node, inputs: Inputs) -> torch.Tensor:
    """Run the graph to ``target`` and return its value."""

    class _Found(Exception):
        pass

    class _Runner(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is target:
                found = _Found()
                found.value = value  # not in args: fx's Interpreter rewrites args[0] into a message
                raise found
            return value

    flat = [leaf for leaf in inputs.flat()]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        with torch.no_grad():
            _Runner(gm).run(*flat[: len(placeholders)])
    except _Found as found:
        return found.value
    raise TargetError("internal error: the sequence node was not reached when running the graph")


def _module_returning(model: nn.Module, inputs: Inputs, value: torch.Tensor) -> str | None:
    """The first module (in execution order) whose forward returns ``value``, by dotted path."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def record(module, _args, out):
        if found:
            return
        tensor = out if isinstance(out, torch.Tensor) else None
        if tensor is not None and tensor.shape == value.shape and torch.equal(tensor, value):
            found.append(names[module])

    for module in names:
        if module is not model:
            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _class_tokens(stream: fx.Node) -> int:
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
            if all(s and len(s) == 3 for s in shapes) and dim in (1, -2):
                sizes = [_static(s[1]) for s in shapes]
                main = max(range(len(parts)), key=lambda i: sizes[i] if sizes[i] is not None else 1 << 30)
                if all(s is not None for s in sizes[:main]):
                    return sum(sizes[:main])
            continue
        if node.op == "call_function":
            frontier.extend(a for a in node.args if isinstance(a, fx.Node))
    return 0


def find_sequence_entry(gm: fx.GraphModule, model: nn.Module, inputs: Inputs, method: str) -> SequenceEntry:
    """Where ``method``'s virtual tokens go, or a TargetError saying why there is no such place."""
    attention = _first_attention(gm)
    if attention is None:
        raise TargetError(
            f"{type(model).__name__} has no attention op (scaled_dot_product_attention), so it has no token "
            f"sequence for {method!r} to extend; use method='lora', which adapts its linear and conv layers"
        )
    lookups = _embedding_lookups(gm)
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
    shape = _shape(x)
    if x is None or shape is None or len(shape) != 3:
        raise TargetError(
            f"could not find the [batch, sequence, hidden] input of {type(model).__name__}'s first attention; "
            f"{method!r} needs it. Use method='lora'"
        )
    # Pre-norm blocks normalise the stream first: step back to the stream itself.
    stream = x
    while (
        stream.op == "call_function"
        and stream.target in (torch.ops.aten.layer_norm.default, operator.getitem, torch.ops.aten.native_layer_norm.default)
        and isinstance(stream.args[0], fx.Node)
    ):
        stream = stream.args[0]
    value = _stream_value(gm, stream, inputs)
    batch = next((leaf.shape[0] for leaf in inputs.flat() if isinstance(leaf, torch.Tensor) and leaf.dim()), None)
    if batch is not None and value.shape[0] != batch and value.shape[1] == batch:
        raise TargetError(
            f"the token sequence entering {type(model).__name__}'s first attention is laid out [sequence, batch, "
            f"hidden] (nn.MultiheadAttention's default, as in torchaudio's Conformer); adaptc adds {method!r}'s "
            "virtual tokens to [batch, sequence, hidden] sequences only. Use method='prefix' or 'lora'"
        )
    module = _module_returning(model, inputs, value)
    if module is None and stream is not x:
        value = _stream_value(gm, x, inputs)
        module = _module_returning(model, inputs, value)
    if module is None:
        raise TargetError(
            f"the token sequence entering {type(model).__name__}'s first attention is not the output of a "
            f"submodule, so adaptc cannot add virtual tokens there; use method='lora' or 'prefix'"
        )
    return SequenceEntry("sequence", module, int(value.shape[-1]), _class_tokens(stream))
