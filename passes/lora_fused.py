"""Sibling fusion: the LoRA branches of linear sites that read the same input, computed as one.

Module wrapping (PEFT) sees one layer at a time: q, k and v each draw their own dropout
mask over the full input, run their own skinny ``x @ A.T`` and keep their own dropped copy
of ``x`` for the backward. The graph shows that they read the same node, so this pass
replaces their LoRA nodes with one :class:`LoraSiblings` node that

* draws one dropout mask (a bool tensor, a quarter of a float copy; passes/dropout_mask.py) for the group,
* runs one ``x @ cat(A).T`` and, in the backward, one ``dh @ cat(A)`` and one ``dh.T @ x``,
* applies the scale to the rank-r hidden instead of the full-width output,
* adds ``h @ B.T`` into the base output in place, inside the GEMM (``addmm_``),
* keeps one dropped ``x`` and the mask for the backward instead of a dropped copy per site.

:func:`absorb_bases` (run by AdaptedModel after every pass) goes one step further: a frozen
``aten.linear`` / Conv1D ``aten.addmm`` read only by its group becomes a no-op node and the group
runs the GEMM itself (:class:`_AbsorbedSiblings`), so the backward sums ``dx`` of all siblings
and of the low-rank branch into one buffer, and the frozen ops leave the autograd graph.
Passes that look for the frozen ops run between :func:`restore_bases` and absorb_bases.

A single linear site gets the same treatment (a group of one). The math is LoRA's; the
one visible difference is the dropout pattern: siblings share one mask (each site still
sees dropout with probability ``p``). Under ``torch.export`` (ONNX) the group calls each
site's own :class:`LoraLayer`, so exported graphs are the plain ones. ``torch.compile`` traces
the autograd Functions themselves: handing inductor the plain per-site ops instead was measured
slower than eager adaptc (bench/bench_torch_compile.py, Llama: 270 ms against 202 eager; with the
Functions kept, 188 against 218).
"""

from __future__ import annotations

import heapq
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .dropout_mask import add_masked_, effective_keep, keep_mask, masked
from .lora import LoraLayer

SIBLINGS_ATTR = "_adaptc_lora_siblings"
ABSORBED = "adaptc_absorbed_op"  # node.meta key: the target of a base op a group computes itself
aten = torch.ops.aten


