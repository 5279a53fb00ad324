"""Unfused attention, ``matmul(q, k^T) -> [scale] -> [+ mask] -> softmax -> [dropout] -> matmul(., v)``,
rewritten as one ``scaled_dot_product_attention`` op.

Models that spell attention out (transformers' ``attn_implementation="eager"``, older code,
a user's own) then look like every other model to the attention passes, so prefix tuning
needs one edit, at one op. The rewrite keeps the computation: the scale is passed on (a
scale that is a tensor is applied to the queries instead), the additive mask becomes the
op's float mask, dropout keeps its probability in training mode.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from . import speedups

aten = torch.ops.aten
_MATMUL = {aten.matmul.default, torch.matmul, operator.matmul}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, F.softmax, torch.softmax}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_DROPOUT = {aten.dropout.default, F.dropout, speedups.dropout}
_TRANSPOSE = {aten.transpose.int}
_ASSERT = {aten._assert_tensor_metadata.default}


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not (u.op == "call_function" and u.target in _ASSERT)]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 else None


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _untransposed_key(kt: Any) -> fx.Node | None:
    """``k`` for ``k.transpose(-1, -2)`` (any spelling of the last two axes of a 4-d tensor)."""
    if not (isinstance(kt, fx.Node) and kt.op == "call_function" and kt.target in _TRANSPOSE):
        return None
    dims = {d % 4 for d in kt.args[1:3]}
    return kt.args[0] if dims == {2, 3} and _rank(kt.args[0]) == 4 else None


def _softmax_dim(node: fx.Node) -> int | None:
    if node.target in (aten.softmax.int, aten._softmax.default):
        return node.args[1]
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def _match(first: fx.Node) -> dict[str, Any] | None:
    """The pattern starting at ``first`` (the q @ k^T matmul), or None."""
    q, kt = first.args[:2]
    if _rank(q) != 4 or _rank(kt) != 4:
        return None
    # k^T spelled as a transpose gives k back; any other spelling (LeViT permutes k straight to
    # [B, H, D, T]) is transposed back at the rewrite.
    k = _untransposed_key(kt)
    found: dict[str, Any] = {"q": q, "k": k, "kt": kt, "scale": 1.0, "q_divisor": None, "mask": None, "dropout": 0.0,
                             "removed": [first]}
    node = _only_user(first)
    if node is not None and node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor) \
            and node.args[0] is first:
        factor = node.args[1]
        if isinstance(factor, (int, float)):
            found["scale"] = factor if node.target is aten.mul.Tensor else 1.0 / factor
        elif isinstance(factor, fx.Node) and _rank(factor) == 0 and node.target is aten.div.Tensor:
            found["q_divisor"] = factor
        else:
            return None
        found["removed"].append(node)
        node = _only_user(node)
    if node is not None and node.op == "call_function" and node.target is aten.add.Tensor \
            and node.args[0] is found["removed"][-1] and isinstance(node.args[1], fx.Node):
        found["mask"] = node.args[1]
        found["removed"].append(node)
        node = _only_user(node)
    if node is None or node.op != "call_function" or node.target not in _SOFTMAX or _softmax_dim(node) not in (-1, 3):
        return None
    found["removed"].append(node)
    node = _only_user(node)
    while node is not None and node.op == "call_function" and node.target in _CASTS:
        found["removed"].append(node)
        node = _only_user(node)
    if node is not None and node.op == "call_function" and node.target in _DROPOUT:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.0)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
        if not isinstance(p, (int, float)) or not isinstance(train, bool):
            return None
        found["dropout"] = float(p) if train else 0.0
        found["removed"].append(node)
        node = _only_user(node)
    if node is None or node.op != "call_function" or node.target not in _MATMUL or node.args[0] is not found["removed"][-1]:
        return None
    if _rank(node.args[1]) != 4:
        return None
    found["v"] = node.args[1]
    found["out"] = node
    return found


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite every unfused attention in ``gm`` as ``aten.scaled_dot_product_attention``; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMUL or node.graph is None:
            continue
        found = _match(node)
        if found is None:
            continue
        graph = gm.graph
        out = found["out"]
        with graph.inserting_before(out):
            q = found["q"]
            if found["k"] is None:
                found["k"] = graph.call_function(aten.transpose.int, (found["kt"], -2, -1))
                kt_val = found["kt"].meta.get("val")
                if isinstance(kt_val, torch.Tensor):
                    found["k"].meta["val"] = kt_val.transpose(-2, -1)
            if found["q_divisor"] is not None:
                q = graph.call_function(aten.div.Tensor, (q, found["q_divisor"]))
            sdpa = graph.call_function(
                aten.scaled_dot_product_attention.default,
                (q, found["k"], found["v"], found["mask"], found["dropout"], False),
                {"scale": float(found["scale"])},
            )
        sdpa.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "val", "stack_trace")})
        out.replace_all_uses_with(sdpa)
        for dead in [out, *reversed(found["removed"])]:
            for user in list(dead.users):
                if user.op == "call_function" and user.target in _ASSERT:
                    graph.erase_node(user)
            graph.erase_node(dead)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
