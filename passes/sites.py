"""Site matchers: find every adaptable op in a captured graph.

A site is named by the module that owns the weight (the parameter's dotted name without
``.weight``), so an op that applies a submodule's weight functionally is found under
that submodule's name, and every use of one weight is one site. The matchers read op
targets, argument positions and the module path recorded on the node; they never read
a model's class name.

Both graph dialects are understood: ATen ops from ``torch.export`` and torch-level
functions / ``call_module`` leaves from ``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import experts as expert_weights
from .quantize import QUANT_LINEAR_OPS

aten = torch.ops.aten

KINDS = ("linear", "conv", "embedding", "experts")


@dataclass
class Site:
    """One adaptable weight and the ops that use it."""

    name: str  # owner module path; the PEFT-compatible name
    kind: str  # "linear" | "conv" | "embedding" | "experts" (a 3-D weight of per-expert matrices, passes/experts.py)
    op: str  # e.g. "aten.linear", "aten.addmm", "aten.conv2d"
    weight: str  # dotted parameter name as the graph reads it
    weight_shape: tuple[int, ...]
    in_features: int  # linear: input size; conv: input channels; embedding: vocabulary size
    out_features: int  # linear: output size; conv: output channels; embedding: embedding size
    fan_in_fan_out: bool = False  # weight stored [in, out] (transformers' Conv1D, x @ W; experts: [E, in, out])
    conv: dict[str, Any] | None = None  # stride, padding, dilation, groups, dims
    uses: int = 1
    is_head: bool = False
    layer: int | None = None
    params_added: int = 0  # filled by the pass that adapts it
    is_router: bool = False  # a mixture-of-experts router: its output picks experts (top-k)

    @property
    def is_pointwise_conv(self) -> bool:
        return (
            self.kind == "conv"
            and self.conv is not None
            and self.conv["groups"] == 1
            and all(k == 1 for k in self.weight_shape[2:])
        )

    @property
    def linear_like(self) -> bool:
        """Linear layers, x @ W against a parameter and 1x1 convolutions (a linear map over channels); not a
        mixture-of-experts router (PEFT's ``all-linear`` leaves it out too). Expert weights are not: LoRA's
        ``all-linear`` adds them itself (adaptc/methods/lora.py), other methods have no layer for them."""
        return (self.kind == "linear" or self.is_pointwise_conv) and not self.is_router

    @property
    def experts(self) -> int:
        """How many experts an ``experts`` site holds (0 for other kinds)."""
        return self.weight_shape[0] if self.kind == "experts" else 0

    def max_rank(self) -> int:
        """The highest rank a LoRA update here can have (per group on a conv).

        A larger r is allowed, as in PEFT: the update is then rank-deficient (passes/lora.py).
        """
        if self.kind == "conv":
            groups = self.conv["groups"]
            kernel = 1
            for k in self.weight_shape[2:]:
                kernel *= k
            return min(self.out_features // groups, self.in_features // groups * kernel)
        return min(self.in_features, self.out_features)

    def shapes(self) -> str:
        return "x".join(str(s) for s in self.weight_shape)


@dataclass
class OpMatch:
    """One use of a site's weight in one graph."""

    node: fx.Node
    site: Site
    x: fx.Node  # the op's data input (token ids for embeddings)
    weight: fx.Node | None  # the weight as stored; None when the op reads it another way
    bias: fx.Node | str | None  # a node, or "bias" for a call_module leaf that has one
    extra: dict[str, Any] = field(default_factory=dict)  # embedding padding_idx etc.


# --- op tables -----------------------------------------------------------------------------

_CONV_ATEN = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_CONV_ATEN_PAD = {aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3}
_CONV_F = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, torch.t}
_MATMULS = {aten.mm.default, aten.matmul.default, torch.matmul, torch.mm, operator.matmul}