class _SiblingLora(torch.autograd.Function):
    """``out_i = base_i + s_i * (mask * x) A_i^T B_i^T`` for every sibling, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x2d, keep, a_cat, ranks, scales, count, in_place, *tensors):
        bs, bases = tensors[:count], tensors[count:]
        dropped = x2d if keep is None else masked(x2d, keep)
        hidden = dropped @ a_cat.t()
        hs = [h * s for h, s in zip(torch.split(hidden, ranks, dim=1), scales)]
        outs = []
        for h, b, base, write in zip(hs, bs, bases, in_place):
            flat = base.view(-1, base.shape[-1]) if write else base.reshape(-1, base.shape[-1])
            if write and flat.dtype == b.dtype:
                flat.addmm_(h, b.t())
            elif write:
                flat.add_((h @ b.t()).to(flat.dtype))
            elif flat.dtype == b.dtype:
                flat = torch.addmm(flat, h, b.t())
            else:
                flat = flat + (h @ b.t()).to(flat.dtype)
            outs.append(base if write else flat.view(base.shape))
        ctx.mark_dirty(*[base for base, write in zip(bases, in_place) if write])
        # The dropped input, not x2d: the backward needs only it (and the mask) and need not redo it.
        # Only for A's gradient: with A frozen (LoRA-FA) nothing of the input is kept.
        ctx.save_for_backward(dropped if ctx.needs_input_grad[2] else None, keep, a_cat, *bs, *hs)
        ctx.scales, ctx.count = scales, count
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        dropped, keep, a_cat, *rest = ctx.saved_tensors
        count, scales = ctx.count, ctx.scales
        bs, hs = rest[:count], rest[count:]
        needs = ctx.needs_input_grad
        b_grads, h_grads = [], []
        for g, b, h, s in zip(grads, bs, hs, scales):
            g2d = g.reshape(-1, g.shape[-1]).to(b.dtype)
            b_grads.append(g2d.t() @ h)
            h_grads.append((g2d @ b) * s)
        dh = torch.cat(h_grads, dim=1) if count > 1 else h_grads[0]
        da = dx = None
        if needs[2]:
            da = dh.t() @ dropped
        if needs[0]:
            dx = dh @ a_cat
            if keep is not None:
                dx = masked(dx, keep)
        base_grads = [g if needs[7 + count + i] else None for i, g in enumerate(grads)]
        b_grads = [g if needs[7 + i] else None for i, g in enumerate(b_grads)]
        return (dx, None, da, None, None, None, None, *b_grads, *base_grads)


class _AbsorbedSiblings(torch.autograd.Function):
    """The group with its frozen base ops inside: ``out_i = x W_i^T + b_i + s_i (mask * x) A_i^T B_i^T``.

    Holding the base GEMMs lets the backward accumulate every contribution to ``dx`` into one
    buffer (``addmm_``): the siblings' ``g_i W_i`` and the low-rank ``dh A``, where autograd would
    allocate each and add them up; and the base ops leave the autograd graph.
    """

    @staticmethod
    def forward(ctx, x2d, keep, a_cat, ranks, scales, count, *tensors):
        weights, biases, bs = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        dropped = x2d if keep is None else masked(x2d, keep)
        hidden = dropped @ a_cat.t()
        hs = [h * s for h, s in zip(torch.split(hidden, ranks, dim=1), scales)]
        outs = []
        for weight, bias, b, h in zip(weights, biases, bs, hs):
            out = x2d @ weight.t() if bias is None else torch.addmm(bias, x2d, weight.t())
            outs.append(out.addmm_(h, b.t()))
        ctx.save_for_backward(dropped if ctx.needs_input_grad[2] else None, keep, a_cat, *weights, *bs, *hs)  # as above
        ctx.count = count
        ctx.scales = scales
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        dropped, keep, a_cat, *rest = ctx.saved_tensors
        count, scales = ctx.count, ctx.scales
        weights, bs, hs = rest[:count], rest[count : 2 * count], rest[2 * count :]
        needs = ctx.needs_input_grad
        dx, b_grads, h_grads = None, [], []
        for i, (g, weight, b, h, s) in enumerate(zip(grads, weights, bs, hs, scales)):
            g2d = g.reshape(-1, g.shape[-1])
            b_grads.append(g2d.t() @ h if needs[6 + 2 * count + i] else None)
            h_grads.append((g2d @ b) * s)
            if needs[0]:
                dx = g2d @ weight if dx is None else dx.addmm_(g2d, weight)
        dh = torch.cat(h_grads, dim=1) if count > 1 else h_grads[0]
        da = None
        if needs[2]:
            da = dh.t() @ dropped
        if needs[0]:
            if keep is None:
                dx.addmm_(dh, a_cat)
            else:
                add_masked_(dx, dh @ a_cat, keep)
        return (dx, None, da, None, None, None, *([None] * (2 * count)), *b_grads)


class LoraSiblings(nn.Module):
    """One graph node for the LoRA branches of ``layers``, which all read the same input.

    The layers stay where they are (the adapter's ModuleDict owns their parameters); this
    module only references them, so state dicts and checkpoints do not change.
    """

    def __init__(self, layers: list[LoraLayer]) -> None:
        super().__init__()
        self._layers = list(layers)  # a plain list: not registered, the parameters have one owner

    @property
    def layers(self) -> list[LoraLayer]:
        return self._layers

    def extra_repr(self) -> str:
        return f"sites={len(self._layers)}"

    def forward(self, x: torch.Tensor, *operands: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        # operands: each site's base output (None where absorb_bases took its op in), weight, bias.
        layers = self._layers
        count = len(layers)
        bases, weights, biases = operands[:count], operands[count : 2 * count], operands[2 * count :]
        if torch.compiler.is_exporting():  # exported (ONNX): the plain per-site graph
            bases = self._bases(x, bases, weights, biases)
            return tuple(layer(x, base, None) for layer, base in zip(layers, bases))
        first = layers[0]
        if not first.active:
            return self._bases(x, bases, weights, biases)
        if first._rows is not None:  # a mixed batch (adapter_names): each site's layer takes its rows
            bases = self._bases(x, bases, weights, biases)
            return tuple(layer(x, *ops) for layer, *ops in zip(layers, bases, weights, biases))
        if not torch.is_grad_enabled() and not first.training and x.dtype == first.lora_A.dtype:
            return self._inference(x, bases, weights, biases)
        dtype = first.lora_A.dtype
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        p = first.dropout.p if isinstance(first.dropout, nn.Dropout) and first.training else 0.0
        a_cat = torch.cat([layer.lora_A for layer in layers]) if count > 1 else first.lora_A
        ranks = [layer.lora_A.shape[0] for layer in layers]
        bs = [layer.lora_B for layer in layers]
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        keep, inverse_keep = None, 1.0
        if p > 0:
            keep = keep_mask(x2d.shape, p, x2d.device)
            inverse_keep = 1.0 / effective_keep(p)
        scales = [layer.scaling * inverse_keep for layer in layers]
        if not autocast and self._can_absorb(x, bases, weights, biases):
            oriented = [layer._oriented(weight) for weight, layer in zip(weights, layers)]
            outs = _AbsorbedSiblings.apply(x2d, keep, a_cat, ranks, scales, count, *oriented, *biases, *bs)
            return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)
        bases = self._bases(x, bases, weights, biases)
        if autocast:
            # Compute in autocast's dtype, as the plain layers would; the casts stay outside the Function
            # (autograd casts the gradients back), and autocast is off inside it: its backward runs
            # without autocast, so forward and backward must agree on dtypes by themselves.
            compute = torch.get_autocast_dtype(device)
            x2d, a_cat, bs = x2d.to(compute), a_cat.to(compute), [b.to(compute) for b in bs]
        owners = [_writable_owner(base) for base in bases]
        inputs = [base if owner is None else owner for base, owner in zip(bases, owners)]
        in_place = [owner is not None for owner in owners]
        with torch.autocast(device, enabled=False):
            outs = _SiblingLora.apply(x2d, keep, a_cat, ranks, scales, count, in_place, *bs, *inputs)
        return tuple(out if out.shape == base.shape else out.view(base.shape) for out, base in zip(outs, bases))

    def _inference(self, x, bases, weights, biases) -> tuple[torch.Tensor, ...]:
        """No gradients, no dropout (generation, evaluation): plain ops, no autograd Function or saved
        tensors. One ``x A_cat^T`` for the group, then per site the base op (where absorbed) and
        ``+ s * h_i B_i^T``: four ops a site, as few as the step allows (it runs at every token)."""
        layers = self._layers
        a_cat = torch.cat([layer.lora_A for layer in layers]) if len(layers) > 1 else layers[0].lora_A
        hidden = F.linear(x, a_cat)
        outs, start = [], 0
        for layer, base, weight, bias in zip(layers, bases, weights, biases):
            rank = layer.lora_A.shape[0]
            delta = F.linear(hidden if len(layers) == 1 else hidden[..., start:start + rank], layer.lora_B)
            start += rank
            if base is None:  # absorbed: computed here, so updated in place
                outs.append(F.linear(x, layer._oriented(weight), bias).add_(delta, alpha=layer.scaling))
            else:
                delta = delta if delta.dtype == base.dtype else delta.to(base.dtype)
                outs.append(torch.add(base, delta, alpha=layer.scaling))
        return tuple(outs)

    def _bases(self, x, bases, weights, biases) -> tuple[torch.Tensor, ...]:
        """Each site's base output: computed here for the sites whose op was absorbed."""
        return tuple(
            base if base is not None else F.linear(x, layer._oriented(weight), bias)
            for base, weight, bias, layer in zip(bases, weights, biases, self._layers)
        )

    def _can_absorb(self, x, bases, weights, biases) -> bool:
        """Whether :class:`_AbsorbedSiblings` may run the base ops: every op absorbed, frozen,
        and one dtype for input, weights and adapters (the op would not cast either)."""
        dtype = x.dtype
        for base, weight, bias, layer in zip(bases, weights, biases, self._layers):
            if base is not None or weight.requires_grad or weight.dtype != dtype or layer.lora_A.dtype != dtype:
                return False
            if bias is not None and (bias.requires_grad or bias.dtype != dtype):
                return False
        return True


def _writable_owner(base: torch.Tensor) -> torch.Tensor | None:
    """The tensor that owns ``base``'s memory, when the LoRA output can be added into it in place.

    The base op's output (a fresh GEMM result: fuse_siblings routed every other use of it through
    this node) is read by nothing else, so adding into it saves a copy and an allocation of the full
    output per site. ``F.linear`` with a bias returns a view of its GEMM's [rows, out] result: the
    owner is that result (modifying the view itself would make autograd copy it back in the
    backward). Anything else (a slice of a larger tensor, strided memory, a leaf) keeps the
    out-of-place add.
    """
    owner = base._base if base._is_view() else base
    if owner.is_leaf and owner.requires_grad:
        return None
    if owner.numel() != base.numel() or not owner.is_contiguous() or not base.is_contiguous():
        return None
    if owner.data_ptr() != base.data_ptr():
        return None
    return owner


def _fusable(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) and module.kind == "linear" and not module.use_dora


def fuse_siblings(gm: fx.GraphModule, prefix: str) -> int:
    """Replace the linear LoRA nodes under ``prefix`` by one :class:`LoraSiblings` node per shared input.

    Returns how many group nodes were made. The graph is re-sorted (stably) afterwards, since a
    group can only run once its last sibling's base op has, which may be after the first
    sibling's users.
    """
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(prefix + "."):
            if _fusable(gm.get_submodule(node.target)):
                groups.setdefault(node.args[0], []).append(node)
    if not groups:
        return 0
    owner = _siblings_dict(gm)
    adapter = prefix.rsplit(".", 1)[-1]
    made = 0
    for members in groups.values():
        x = members[0].args[0]  # now: an earlier group may have replaced the node it was keyed by
        layers = [gm.get_submodule(m.target) for m in members]
        if len({layer.lora_A.dtype for layer in layers}) > 1 or len({_dropout_p(layer) for layer in layers}) > 1:
            continue  # one adapter's sites share these; differing ones would need separate groups
        key = f"{adapter}__{len(owner)}"
        owner[key] = LoraSiblings(layers)
        with gm.graph.inserting_after(members[-1]):
            operands = [m.args[1] for m in members] + [m.args[2] for m in members] + [m.args[3] for m in members]
            group = gm.graph.call_module(f"{SIBLINGS_ATTR}.{key}", (x, *operands))
        group.meta = {k: v for k, v in members[0].meta.items() if k in ("nn_module_stack", "stack_trace")}
        with gm.graph.inserting_after(group):
            outs = [gm.graph.call_function(operator.getitem, (group, i)) for i in range(len(members))]
        for member, out in zip(members, outs):
            member.replace_all_uses_with(out)
            gm.graph.erase_node(member)
        made += 1
    stable_topological_sort(gm.graph)
    return made


def absorb_bases(gm: fx.GraphModule) -> int:
    """Let each group compute its sites' frozen linear ops itself; returns how many it took in.

    A base op read only by its group (``aten.linear``, or Conv1D's ``aten.addmm``) keeps its node
    but runs as a no-op returning None, its original target kept in ``node.meta``; the group
    computes it inside :class:`_AbsorbedSiblings`, or with ``F.linear`` before the LoRA branch when
    it cannot (a base weight that trains, autocast, mixed dtypes). Graph passes that look for the
    frozen ops call :func:`restore_bases` first.
    """
    made = 0
    for group in list(gm.graph.nodes):
        if not (group.op == "call_module" and group.target.startswith(SIBLINGS_ATTR + ".")):
            continue
        count = len(gm.get_submodule(group.target).layers)
        x = group.args[0]
        for base in group.args[1 : 1 + count]:
            if isinstance(base, fx.Node) and _absorbable(base, x, group):
                base.meta[ABSORBED] = base.target
                base.target = _absorbed
                made += 1
    return made


def restore_bases(gm: fx.GraphModule) -> None:
    """Undo :func:`absorb_bases`: every absorbed base op runs as its own node again."""
    for node in gm.graph.nodes:
        if ABSORBED in node.meta:
            node.target = node.meta.pop(ABSORBED)


def _absorbed(*args: object) -> None:
    """Stands in for a base op its group computes (see absorb_bases)."""
    return None


def _absorbable(base: fx.Node, x: fx.Node, group: fx.Node) -> bool:
    if base.op != "call_function" or list(base.users) != [group] or base.kwargs:
        return False
    if base.target is aten.linear.default:
        return base.args[0] is x
    return base.target is aten.addmm.default and base.args[1] is x  # addmm(bias, x, W): Conv1D


def _dropout_p(layer: LoraLayer) -> float:
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def _siblings_dict(gm: fx.GraphModule) -> nn.ModuleDict:
    owner = getattr(gm, SIBLINGS_ATTR, None)
    if owner is None:
        owner = nn.ModuleDict()
        gm.add_module(SIBLINGS_ATTR, owner)
    return owner


def unfuse(gm: fx.GraphModule, adapter: str) -> None:
    """Remove adapter ``adapter``'s group nodes: each output becomes its base output again."""
    restore_bases(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(f"{SIBLINGS_ATTR}.{adapter}__"):
            for user in list(node.users):
                user.replace_all_uses_with(node.args[1 + user.args[1]])
                gm.graph.erase_node(user)
            gm.graph.erase_node(node)
            owner = getattr(gm, SIBLINGS_ATTR)
            del owner[node.target.split(".", 1)[1]]


def stable_topological_sort(graph: fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, moving as few nodes as the order allows."""
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    waiting = {node: len(set(node.all_input_nodes)) for node in nodes}
    ready = [index[n] for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, index[user])
    if len(order) != len(nodes):
        raise RuntimeError("adaptc: the LoRA graph has a cycle after sibling fusion (a bug: please report it)")
    if order == nodes:
        return
    cursor = order[0]
    if nodes[0] is not cursor:
        nodes[0].prepend(cursor)
    for node in order[1:]:
        cursor.append(node)
        cursor = node
