"""Chunked LM-head loss: a causal LM's loss without its [batch, sequence, vocab] logits.

A causal LM that computes its loss from ``labels`` runs (transformers' ``ForCausalLMLoss``)::

    logits = linear(hidden, W_head)        # [B, S, V]   (Gemma 2: / cap, tanh, * cap)
    loss = cross_entropy(logits.float().view(-1, V), shifted_labels, ignore_index=-100)

so a training step holds the logits, their float copy, the log-softmax that cross-entropy keeps for the
backward and, in the backward, their gradients: several ``B * S * V`` tensors, the largest of the step for
a large vocabulary. This pass (training graphs only, off by default: ``am.chunked_loss()``) replaces the
chain from the head's ``aten.linear`` to ``aten.cross_entropy_loss`` (or ``nll_loss(log_softmax(.))``)
by one :class:`ChunkedHeadLoss` node. Its autograd Function runs the head and the loss over
``chunk_size`` tokens at a time and keeps only the hidden states; the backward recomputes each chunk's
logits and turns them into the gradient of the hidden states (and of the head's weight and bias when
they train; a frozen head weight gets no gradient work).

Matched between the head and the loss: casts, ``contiguous``/``clone``, ``tanh``, and ``mul`` / ``div``
/ ``add`` / ``sub`` by a number, a 0-d tensor or a ``[V]`` vector (logit scaling and soft-capping), and
the one flattening ``view`` to ``[-1, V]``. Any other op there (a LoRA adapter on the head, a slice of
the logits, a second reader of the logits) leaves the loss unchunked, with a note saying why (the
``adaptc.passes.chunked_loss`` logger, at debug level, and the list ``am.chunked_loss()`` returns).
The labels' shift, ``ignore_index``, ``label_smoothing`` and the reduction (``mean``, or ``sum`` followed
by transformers' division by ``num_items_in_batch``, which stays in the graph) are kept.

The model's output still has a ``logits`` field: with ``logits=False`` (the default) it is ``None`` in
the training graph (as with Liger-Kernel's ``skip_logits``); with ``logits=True`` the forward writes
each chunk's logits into one output tensor that has no gradient (one ``B * S * V`` tensor in the
model's dtype, alive as long as the caller keeps the output; no extra compute). Evaluation graphs are
never rewritten.

The rewrite is reversible like :func:`adaptc.passes.lora_fused.absorb_bases`: the matched nodes stay in
the graph as no-ops with their targets kept in ``node.meta``, so :func:`restore` gives the original
graph back (the pass manager does so before a pass that must see the head's linear op).
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.errors import ConfigError

from .manager import ABSORB, GraphPass

aten = torch.ops.aten
log = logging.getLogger(__name__)

MODULES_ATTR = "_adaptc_chunked_loss"
CHUNKED = "adaptc_chunked_loss_op"  # node.meta key: the target of a node the chunked loss computes itself
REPLACES = "adaptc_chunked_loss_replaces"  # node.meta key on the new getitem nodes: the node they stand for

_CE = aten.cross_entropy_loss.default
_NLL = {aten.nll_loss.default, aten.nll_loss_nd.default}
_LOG_SOFTMAX = {aten.log_softmax.int, aten._log_softmax.default}
_ASSERT = {aten._assert_tensor_metadata.default}
_FLATTEN = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Ops computed per logit from their first argument (and, for the binary ones, a number or a small tensor).
_UNARY = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.contiguous.default,
          aten.clone.default, aten.alias.default, aten.tanh.default}
_BINARY = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor,
           aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar}
_CE_DEFAULTS = {"weight": None, "reduction": 1, "ignore_index": -100, "label_smoothing": 0.0}
_MEAN, _SUM = 1, 2


@torch.fx.node.has_side_effect
def _chunked_away(*args: object, **kwargs: object) -> None:
    """Stands in for an op the chunked loss computes (see :func:`restore`); kept from dead-code removal."""
    return None


@dataclass
class ChunkedLossOptions:
    """Read by every :class:`ChunkedHeadLoss` at each call: changing them needs no graph edit."""

    chunk_size: int = 1024
    logits: bool = False  # return the logits (without gradient) in the output, or None

    def validate(self) -> None:
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive number of tokens, got {self.chunk_size!r}")
        if not isinstance(self.logits, bool):
            raise ConfigError(f"logits must be True or False, got {self.logits!r}")


# --- the runtime --------------------------------------------------------------------------------


class _ChunkedHeadLossFn(torch.autograd.Function):
    """``head`` then cross-entropy over chunks of tokens; the backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, spec, hidden, target, *tensors):
        head, chunk, want_logits = spec.head, spec.chunk_size, spec.want_logits
        h = hidden.reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        n = h.shape[0]
        total = None
        logits = None
        for start in range(0, n, chunk):
            out, z = head(h[start:start + chunk], *tensors)
            part = F.cross_entropy(z, t[start:start + chunk], reduction="sum", ignore_index=spec.ignore_index,
                                   label_smoothing=spec.label_smoothing)
            total = part if total is None else total + part
            if want_logits:
                if logits is None:
                    logits = out.new_empty((n, out.shape[-1]))
                logits[start:start + chunk] = out
            del out, z
        if total is None:  # no token at all
            total = h.new_zeros((), dtype=torch.float32)
        count = (t != spec.ignore_index).sum() if spec.reduction == _MEAN else None
        loss = total / count if count is not None else total
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.spec, ctx.count = spec, count
        ctx.save_for_backward(hidden, target, *tensors)
        if not want_logits:
            return loss
        logits = logits.view(*(hidden.shape[:-1] if spec.logits_per_row else (n,)), -1)
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, *_grad_logits):
        hidden, target, *tensors = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        head, chunk = spec.head, spec.chunk_size
        h = hidden.reshape(-1, hidden.shape[-1])
        t = target.reshape(-1)
        scale = grad_loss if ctx.count is None else grad_loss / ctx.count
        want_h = needs[1]
        # Only the tensors that need a gradient become leaves: a frozen head weight costs no weight-gradient GEMM.
        leaves = [x.detach().requires_grad_(True) if needs[3 + i] else x for i, x in enumerate(tensors)]
        trained = [leaf for i, leaf in enumerate(leaves) if needs[3 + i]]
        grad_h = torch.empty_like(h) if want_h else None
        grad_params: list[torch.Tensor | None] = [None] * len(trained)
        inputs_wanted = want_h or trained
        device, enabled, dtype = ctx.autocast
        for start in range(0, h.shape[0] if inputs_wanted else 0, chunk):
            hc = h[start:start + chunk].detach().requires_grad_(want_h)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                _out, z = head(hc, *leaves)
            # The cross-entropy's gradient written out: one [chunk, vocab] buffer beside the logits, where
            # autograd through log_softmax and nll_loss would hold three.
            dz = _cross_entropy_grad(z.detach(), t[start:start + chunk], scale, spec)
            inputs = ([hc] if want_h else []) + trained
            grads = torch.autograd.grad(z, inputs, grad_outputs=dz)
            del z, dz, _out
            if want_h:
                grad_h[start:start + chunk] = grads[0]
                grads = grads[1:]
            grad_params = [g if acc is None else acc.add_(g) for acc, g in zip(grad_params, grads)]
        grads_by_input = iter(grad_params)
        tensor_grads = [next(grads_by_input) if needs[3 + i] else None for i in range(len(tensors))]
        return None, grad_h.view_as(hidden) if want_h else None, None, *tensor_grads


