"""Bottleneck adapters (AdapterHub's Houlsby and Pfeiffer) at a transformer block's residual additions.

A residual addition is found by its pattern, whatever the model: an ``add`` whose one operand (the
branch) is a linear projection's output, reached through dropout, reshapes and casts only, and whose
other operand (the residual) is an input the projection's computation reads. The branch is the
attention sublayer's when an attention op (scaled dot-product attention, or a softmax) lies between
the residual and the projection, the feed-forward sublayer's otherwise. The adapter acts on the
branch before the addition: ``residual + (h + up(act(down(h))))`` with ``h`` the branch; a zero up
projection gives the base model exactly.

Houlsby places one adapter after each sublayer, Pfeiffer after the feed-forward only. A residual is
named by its projection's site (``transformer.h.0.attn.c_proj``), so every captured graph of the
model finds the same names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import speedups
from .manager import ADAPTERS_ATTR
from .sites import Site, match_ops, site_key

aten = torch.ops.aten

_ADDS = {aten.add.Tensor, torch.add, operator.add, operator.iadd}
# Between the projection and the addition: what keeps the values (dropout in training, layout, casts).
_KEEP = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.alias.default,
    aten.dropout.default,
    aten.native_dropout.default,
    aten.detach.default,
    operator.getitem,
    F.dropout,
    torch.reshape,
    speedups.dropout,
}
_KEEP_METHODS = {"view", "reshape", "contiguous", "clone", "to", "float", "type_as"}
_ATTENTION = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._safe_softmax.default,
    aten._softmax.default,
    aten.softmax.int,
    F.scaled_dot_product_attention,
    F.softmax,
    torch.softmax,
}
KINDS = ("attention", "feedforward")
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class Residual:
    """One residual addition: the projection ``name`` whose output (``branch``) it adds to the stream."""

    name: str
    kind: str  # "attention" | "feedforward"
    add: fx.Node
    branch: fx.Node
    hidden: int


def _source(node: object) -> fx.Node | None:
    """The op a value comes from, looking through the ops in ``_KEEP`` and other adapters' nodes."""
    while isinstance(node, fx.Node):
        if node.op == "call_module" and str(node.target).startswith(ADAPTERS_ATTR + "."):
            node = node.args[1]  # an adapter's (x, base output, ...): the op it adapts
        elif node.op == "call_function" and node.target in _KEEP:
            node = node.args[0]
        elif node.op == "call_method" and node.target in _KEEP_METHODS:
            node = node.args[0]
        else:
            return node
    return None


def _region(start: fx.Node, stop: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node] | None:
    """The ancestors of ``start`` computed after ``stop``, when ``stop`` is among its ancestors (else None)."""
    seen: set[fx.Node] = set()
    frontier, found = [start], False
    while frontier:
        node = frontier.pop()
        for arg in node.all_input_nodes:
            if arg is stop:
                found = True
            elif arg not in seen and order[arg] > order[stop]:
                seen.add(arg)
                frontier.append(arg)
    return seen if found else None


def _hidden(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() >= 1 else None


def find_residuals(gm: fx.GraphModule, model: nn.Module) -> list[Residual]:
    """Every residual addition of a linear projection's output in ``gm``, in graph order."""
    projections = {m.node: m for m in match_ops(gm, model) if m.site.kind == "linear"}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found: list[Residual] = []
    for node in gm.graph.nodes:
        if (
            node.op not in ("call_function", "call_method")
            or node.target not in _ADDS
            and node.target != "add"
        ):
            continue
        if len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            continue
        for branch, residual in (node.args[:2], node.args[1::-1]):
            match = projections.get(_source(branch))
            if match is None or not isinstance(match.x, fx.Node):
                continue
            region = _region(match.node, residual, order)
            hidden = _hidden(branch)
            if region is None or hidden is None or _hidden(residual) != hidden:
                continue
            attention = any(n.op == "call_function" and n.target in _ATTENTION for n in region)
            found.append(Residual(match.site.name, KINDS[0] if attention else KINDS[1], node, branch, hidden))
            break
    return found


def residual_site(residual: Residual, projection: Site | None) -> Site:
    """A Site for ``am.sites`` and ``adaptc inspect``: the projection's name, the stream's width."""
    return Site(
        name=residual.name,
        kind="residual",
        op=f"add ({residual.kind})",
        weight=projection.weight if projection else residual.name,
        weight_shape=(residual.hidden,),
        in_features=residual.hidden,
        out_features=residual.hidden,
        layer=projection.layer if projection else None,
    )


class BottleneckLayer(nn.Module):
    """``h + up(act(down(h)))`` on a residual branch ``h``; the up projection starts at zero."""

    def __init__(self, hidden: int, size: int, non_linearity: str, where: str) -> None:
        super().__init__()
        self.kind, self.active, self.where = "residual", True, where
        self.down = nn.Linear(hidden, size)
        self.act = NON_LINEARITIES[non_linearity]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return output
        return output + self.up(self.act(self.down(output)))


def insert(gm: fx.GraphModule, model: nn.Module, layers: dict[str, BottleneckLayer], prefix: str) -> int:
    """An adapter node on the branch of every residual addition in ``layers`` (by projection name)."""
    count = 0
    for residual in find_residuals(gm, model):
        layer = layers.get(residual.name)
        if layer is None or layer.where != residual.kind:
            continue
        with gm.graph.inserting_before(residual.add):
            adapted = gm.graph.call_module(
                f"{prefix}.{site_key(residual.name)}", (residual.branch, residual.branch)
            )
        adapted.meta = {
            k: v for k, v in residual.branch.meta.items() if k in ("nn_module_stack", "stack_trace", "val")
        }
        residual.add.replace_input_with(residual.branch, adapted)
        count += 1
    return count
