"""Mixture-of-experts weights as LoRA sites: one rank-r update per expert of a 3-D parameter.

transformers stores a mixture-of-experts layer's experts fused, as 3-D parameters
(``experts.gate_up_proj`` ``[experts, 2 * intermediate, hidden]``, ``experts.down_proj``
``[experts, hidden, intermediate]``; gpt-oss stores them ``[experts, in, out]``), and applies
them per expert in one of several ways, chosen by ``config._experts_implementation``:

- ``grouped_mm``: ``grouped_mm(x_sorted, W.transpose(-2, -1), offsets)`` over the whole 3-D
  weight (on CPU under capture, transformers' own ``transformers::grouped_mm_fallback`` op);
- ``batched_mm``: ``bmm(W[expert_ids], x)`` on the weight indexed by each token's expert;
- ``eager``: ``linear(x, W[e])`` (or ``x @ W[e]``) on one expert's slice at a time.

A site here is a 3-D parameter that reaches a matrix product through such weight views
(transposes of the last two axes, an index or select on the expert axis, casts). It is named
by the parameter (``model.layers.0.mlp.experts.gate_up_proj``), the name PEFT's
``target_parameters`` uses.

The adapter, as PEFT defines it for ``target_parameters``: ``lora_A`` ``[r * experts, in]``
(expert-major rows) and ``lora_B`` ``[out, r * experts]`` (rank-major columns), so that expert
``e``'s update is ``scale * B_e A_e``. It is applied to the weight where the graph reads it
(``W + delta``), not beside each product: every use of the weight, whichever of the forms
above, then computes with the adapted experts, routing stays the graph's own, and merge is
``W <- W + delta`` exactly. LoRA dropout cannot act on a weight (the input is not seen), nor
can DoRA or PiSSA as adaptc defines them, nor a mixed-adapter batch; these are refused.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from adaptc.errors import ConfigError, InputError
from adaptc.warn import warn_user

from .quantize import quantized_modules

KIND = "experts"

aten = torch.ops.aten

# Ops that pass a weight through unchanged but for its dtype or memory layout.
_SAME = {"_to_copy", "to", "alias", "contiguous", "clone", "detach", "type_as", "lift_fresh_copy"}
_SAME_TORCH = {"to", "contiguous", "clone", "detach", "float", "type_as", "bfloat16", "half"}
_GROUPED = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


@dataclass
class ExpertUse:
    """One matrix product that reads an expert weight."""

    node: fx.Node
    op: str  # "aten.grouped_mm", "aten.bmm", "aten.linear", "aten.matmul"
    out_first: bool  # the parameter holds each expert as [out, in]


@dataclass
class ExpertWeight:
    """A 3-D parameter used as per-expert matrices, its reads and its products."""

    name: str
    shape: tuple[int, ...]
    reads: list[fx.Node] = field(default_factory=list)  # get_attr nodes of the parameter
    uses: list[ExpertUse] = field(default_factory=list)


def _opname(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", str(target))


def _view_step(node: fx.Node, source: fx.Node, dims: int) -> tuple[int, int] | None:
    """How ``node`` reshapes the weight ``source`` (with ``dims`` axes): (new dims, transposes of the
    matrix axes), or None when it is not a weight view this matcher follows."""
    if node.op not in ("call_function", "call_method") or not node.args or node.args[0] is not source:
        return None
    name = _opname(node)
    if name in _SAME or (node.op == "call_method" and name in _SAME_TORCH):
        return dims, 0
    if name == "transpose" and len(node.args) >= 3:
        axes = sorted(int(a) % dims for a in node.args[1:3])
        return (dims, 1) if axes == [dims - 2, dims - 1] else None
    if name == "t" and dims == 2:
        return 2, 1
    if name == "permute":
        order = [int(a) % dims for a in node.args[1]]
        swapped = list(range(dims - 2)) + [dims - 1, dims - 2]
        return (dims, 1) if order == swapped else (dims, 0) if order == list(range(dims)) else None
    if dims == 3 and name == "select" and int(node.args[1]) == 0:
        return 2, 0  # one expert's matrix
    if dims == 3 and name == "slice" and (len(node.args) < 2 or int(node.args[1]) == 0):
        return 3, 0  # a range of experts
    if dims == 3 and name == "index" and len(node.args) > 1 and len(node.args[1]) == 1:
        return 3, 0  # W[expert_ids]: one matrix per token
    if dims == 3 and node.target is operator.getitem and not isinstance(node.args[1], (tuple, slice)):
        return (2 if isinstance(node.args[1], int) else 3), 0  # fx: W[e] or W[ids]
    return None


def _product(node: fx.Node, source: fx.Node, dims: int) -> tuple[str, bool] | None:
    """(op, the weight's matrices are [out, in] as the op reads them) when ``node`` is a matrix product of
    ``source``; None otherwise."""
    name = _opname(node)
    args = node.args
    if name in _GROUPED and len(args) >= 2 and args[1] is source and dims == 3:
        return "aten.grouped_mm", False  # grouped_mm(x, W[E, in, out])
    if name == "bmm" and dims == 3 and len(args) == 2:
        if args[1] is source:
            return "aten.bmm", False  # x @ W
        if args[0] is source:
            return "aten.bmm", True  # W @ x
    if name == "linear" and len(args) >= 2 and args[1] is source and dims == 2:
        return "aten.linear", True
    if name in ("matmul", "mm") and len(args) >= 2 and dims in (2, 3):
        if args[1] is source:
            return "aten.matmul", False
        if args[0] is source:
            return "aten.matmul", True
    return None


def _follow(read: fx.Node, owner: nn.Module | None) -> list[ExpertUse] | None:
    """The products a read of a 3-D weight reaches through weight views; None when it reaches one in an
    orientation that contradicts another (then it is not read as experts)."""
    uses: list[ExpertUse] = []
    frontier = [(read, 3, 0)]
    seen: set[fx.Node] = set()
    while frontier:
        node, dims, flips = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            if (
                user.op == "call_module"
                and owner is not None
                and isinstance(_module(owner, user), ExpertLoraLayer)
            ):
                seen.add(user)
                frontier.append((user, dims, flips))  # another adapter's update: still the weight
                continue
            product = _product(user, node, dims)
            if product is not None:
                seen.add(user)
                op, out_first = product
                uses.append(ExpertUse(user, op, out_first != bool(flips % 2)))
                continue
            step = _view_step(user, node, dims)
            if step is not None:
                seen.add(user)
                frontier.append((user, step[0], flips + step[1]))
    if len({u.out_first for u in uses}) > 1:
        return None
    return uses


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    try:
        return root.get_submodule(node.target)
    except AttributeError:
        return None


def find_expert_weights(gm: fx.GraphModule) -> list[ExpertWeight]:
    """Every 3-D floating-point parameter of ``gm`` that its graph uses as per-expert matrices, in graph order."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    found: dict[str, ExpertWeight] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in params:
            continue
        param = params[node.target]
        if param.dim() != 3 or not param.is_floating_point():
            continue
        uses = _follow(node, gm)
        if not uses:
            continue
        entry = found.setdefault(node.target, ExpertWeight(node.target, tuple(param.shape)))
        entry.reads.append(node)
        entry.uses.extend(uses)
    return [w for w in found.values() if len({u.out_first for u in w.uses}) == 1]


# --- the adapter ---------------------------------------------------------------------------------


def check_config(sites: list, config) -> None:
    """Why these LoRA options cannot go on expert sites, as a ConfigError naming them (before anything changes)."""
    if not sites:
        return
    names = ", ".join(s.name for s in sites[:3]) + (" ..." if len(sites) > 3 else "")
    problems = []
    if config.dropout:
        problems.append(
            f"dropout={config.dropout} (the update is applied to the weight, so no input is dropped)"
        )
    if config.use_dora:
        problems.append("use_dora=True")
    if config.init == "pissa":
        problems.append("init='pissa'")
    if problems:
        raise ConfigError(
            f"LoRA on mixture-of-experts weights ({names}) does not take {' and '.join(problems)}, as in PEFT's "
            "target_parameters; set dropout=0 and plain LoRA, or leave the experts out (exclude=['gate_up_proj', "
            "'down_proj'] or a narrower targets)"
        )


class ExpertsNotQuantizedWarning(UserWarning):
    """QLoRA (quantize='nf4' / 'int8') on a mixture-of-experts model: the expert weights stay in full precision."""


class ExpertLoraLayer(nn.Module):
    """The LoRA of one 3-D expert weight: ``W + scale * B_e A_e`` for every expert ``e`` (PEFT's layout)."""

    kind = KIND
    _rows = None  # mixed batches are refused (see forward)

    def __init__(self, site, r: int, alpha: float, rslora: bool) -> None:
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.experts = site.weight_shape[0]
        self.fan_in_fan_out = site.fan_in_fan_out  # stored [experts, in, out]
        self.use_dora = False
        self.active = True
        self._rows = None
        self.lora_A = nn.Parameter(torch.empty(r * self.experts, site.in_features))
        self.lora_B = nn.Parameter(torch.empty(site.out_features, r * self.experts))

    def extra_repr(self) -> str:
        return f"experts={self.experts}, r={self.r}, scaling={self.scaling:g}"

    @torch.no_grad()
    def initialize(self, init: str, weight: torch.Tensor | None = None) -> None:
        """B = 0 (so the adapted weight is the base weight); A as PEFT's ``nn.Linear`` or gaussian."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B_e A_e`` for every expert, shaped like the stored weight."""
        a = self.lora_A.reshape(self.experts, self.r, -1)  # [E, r, in]
        b = self.lora_B.reshape(self.lora_B.shape[0], self.r, self.experts).permute(2, 0, 1)  # [E, out, r]
        delta = torch.bmm(b, a) * self.scaling  # [E, out, in]
        return delta.transpose(1, 2) if self.fan_in_fan_out else delta

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return current + self.delta_weight().to(current.dtype)

    def forward(self, x: None, base: torch.Tensor) -> torch.Tensor:
        """``base`` is the weight as the graph read it; the adapted weight replaces it for every reader."""
        if not self.active:
            return base
        if self._rows is not None:
            raise InputError(
                "adapter_names (a mixed-adapter batch) cannot apply LoRA on mixture-of-experts weights: the update "
                "changes the expert weights every row shares (PEFT refuses it too); run one adapter per call"
            )
        return base + self.delta_weight().to(base.dtype)


def build_layers(sites: list, config, model: nn.Module) -> dict[str, ExpertLoraLayer]:
    """One initialised ExpertLoraLayer per expert site (options checked first)."""
    check_config(sites, config)
    if sites and quantized_modules(model):
        warn_user(
            f"quantize leaves the {len(sites)} mixture-of-experts weight(s) adapted here in full precision "
            f"({sites[0].name}, ...): it replaces nn.Linear layers, and transformers' experts read their 3-D weights "
            "as plain parameters (indexed or multiplied per expert in their own forward), which a packed 4-bit "
            "weight cannot stand in for. LoRA on them works as without quantize; only their memory is not reduced",
            ExpertsNotQuantizedWarning,
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = {}
    for site in sites:
        layer = ExpertLoraLayer(site, config.rank_for(site.name), config.alpha_for(site.name), config.rslora)
        weight = params[site.weight]
        layer.to(dtype=weight.dtype if weight.is_floating_point() else torch.float32, device=weight.device)
        layer.initialize(config.init)
        site.params_added = sum(p.numel() for p in layer.parameters())
        layers[site.name] = layer
    return layers


def insert(gm: fx.GraphModule, layers: dict[str, nn.Module], prefix: str, site_key: Callable[[str], str]) -> int:
    """Replace every read of a selected expert weight in ``gm.graph`` by its adapted weight; returns the number
    of matrix products that now read an adapted weight. ``site_key`` names a site's module under ``prefix``
    (passes.sites.site_key, passed in: sites imports this module)."""
    count = 0
    for weight in find_expert_weights(gm):
        layer = layers.get(weight.name)
        if layer is None or getattr(layer, "kind", None) != KIND:
            continue
        for read in weight.reads:
            with gm.graph.inserting_after(read):
                adapted = gm.graph.call_module(f"{prefix}.{site_key(weight.name)}", (None, read))
            adapted.meta = {k: v for k, v in read.meta.items() if k in ("val", "tensor_meta")}
            read.replace_all_uses_with(
                adapted, delete_user_cb=lambda user, adapted=adapted: user is not adapted
            )
        count += len(weight.uses)
    return count


# --- ONNX -------------------------------------------------------------------------------------------


def _grouped_mm_onnx(x, weight, offsets):
    """transformers' ``grouped_mm_fallback(x [S, in], weight [E, in, out], offsets [E])`` in ONNX ops: row ``s``
    belongs to the first expert whose end offset is above ``s``; rows past the last offset (none in a model
    without expert parallelism) take the last expert, and their output is never read."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    rows = op.Range(
        op.Constant(value_int=0), op.Squeeze(op.Shape(x, start=0, end=1)), op.Constant(value_int=1)
    )
    ends = op.Cast(offsets, to=ir.DataType.INT64)
    past = op.Cast(op.GreaterOrEqual(op.Unsqueeze(rows, [1]), op.Unsqueeze(ends, [0])), to=ir.DataType.INT64)
    expert = op.ReduceSum(past, op.Constant(value_ints=[1]), keepdims=0)
    last = op.Sub(op.Shape(weight, start=0, end=1), op.Constant(value_ints=[1]))
    picked = op.Gather(weight, op.Min(expert, last), axis=0)  # [S, in, out]
    return op.Squeeze(op.MatMul(op.Unsqueeze(x, [1]), picked), [1])


def onnx_translations() -> dict:
    """ONNX lowerings (``torch.onnx.export(custom_translation_table=...)``) of the expert ops the exporter lacks."""
    try:
        fallback = torch.ops.transformers.grouped_mm_fallback.default  # registered by transformers' MoE code
    except (AttributeError, RuntimeError):
        return {}
    return {fallback: _grouped_mm_onnx}