def _cross_entropy_grad(z: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """d(sum of cross_entropy(z, target, ignore_index, label_smoothing)) / dz, times ``scale``:
    ``softmax(z) - (1 - eps) * onehot(target) - eps / V`` on the rows whose target is not ignored, 0 elsewhere."""
    eps = spec.label_smoothing
    grad = torch.softmax(z, dim=-1)
    valid = target != spec.ignore_index
    safe = torch.where(valid, target, 0).unsqueeze(1)
    grad.scatter_add_(1, safe, torch.full_like(safe, -(1.0 - eps), dtype=grad.dtype))
    if eps:
        grad.sub_(eps / z.shape[-1])
    return grad.mul_((valid.to(grad.dtype) * scale.to(grad.dtype)).unsqueeze(1))


@dataclass
class _Spec:
    head: fx.GraphModule
    chunk_size: int
    want_logits: bool
    logits_per_row: bool
    reduction: int
    ignore_index: int
    label_smoothing: float


class ChunkedHeadLoss(nn.Module):
    """One chunked LM-head loss in a graph: ``(hidden, target, *head tensors) -> (loss, logits or None)``.

    ``head`` is a small graph of the head's ops on a ``[tokens, hidden]`` chunk, returning
    ``(the logits the model outputs, the logits the loss reads)`` for that chunk.
    """

    def __init__(self, head: fx.GraphModule, options: ChunkedLossOptions, *, reduction: int, ignore_index: int,
                 label_smoothing: float, logits_per_row: bool, has_logits_output: bool, note: str) -> None:
        super().__init__()
        self.head = head
        self.options = options
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.logits_per_row, self.has_logits_output = logits_per_row, has_logits_output
        self.note = note

    def forward(self, hidden: torch.Tensor, target: torch.Tensor, *tensors: torch.Tensor) -> tuple[Any, Any]:
        want_logits = self.has_logits_output and self.options.logits
        spec = _Spec(self.head, self.options.chunk_size, want_logits, self.logits_per_row, self.reduction,
                     self.ignore_index, self.label_smoothing)
        out = _ChunkedHeadLossFn.apply(spec, hidden, target, *tensors)
        return out if want_logits else (out, None)

    def extra_repr(self) -> str:
        return self.note


# --- the pass -----------------------------------------------------------------------------------


class _Skip(Exception):
    """This loss is left unchunked (the message says why)."""


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _loss_args(node: fx.Node, names: list[str]) -> dict[str, Any]:
    values = dict(_CE_DEFAULTS)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


@dataclass
class _Match:
    loss: fx.Node  # the cross-entropy (or nll_loss) node
    linear: fx.Node
    chain: list[fx.Node]  # from the linear's user to the loss's input, in order
    skipped: list[fx.Node]  # every node the chunked loss computes (chain, linear, log_softmax, loss, asserts)
    loss_input: fx.Node
    target: fx.Node
    output_logits: fx.Node | None  # the chain node the graph's output reads
    reduction: int
    ignore_index: int
    label_smoothing: float
    vocab: int


def _match(loss: fx.Node) -> _Match:
    if loss.target is _CE:
        args = _loss_args(loss, ["input", "target", "weight", "reduction", "ignore_index", "label_smoothing"])
        x2, softmax = args["input"], None
    else:
        args = _loss_args(loss, ["input", "target", "weight", "reduction", "ignore_index"])
        softmax = args["input"]
        if not (isinstance(softmax, fx.Node) and softmax.target in _LOG_SOFTMAX):
            raise _Skip(f"{loss.name} reads {getattr(softmax, 'name', softmax)}, not a log_softmax")
        if len(softmax.args) > 2 and softmax.args[2]:
            raise _Skip(f"{softmax.name} upcasts half to float inside log_softmax (not handled)")
        x2 = softmax.args[0]
    if args["weight"] is not None:
        raise _Skip(f"{loss.name} has class weights (not handled)")
    if args["reduction"] not in (_MEAN, _SUM):
        raise _Skip(f"{loss.name} has reduction='none' (per-token losses are not chunked)")
    val = _val(x2)
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        raise _Skip(f"{loss.name}'s input has no recorded 2-D shape (a graph not captured by torch.export?)")
    if softmax is not None and _val(softmax) is not None and softmax.args[1] not in (1, -1):
        raise _Skip(f"{softmax.name} is not over the vocabulary axis")

    chain: list[fx.Node] = []
    asserts: list[fx.Node] = []
    node, flattened = x2, False
    while True:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            what = node.target if isinstance(node, fx.Node) else node
            adapter = " (a LoRA adapter on the head: a LoRA-adapted head is not chunked)" * (
                isinstance(node, fx.Node) and node.op == "call_module")
            raise _Skip(f"the logits come from {getattr(node, 'name', node)} ({what}), not the head's aten.linear "
                        f"and token-wise ops{adapter}")
        if node.target is aten.linear.default:
            break
        module = node.args[0] if node.target is operator.getitem else None
        if isinstance(module, fx.Node) and module.op == "call_module":
            raise _Skip(f"the logits pass through {module.target} (a LoRA adapter on the head): a LoRA-adapted "
                        "head is not chunked")
        if node.target in _FLATTEN:
            if flattened:
                raise _Skip(f"{node.name}: a second reshape between the head and the loss")
            flattened = True
            source = node.args[0]
        elif node.target in _UNARY:
            source = node.args[0]
        elif node.target in _BINARY:
            source = _binary_source(node)
        else:
            raise _Skip(f"{node.name} ({node.target}) between the head and the loss is not a token-wise op adaptc "
                        "handles")
        chain.append(node)
        node = source
    linear = node
    chain.reverse()

    head_val, weight_val = _val(linear), _val(linear.args[1])
    if not (isinstance(weight_val, torch.Tensor) and weight_val.dim() == 2 and isinstance(head_val, torch.Tensor)):
        raise _Skip(f"{linear.name}: no recorded head weight shape")
    vocab = weight_val.shape[0]
    if not isinstance(vocab, int) or val.shape[-1] != vocab:
        raise _Skip(f"{linear.name}: the loss's classes are not the head's {vocab} outputs")
    if not flattened and head_val.dim() != 2:
        raise _Skip(f"{loss.name} reads the logits without flattening them to [-1, vocab]")
    for n in chain:
        v = _val(n)
        if not isinstance(v, torch.Tensor) or v.shape[-1] != vocab:
            raise _Skip(f"{n.name} does not keep the vocabulary axis last")

    # Who reads the chain: the next op in it, runtime shape checks, and the graph's output (the logits field).
    members = [linear, *chain]
    output_logits = None
    for i, n in enumerate(members):
        following = members[i + 1] if i + 1 < len(members) else (softmax or loss)
        for user in n.users:
            if user is following:
                continue
            if user.target in _ASSERT:
                asserts.append(user)
            elif user.op == "output" and output_logits is None:
                output_logits = n
            else:
                raise _Skip(f"{n.name} is also read by {user.name} ({user.target}): the logits are needed whole")
    if softmax is not None and list(softmax.users) != [loss]:
        raise _Skip(f"{softmax.name} is also read outside the loss")
    skipped = [*members, *asserts, *([softmax] if softmax is not None else []), loss]
    return _Match(loss, linear, chain, skipped, x2, args["target"], output_logits, args["reduction"],
                  args["ignore_index"], float(args["label_smoothing"]), vocab)


def _binary_source(node: fx.Node) -> fx.Node:
    """The logits argument of a binary op whose other argument is a number, a 0-d or a [vocab] tensor."""
    first, second = node.args[0], node.args[1]
    big = [a for a in (first, second) if isinstance(_val(a), torch.Tensor) and _val(a).dim() >= 2]
    if len(big) != 1 or node.kwargs:
        raise _Skip(f"{node.name} ({node.target}) combines the logits with another [tokens, ...] tensor")
    other = second if big[0] is first else first
    other_val = _val(other)
    if isinstance(other, fx.Node) and not (isinstance(other_val, torch.Tensor) and other_val.dim() <= 1):
        raise _Skip(f"{node.name}: its other argument {other.name} is not a number or a small tensor")
    return big[0]


def _head_graph(m: _Match) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The head's ops on a [tokens, hidden] chunk: ``(chunk, *tensors) -> (output logits, loss logits)``."""
    graph = fx.Graph()
    hidden = graph.placeholder("hidden")
    tensors: list[fx.Node] = []  # the main graph's nodes the head reads (weight, bias, scales)
    inputs: dict[fx.Node, fx.Node] = {}

    def external(node: fx.Node) -> fx.Node:
        if node not in inputs:
            inputs[node] = graph.placeholder(f"tensor_{len(tensors)}")
            tensors.append(node)
        return inputs[node]

    env: dict[fx.Node, fx.Node] = {}

    def arg(a: Any) -> Any:
        return fx.map_arg(a, lambda n: env[n] if n in env else external(n))

    linear = m.linear
    env[linear] = graph.call_function(aten.linear.default, (hidden, *arg(linear.args[1:])), arg(linear.kwargs))
    for node in m.chain:
        if node.target in _FLATTEN:
            env[node] = env[node.args[0]]  # the chunk is [tokens, vocab] already
        else:
            env[node] = graph.call_function(node.target, arg(node.args), arg(node.kwargs))
    out = env[m.output_logits] if m.output_logits is not None else None
    graph.output((out, env[m.loss_input]))
    return fx.GraphModule(nn.Module(), graph, class_name="ChunkedHead"), tensors


def _modules(gm: fx.GraphModule) -> nn.ModuleDict:
    owner = getattr(gm, MODULES_ATTR, None)
    if owner is None:
        owner = nn.ModuleDict()
        gm.add_module(MODULES_ATTR, owner)
    return owner


def apply(gm: fx.GraphModule, options: ChunkedLossOptions) -> list[str]:
    """Chunk every LM-head loss of ``gm``'s graph it can; returns one note per loss found (or one saying none)."""
    graph = gm.graph
    losses = [n for n in graph.nodes if n.op == "call_function" and (n.target is _CE or n.target in _NLL)
              and CHUNKED not in n.meta]
    if not losses:
        return ["no cross-entropy loss in this graph (called without labels?): nothing to chunk"]
    notes = []
    for loss in losses:
        try:
            m = _match(loss)
        except _Skip as why:
            notes.append(f"left unchunked: {why}")
            continue
        head, tensors = _head_graph(m)
        owner = _modules(gm)
        index = len(owner)
        while str(index) in owner:
            index += 1
        kind = {_MEAN: "mean", _SUM: "sum"}[m.reduction]
        ops = [str(c.target).split(".")[-2] for c in m.chain if c.target in _BINARY or c.target is aten.tanh.default]
        note = (f"chunked: {m.linear.name} -> {m.loss.name} (vocab {m.vocab}, {kind}, ignore_index={m.ignore_index}"
                + (f", logit ops {'/'.join(ops)}" if ops else "") + ")")
        flat_at = next((i for i, c in enumerate(m.chain) if c.target in _FLATTEN), len(m.chain))
        per_row = m.output_logits is None or m.output_logits is m.linear or m.chain.index(m.output_logits) < flat_at
        owner[str(index)] = ChunkedHeadLoss(
            head, options, reduction=m.reduction, ignore_index=m.ignore_index, label_smoothing=m.label_smoothing,
            logits_per_row=per_row, has_logits_output=m.output_logits is not None, note=note)
        with graph.inserting_before(m.loss):
            call = graph.call_module(f"{MODULES_ATTR}.{index}", (m.linear.args[0], m.target, *tensors))
            loss_out = graph.call_function(operator.getitem, (call, 0))
        loss_out.meta.update(val=_val(m.loss), **{REPLACES: m.loss})
        m.loss.replace_all_uses_with(loss_out)
        if m.output_logits is not None:
            with graph.inserting_after(loss_out):
                logits_out = graph.call_function(operator.getitem, (call, 1))
            logits_out.meta[REPLACES] = m.output_logits
            for user in [u for u in m.output_logits.users if u.op == "output"]:
                user.replace_input_with(m.output_logits, logits_out)
        for node in m.skipped:
            node.meta[CHUNKED] = node.target
            node.target = _chunked_away
        notes.append(note)
    return notes


def restore(gm: fx.GraphModule) -> bool:
    """Undo :func:`apply`: the original ops run again and the chunked-loss nodes leave the graph."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if REPLACES in node.meta:
            node.replace_all_uses_with(node.meta[REPLACES])
            graph.erase_node(node)
            changed = True
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith(MODULES_ATTR + "."):
            graph.erase_node(node)
            owner = getattr(gm, MODULES_ATTR, None)
            if owner is not None:
                del owner[node.target.split(".", 1)[1]]
    for node in graph.nodes:
        if CHUNKED in node.meta:
            node.target = node.meta.pop(CHUNKED)
            changed = True
    return changed


class ChunkedLossPass(GraphPass):
    """The chunked LM-head loss on training graphs (see the module's docstring); ``notes`` keeps what it did."""

    name = "chunked-loss"
    modes = frozenset({True})

    def __init__(self, options: ChunkedLossOptions) -> None:
        self.options = options
        self.notes: list[str] = []

    def undo(self, gm: fx.GraphModule) -> None:
        """Give the head's ops back (the pass manager calls it before a pass that must see them)."""
        restore(gm)

    def run(self, gm: fx.GraphModule) -> bool:
        restore(gm)  # idempotent: a graph it ran on before is matched afresh
        notes = apply(gm, self.options)
        for note in notes:
            log.debug("%s: %s", type(gm).__name__, note)
        self.notes.extend(notes)
        return any(note.startswith("chunked") for note in notes)


def configure(am: Any, enabled: bool, chunk_size: int, logits: bool) -> list[str]:
    """What ``AdaptedModel.chunked_loss`` does: put the pass in (or take it out of) the model's pass order
    and apply it to (or undo it on) every graph captured so far; returns the notes of this call."""

    manager = am._passes
    present = next((p for p in manager.after if isinstance(p, ChunkedLossPass)), None)
    if not isinstance(enabled, bool):
        raise ConfigError(f"enabled must be True or False, got {enabled!r}")
    if not enabled:
        if present is None:
            return []
        manager.after.remove(present)
        for graph in am.all_graphs():
            graph.transform_graphs(functools.partial(manager.run_one, graph_pass=restore), remember=False)
        return ["chunked loss off: every graph computes its logits and loss whole again"]
    options = ChunkedLossOptions(chunk_size, logits)
    options.validate()
    if present is None:
        present = ChunkedLossPass(options)
        # Before absorb: the head's linear op must still be visible.
        at = manager.after.index(ABSORB) if ABSORB in manager.after else len(manager.after)
        manager.after.insert(at, present)
    else:
        present.options.chunk_size, present.options.logits = chunk_size, logits
    start = len(present.notes)
    for graph in am.all_graphs():
        graph.transform_graphs(functools.partial(manager.run_one, graph_pass=present), remember=False)
    return present.notes[start:]