def _param_name(node: Any, params: dict[str, nn.Parameter]) -> tuple[str, bool] | None:
    """(parameter name, transposed) when ``node`` reads a parameter, possibly through a 2-D transpose."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr" and node.target in params:
        return node.target, False
    transposed_source = None
    if node.op == "call_function" and node.target in _TRANSPOSES:
        transposed_source = node.args[0]
    elif node.op == "call_function" and node.target in (aten.transpose.int, torch.transpose):
        if sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
            transposed_source = node.args[0]
    elif node.op == "call_function" and node.target == aten.permute.default and list(node.args[1]) == [1, 0]:
        transposed_source = node.args[0]
    elif node.op == "call_method" and node.target == "t":
        transposed_source = node.args[0]
    if transposed_source is not None:
        found = _param_name(transposed_source, params)
        if found is not None and params[found[0]].dim() == 2:
            return found[0], not found[1]
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _as_tuple(value: Any, dims: int) -> tuple:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value,) * dims
    return tuple(value)


# --- matching one node -----------------------------------------------------------------------

@dataclass
class _Raw:
    kind: str
    op: str
    x: Any
    weight_name: str
    weight_node: fx.Node | None
    bias: Any
    fan_in_fan_out: bool = False
    conv: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    weight_shape: tuple[int, ...] | None = None  # the logical shape, when the parameter stores it packed


def _conv_info(dims: int, stride: Any, padding: Any, dilation: Any, groups: Any) -> dict[str, Any]:
    return {
        "dims": dims,
        "stride": _as_tuple(stride, dims),
        "padding": _as_tuple(padding, dims),
        "dilation": _as_tuple(dilation, dims),
        "groups": int(groups),
    }


def _match_function(node: fx.Node, params: dict[str, nn.Parameter]) -> _Raw | None:
    target = node.target
    if target in QUANT_LINEAR_OPS:  # a quantized frozen linear (passes/quantize.py): LoRA goes beside it too
        found = _param_name(node.args[1], params)
        if found and not found[1]:
            return _Raw("linear", "quant_linear", node.args[0], found[0], None, node.args[4],
                        weight_shape=(node.args[6], node.args[7]))
        return None
    if target in (aten.linear.default, F.linear, torch._C._nn.linear):
        found = _param_name(_arg(node, 1, "weight"), params)
        if found and not found[1]:
            return _Raw("linear", "linear", node.args[0], found[0], node.args[1], _arg(node, 2, "bias"))
        return None
    if target in (aten.addmm.default, torch.addmm):
        found = _param_name(node.args[2], params)
        if found:
            # addmm(bias, x, W): W stored [in, out] unless it is W.t() of an [out, in] weight.
            weight_node = node.args[2] if not found[1] else None
            return _Raw("linear", "addmm", node.args[1], found[0], weight_node, node.args[0], fan_in_fan_out=not found[1])
        return None
    if target in _MATMULS or (node.op == "call_method" and target == "matmul"):
        found = _param_name(node.args[1], params)
        if found and params[found[0]].dim() == 2:
            weight_node = node.args[1] if not found[1] else None
            return _Raw("linear", "matmul", node.args[0], found[0], weight_node, None, fan_in_fan_out=not found[1])
        return None
    conv_dims = _CONV_ATEN.get(target) or _CONV_ATEN_PAD.get(target) or _CONV_F.get(target)
    if conv_dims:
        found = _param_name(_arg(node, 1, "weight"), params)
        if found and not found[1]:
            conv = _conv_info(
                conv_dims,
                _arg(node, 3, "stride", 1),
                _arg(node, 4, "padding", 0),
                _arg(node, 5, "dilation", 1),
                _arg(node, 6, "groups", 1),
            )
            return _Raw("conv", f"conv{conv_dims}d", node.args[0], found[0], node.args[1], _arg(node, 2, "bias"), conv=conv)
        return None
    if target == aten.convolution.default:
        found = _param_name(node.args[1], params)
        if found and not found[1] and not node.args[6]:  # not transposed
            dims = params[found[0]].dim() - 2
            conv = _conv_info(dims, node.args[3], node.args[4], node.args[5], node.args[8])
            return _Raw("conv", f"conv{dims}d", node.args[0], found[0], node.args[1], node.args[2], conv=conv)
        return None
    if target == aten.embedding.default:
        found = _param_name(node.args[0], params)
        if found and not found[1]:
            padding_idx = _arg(node, 2, "padding_idx", -1)
            return _Raw(
                "embedding", "embedding", node.args[1], found[0], node.args[0], None,
                extra={"padding_idx": None if padding_idx == -1 else padding_idx},
            )
        return None
    if target in (F.embedding, torch.embedding):
        weight_arg = _arg(node, 1, "weight") if target is F.embedding else node.args[0]
        index_arg = node.args[0] if target is F.embedding else node.args[1]
        found = _param_name(weight_arg, params)
        if found and not found[1]:
            padding_idx = _arg(node, 2, "padding_idx", None) if target is F.embedding else None
            return _Raw("embedding", "embedding", index_arg, found[0], weight_arg, None, extra={"padding_idx": padding_idx})
    return None


def _match_module(node: fx.Node, root: nn.Module) -> _Raw | None:
    module = root.get_submodule(node.target)
    weight = f"{node.target}.weight"
    if type(module) is nn.Linear:
        return _Raw("linear", "linear", node.args[0], weight, None, "bias" if module.bias is not None else None)
    dims = _CONV_MODULES.get(type(module))
    if dims and module.padding_mode == "zeros":
        conv = _conv_info(dims, module.stride, module.padding, module.dilation, module.groups)
        return _Raw("conv", f"conv{dims}d", node.args[0], weight, None, "bias" if module.bias is not None else None, conv=conv)
    if type(module) is nn.Embedding and module.max_norm is None:
        return _Raw("embedding", "embedding", node.args[0], weight, None, None, extra={"padding_idx": module.padding_idx})
    return None


# --- naming and structure ------------------------------------------------------------------

def _site_name(node: fx.Node, weight_name: str, root_model: nn.Module, weight: nn.Parameter) -> str:
    """The module that owns the weight; for a tied weight, the module whose forward used it."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        caller_path = list(stack.values())[-1][0]
        try:
            caller = root_model.get_submodule(caller_path) if caller_path else root_model
        except AttributeError:
            caller = None
        if caller is not None:
            for attr, p in caller.named_parameters(recurse=False):
                if p is weight:
                    return caller_path if attr == "weight" else f"{caller_path}.{attr}".lstrip(".")
    owner, _, attr = weight_name.rpartition(".")
    return owner if attr == "weight" and owner else weight_name


