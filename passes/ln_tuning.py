"""LN tuning: the affine parameters of the model's norms, trained as copies.

A norm is found by its op, not its class: ``aten.layer_norm`` / ``native_layer_norm`` / ``rms_norm``
/ ``group_norm`` (and their torch functions) reading parameters, and an RMSNorm written out
(``weight * (x * rsqrt(mean(x**2) + eps))``, transformers' Llama / T5 / Mistral ...; Gemma's
``(1 + weight)`` too). It is named by the module that owns its weight.

The pass routes every read of a chosen norm's weight (and bias) through its layer, called as
``layer(param, param, part=...)``: the trained copy when the adapter is active, the base parameter
otherwise (removing the node, whose second argument is the base value, restores the model).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .manager import ADAPTERS_ATTR
from .sites import Site, layer_index, site_key

aten = torch.ops.aten

# op -> (position of the weight, position of the bias or None)
_NORM_OPS: dict[Any, tuple[int, int | None]] = {
    aten.layer_norm.default: (2, 3),
    aten.native_layer_norm.default: (2, 3),
    aten.rms_norm.default: (2, None),
    aten.group_norm.default: (2, 3),
    aten.native_group_norm.default: (1, 2),
    F.layer_norm: (2, 3),
    torch.layer_norm: (2, 3),
    F.group_norm: (2, 3),
}
if hasattr(F, "rms_norm"):
    _NORM_OPS[F.rms_norm] = (2, None)
_KWARGS = {0: "input", 1: "normalized_shape", 2: "weight", 3: "bias"}
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.clone.default, aten.alias.default}
_MULS = {aten.mul.Tensor, torch.mul, operator.mul}
_ADDS = {aten.add.Tensor, torch.add, operator.add}


@dataclass
class Norm:
    """One norm: its weight and bias parameters (dotted names) and the op that applies them."""

    name: str
    weight: str
    bias: str | None
    op: str
    shape: tuple[int, ...]


def _param(node: Any, params: dict[str, nn.Parameter]) -> str | None:
    """The parameter a value reads, through casts and adapter nodes (another LN-tuning adapter)."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node.target if node.target in params else None
        if node.op == "call_module" and str(node.target).startswith(ADAPTERS_ATTR + "."):
            node = node.args[1]
        elif node.op == "call_function" and node.target in _CASTS:
            node = node.args[0]
        else:
            return None
    return None


def _through_casts(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def _is_rms_normed(node: Any) -> bool:
    """``x * rsqrt(...)`` (through casts): the normalised value an RMSNorm scales."""
    node = _through_casts(node)
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MULS):
        return False
    return any(
        isinstance(a, fx.Node) and a.op == "call_function" and a.target in (aten.rsqrt.default, torch.rsqrt)
        for a in node.args
    )


def _rms_weight(node: fx.Node, params: dict[str, nn.Parameter]) -> str | None:
    """The weight of a written-out RMSNorm whose output is ``node`` (``w * normed`` or ``normed * (1 + w)``)."""
    if node.op != "call_function" or node.target not in _MULS or len(node.args) != 2:
        return None
    for scale, normed in (node.args, node.args[::-1]):
        if not _is_rms_normed(normed):
            continue
        scale = _through_casts(scale)
        if isinstance(scale, fx.Node) and scale.op == "call_function" and scale.target in _ADDS:
            tensors = [a for a in scale.args if isinstance(a, fx.Node)]
            scale = tensors[0] if len(tensors) == 1 else None  # Gemma: 1 + weight
        name = _param(scale, params)
        if name is not None and params[name].dim() == 1:
            return name
    return None


def find_norms(gm: fx.GraphModule, model: nn.Module) -> list[Norm]:
    """Every norm with a learned weight in ``gm``, in graph order, named by the module owning the weight."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found: dict[str, Norm] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        weight = bias = None
        op = getattr(node.target, "__name__", str(node.target))
        if node.target in _NORM_OPS:
            w_at, b_at = _NORM_OPS[node.target]
            weight = _param(_arg(node, w_at), params)
            bias = _param(_arg(node, b_at), params) if b_at is not None else None
        else:
            weight = _rms_weight(node, params)
            op = "rms_norm (written out)"
        if weight is None:
            continue
        owner, _, attr = weight.rpartition(".")
        name = owner if attr == "weight" and owner else weight
        if name not in found:
            found[name] = Norm(name, weight, bias, op, tuple(params[weight].shape))
    return list(found.values())


def _arg(node: fx.Node, index: int) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(_KWARGS.get(index, ""))


def norm_site(norm: Norm, model: nn.Module) -> Site:
    size = int(torch.Size(norm.shape).numel())
    site = Site(
        name=norm.name,
        kind="norm",
        op=norm.op,
        weight=norm.weight,
        weight_shape=norm.shape,
        in_features=size,
        out_features=size,
        layer=layer_index(norm.name),
    )
    site.params_added = size * (2 if norm.bias else 1)
    return site


class LNTuningLayer(nn.Module):
    """Trainable copies of one norm's weight (and bias); the base parameters stay frozen."""

    def __init__(self, model: nn.Module, norm: Norm) -> None:
        super().__init__()
        self.kind, self.active = "norm", True
        self.weight_name, self.bias_name = (
            norm.weight,
            norm.bias,
        )  # bias_name: merge writes it (targets/merge.py)
        self.weight = nn.Parameter(model.get_parameter(norm.weight).detach().clone())
        self.bias = nn.Parameter(model.get_parameter(norm.bias).detach().clone()) if norm.bias else None

    def forward(self, x: torch.Tensor, output: torch.Tensor, part: str = "weight") -> torch.Tensor:
        if not self.active:
            return output
        return (self.weight if part == "weight" else self.bias).to(output.dtype)

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return self.weight.detach().to(current.dtype)

    def merge_bias_into(self, bias: torch.Tensor) -> torch.Tensor:
        return self.bias.detach().to(bias.dtype)


def insert(gm: fx.GraphModule, layers: dict[str, LNTuningLayer], prefix: str) -> int:
    """Route every read of the chosen norms' parameters through their layers; returns the reads routed."""
    parts: dict[str, tuple[str, str]] = {}
    for name, layer in layers.items():
        parts[layer.weight_name] = (name, "weight")
        if layer.bias_name:
            parts[layer.bias_name] = (name, "bias")
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in parts or not node.users:
            continue
        name, part = parts[node.target]
        with gm.graph.inserting_after(node):
            routed = gm.graph.call_module(f"{prefix}.{site_key(name)}", (node, node), {"part": part})
        routed.meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
        node.replace_all_uses_with(routed, delete_user_cb=lambda user, routed=routed: user is not routed)
        count += 1
    return count
