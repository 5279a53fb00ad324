"""Sibling fusion: the LoRA branches of linear sites that read the same input, computed as one.

Module wrapping (PEFT) sees one layer at a time: q, k and v each draw their own dropout
mask over the full input, run their own skinny ``x @ A.T`` and keep their own dropped copy
of ``x`` for the backward. The graph shows that they read the same node, so this pass
replaces their LoRA nodes with one :class:`LoraSiblings` node that

* draws one dropout mask (a bool tensor, a quarter of a float copy) for the group,
* runs one ``x @ cat(A).T`` and, in the backward, one ``dh @ cat(A)`` and one ``dh.T @ x``,
* applies the scale to the rank-r hidden instead of the full-width output,
* adds ``h @ B.T`` to the base output inside the GEMM (``addmm``),
* keeps ``x`` and the mask for the backward instead of a dropped copy per site.

A single linear site gets the same treatment (a group of one). The math is LoRA's; the
one visible difference is the dropout pattern: siblings share one mask (each site still
sees dropout with probability ``p``). Under ``torch.compile`` / ``torch.export`` (ONNX) the
group calls each site's own :class:`LoraLayer`, so traced graphs are the plain ones.
"""

from __future__ import annotations

import heapq
import operator

import torch
from torch import fx, nn

from .lora import LoraLayer

SIBLINGS_ATTR = "_adaptc_lora_siblings"


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask keeping each element with probability ``1 - p`` (p resolved to 1/65536).

    Four 16-bit lanes from each 64-bit random draw: about 3x faster than ``bernoulli_`` on CPU.
    """
    count = max(1, shape.numel())
    words = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:count]
    return (lanes >= round(p * 65536) - 32768).view(shape)


def effective_keep(p: float) -> float:
    """The keep probability :func:`keep_mask` actually applies."""
    return 1.0 - round(p * 65536) / 65536


class _SiblingLora(torch.autograd.Function):
    """``out_i = base_i + s_i * (mask * x) A_i^T B_i^T`` for every sibling, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x2d, keep, a_cat, ranks, scales, count, *tensors):
        bs, bases = tensors[:count], tensors[count:]
        dropped = x2d if keep is None else torch.where(keep, x2d, 0)
        hidden = dropped @ a_cat.t()
        hs = [h * s for h, s in zip(torch.split(hidden, ranks, dim=1), scales)]
        outs = []
        for h, b, base in zip(hs, bs, bases):
            flat = base.reshape(-1, base.shape[-1])
            out = torch.addmm(flat, h, b.t()) if flat.dtype == b.dtype else flat + (h @ b.t()).to(flat.dtype)
            outs.append(out.view(base.shape))
        ctx.save_for_backward(x2d, keep, a_cat, *bs, *hs)
        ctx.scales, ctx.count = scales, count
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2d, keep, a_cat, *rest = ctx.saved_tensors
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
            dropped = x2d if keep is None else torch.where(keep, x2d, 0)
            da = dh.t() @ dropped
        if needs[0]:
            dx = dh @ a_cat
            if keep is not None:
                dx = torch.where(keep, dx, 0)
        base_grads = [g if needs[6 + count + i] else None for i, g in enumerate(grads)]
        b_grads = [g if needs[6 + i] else None for i, g in enumerate(b_grads)]
        return (dx, None, da, None, None, None, *b_grads, *base_grads)


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

    def forward(self, x: torch.Tensor, *bases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self._layers
        if torch.compiler.is_compiling():  # traced: the plain per-site graph, for the compiler to fuse
            return tuple(layer(x, base, None) for layer, base in zip(layers, bases))
        if not layers[0].active:
            return bases
        first = layers[0]
        dtype = first.lora_A.dtype
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        p = first.dropout.p if isinstance(first.dropout, nn.Dropout) and first.training else 0.0
        keep, inverse_keep = None, 1.0
        if p > 0:
            keep = keep_mask(x2d.shape, p, x2d.device)
            inverse_keep = 1.0 / effective_keep(p)
        a_cat = torch.cat([layer.lora_A for layer in layers]) if len(layers) > 1 else first.lora_A
        ranks = [layer.lora_A.shape[0] for layer in layers]
        scales = [layer.scaling * inverse_keep for layer in layers]
        bs = [layer.lora_B for layer in layers]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Compute in autocast's dtype, as the plain layers would; the casts stay outside the Function
            # (autograd casts the gradients back), and autocast is off inside it: its backward runs
            # without autocast, so forward and backward must agree on dtypes by themselves.
            compute = torch.get_autocast_dtype(device)
            x2d, a_cat, bs = x2d.to(compute), a_cat.to(compute), [b.to(compute) for b in bs]
        with torch.autocast(device, enabled=False):
            return _SiblingLora.apply(x2d, keep, a_cat, ranks, scales, len(layers), *bs, *bases)


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
            group = gm.graph.call_module(f"{SIBLINGS_ATTR}.{key}", (x, *[m.args[1] for m in members]))
        group.meta = {k: v for k, v in members[0].meta.items() if k in ("nn_module_stack", "stack_trace")}
        with gm.graph.inserting_after(group):
            outs = [gm.graph.call_function(operator.getitem, (group, i)) for i in range(len(members))]
        for member, out in zip(members, outs):
            member.replace_all_uses_with(out)
            gm.graph.erase_node(member)
        made += 1
    stable_topological_sort(gm.graph)
    return made


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