_PASSTHROUGH_ATEN = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "contiguous", "clone", "to", "_to_copy",
    "slice", "select", "squeeze", "unsqueeze", "flatten", "expand", "alias", "detach", "dropout", "type_as",
    "cross_entropy_loss", "nll_loss", "nll_loss_nd", "log_softmax", "_log_softmax", "mse_loss",
    "binary_cross_entropy_with_logits", "float", "_assert_tensor_metadata", "index", "pad",
}
_PASSTHROUGH_TORCH = {
    "view", "reshape", "permute", "transpose", "contiguous", "clone", "to", "squeeze", "unsqueeze", "flatten",
    "float", "type_as", "dropout", "cross_entropy", "nll_loss", "log_softmax", "mse_loss", "getitem",
    "binary_cross_entropy_with_logits",
}


def _is_passthrough(node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target is operator.getitem:
            return True
        name = getattr(node.target, "__name__", str(node.target))
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._opname in _PASSTHROUGH_ATEN
        return name in _PASSTHROUGH_TORCH
    if node.op == "call_method":
        return node.target in _PASSTHROUGH_TORCH
    if node.op == "call_module":
        return node.target.split(".")[-1].startswith(("dropout", "drop")) or "Dropout" in str(node.meta.get("type", ""))
    return False


def _feeds_output_directly(node: fx.Node) -> bool:
    """True when the op's result reaches a model output through reshapes, casts, dropout and losses only."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return True
            if _is_passthrough(user):
                frontier.append(user)
    return False


def _declared_output_heads(model: nn.Module) -> set[str]:
    """The output head a transformers model names itself (``get_output_embeddings``), PEFT's rule for
    'all-linear'. Needed where the head's logits pass through an add before the output (BART's
    final_logits_bias), which the graph walk above does not see through."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return set()
    try:
        head = getter()
    except (AttributeError, NotImplementedError, TypeError):
        return set()
    if not isinstance(head, nn.Module):
        return set()
    return {name for name, module in model.named_modules(remove_duplicate=False) if module is head}


_LAYER_CONTAINERS = ("layers", "layer", "h", "block", "blocks", "encoder_layers", "stages", "resblocks")


def layer_index(name: str, patterns: tuple[str, ...] | None = None) -> int | None:
    """The index of the repeated layer a site lives in (``model.layers.3.mlp`` -> 3)."""
    parts = name.split(".")
    containers = patterns or _LAYER_CONTAINERS
    for i, part in enumerate(parts[:-1]):
        if part in containers and parts[i + 1].isdigit():
            return int(parts[i + 1])
    if patterns:
        return None
    for part in parts:
        if part.isdigit():
            return int(part)
    return None


def _op_name(node: fx.Node, raw: _Raw) -> str:
    if node.op == "call_module":
        return f"nn.{raw.op}"
    return f"adaptc.{raw.op}" if raw.op == "quant_linear" else f"aten.{raw.op}"


# --- the finder ------------------------------------------------------------------------------

def match_ops(gm: fx.GraphModule, model: nn.Module) -> list[OpMatch]:
    """Every use of an adaptable weight in ``gm``'s graph, in graph order."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    heads = _declared_output_heads(model)
    matches: list[OpMatch] = []
    sites: dict[tuple[str, str], Site] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            raw = _match_function(node, params)
        elif node.op == "call_module":
            try:
                raw = _match_module(node, gm)
            except AttributeError:
                raw = None
        else:
            raw = None
        if raw is None:
            continue
        weight = gm.get_parameter(raw.weight_name)
        name = _site_name(node, raw.weight_name, model, weight)
        shape = raw.weight_shape or tuple(weight.shape)
        if raw.kind == "linear":
            out_f, in_f = (shape[1], shape[0]) if raw.fan_in_fan_out else (shape[0], shape[1])
        elif raw.kind == "conv":
            out_f, in_f = shape[0], shape[1] * raw.conv["groups"]
        else:
            in_f, out_f = shape
        key = (name, raw.kind)
        site = sites.get(key)
        if site is None:
            site = sites[key] = Site(
                name=name, kind=raw.kind, op=_op_name(node, raw),
                weight=raw.weight_name, weight_shape=shape, in_features=in_f, out_features=out_f,
                fan_in_fan_out=raw.fan_in_fan_out, conv=raw.conv, uses=0, layer=layer_index(name),
            )
        site.uses += 1
        site.is_head = site.is_head or name in heads or _feeds_output_directly(node)
        matches.append(OpMatch(node, site, raw.x, raw.weight_node, raw.bias, raw.extra))
    return matches


def find_sites(gm: fx.GraphModule, model: nn.Module) -> list[Site]:
    """Every adaptable site of a captured model, in graph order (mixture-of-experts weights included)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    seen: dict[str, tuple[int, Site]] = {}
    for match in match_ops(gm, model):
        key = match.site.name + "/" + match.site.kind
        if key not in seen:
            seen[key] = (order[match.node], match.site)
        if not match.site.is_router and _picks_experts(match.node):
            match.site.is_router = True
    for weight in expert_weights.find_expert_weights(gm):
        site = _expert_site(weight)
        seen.setdefault(site.name + "/" + site.kind, (min(order[u.node] for u in weight.uses), site))
    return [site for _, site in sorted(seen.values(), key=lambda pair: pair[0])]


def _expert_site(weight: expert_weights.ExpertWeight) -> Site:
    experts, first, second = weight.shape
    out_first = weight.uses[0].out_first
    out_f, in_f = (first, second) if out_first else (second, first)
    return Site(
        name=weight.name, kind="experts", op=weight.uses[0].op, weight=weight.name, weight_shape=weight.shape,
        in_features=in_f, out_features=out_f, fan_in_fan_out=not out_first, uses=len(weight.uses),
        layer=layer_index(weight.name),
    )


_MATRIX_OPS = {"linear", "mm", "matmul", "bmm", "addmm", "scaled_dot_product_attention", "_grouped_mm",
               "grouped_mm", "grouped_mm_fallback", "embedding", "quant_linear"}


def _picks_experts(node: fx.Node, limit: int = 64) -> bool:
    """Whether the op's output reaches a ``topk`` before any other matrix product: a router, whose scores
    pick each token's experts. Looked at within ``limit`` nodes."""
    frontier, seen = [node], {node}
    while frontier and len(seen) < limit:
        current = frontier.pop(0)
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            name = getattr(user.target, "_opname", None) or getattr(user.target, "__name__", str(user.target))
            if name == "topk":
                return True
            if user.op == "call_module" or name in _MATRIX_OPS:
                continue
            frontier.append(user)
    return False


def site_key(name: str) -> str:
    """A module-dict key for a site name (dots are not allowed in submodule names)."""
    return re.sub(r"\.", "__", name)
