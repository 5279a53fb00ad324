"""Lower an AdaptedModel to ONNX: merge, export (dynamo), optimize for ORT, check parity.

The graph exported is the AdaptedModel's own captured eval graph (capture-time rewrites
such as ``use_cache=False`` already applied), called through :class:`FlatCall` so that the
ONNX inputs and outputs are plain tensors with readable names and named dynamic axes.

- ``merge=True``: merged tensors are swapped into the base weights for the export only
  (``targets.merge.merged_weights``) and the originals put back: the user's AdaptedModel
  keeps its adapters (``am.merge()`` is the call that consumes them).
- ``merge=False``: every adapter's LoRA A/B (and DoRA magnitude) is a graph input whose
  default is a rank-0 LoRA (``[0, in]`` / ``[out, 0]`` initializers; magnitude ``||W||``), so
  with no adapter active the model is the base model; each adapter's tensors go to
  ``<stem>.<adapter>.onnx_adapter`` for ``RunOptions.add_active_adapter``. The LoRA scale is
  folded into B, so the graph holds no per-adapter constant.
- ``mixed_adapters=True``: every LoRA adapter stacked in the graph and one more input,
  ``adapter_index`` ``[batch]``, choosing each row's adapter (``-1``: the base model); see
  ``targets/onnx_mixed.py``, whose fx rewrite this export runs before conversion.

Everything is written in a temporary folder next to ``path`` and renamed into place only
after the parity check passes: a failed export leaves no file at ``path``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from adaptc.passes import experts
from adaptc.passes.quantize import quantized_modules
from adaptc.passes.sites import site_key
from torch import nn
from torch.utils import _pytree as pytree

from adaptc.api import adapt
from adaptc.capture import auto_dims, describe_failure, fixed_image_size
from adaptc.errors import ConfigError, ExportError, InputError
from adaptc.inputs import Inputs, normalize_inputs
from adaptc.methods import ADAPTERS_ATTR, available_methods, get_method
from adaptc.model import AdaptedModel

from . import ort as rt
from .flat import FlatCall, flat_outputs, input_names, output_names
from .linear_rules import prefiltered_default_rules
from .merge import merged_copy, merged_weights
from .onnx_mixed import ADAPTER_INDEX, IndexedCall, stackable_adapters, stacked_adapters_graph
from .split_skip_norm import SKIP_NORMS, split_skip_norms
from .unpack_attention import unpack_attention

EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a .data file (protobuf's limit is 2 GiB)
MIN_OPSET = 18  # the dynamo exporter's lowest
QUANTIZE = (None, "int8")


@dataclass
class ExportReport:
    """What export_onnx wrote and measured. Latencies are medians on the example inputs (CPU)."""

    path: str
    files: dict[str, int]  # path -> bytes
    opset: int
    merged: bool
    dynamic_axes: dict[str, dict[int, str]]  # input -> {axis: name}
    fusions: dict[str, int]  # onnxscript ORT fusion rule -> times applied
    fused_ops: dict[str, int]  # com.microsoft op -> count in the saved model
    parity: dict[str, float]  # check -> max |ORT - PyTorch|
    parity_inputs: str
    ort_latency_ms: float
    torch_latency_ms: float
    adapters: dict[str, str] = field(default_factory=dict)  # merge=False: adapter -> .onnx_adapter file
    quantized: dict[str, Any] | None = None
    mixed_adapters: list[str] = field(default_factory=list)  # mixed_adapters=True: adapter_index value -> adapter

    @property
    def parity_max_abs_diff(self) -> float:
        return max(self.parity.values())

    def summary(self) -> str:
        kind = "merged" if self.merged else f"unmerged, {len(self.adapters)} ORT adapter file(s)"
        if self.mixed_adapters:
            kind = (f"{len(self.mixed_adapters)} adapters stacked, {ADAPTER_INDEX}: "
                    f"{', '.join(f'{i}={n}' for i, n in enumerate(self.mixed_adapters))}, -1=base")
        lines = [f"wrote {self.path} (opset {self.opset}, {kind})"]
        lines += [f"  {Path(f).name}: {size:,} bytes" for f, size in self.files.items()]
        axes = "; ".join(f"{n}[{', '.join(f'{a}:{d}' for a, d in ax.items())}]" for n, ax in self.dynamic_axes.items() if ax)
        lines.append(f"  dynamic axes: {axes or 'none'}")
        lines.append(f"  onnxscript fusions: {', '.join(f'{k}={v}' for k, v in self.fusions.items()) or 'none applied'}")
        lines.append(f"  fused ops: {', '.join(f'{k}={v}' for k, v in self.fused_ops.items()) or 'none'}")
        checks = ", ".join(f"{k} {v:.2e}" for k, v in self.parity.items())
        lines.append(f"  parity (max abs diff vs PyTorch) on {self.parity_inputs}: {checks}")
        lines.append(
            f"  latency (median, example inputs): ONNX Runtime {self.ort_latency_ms:.3f} ms, "
            f"PyTorch eager {self.torch_latency_ms:.3f} ms"
        )
        if self.quantized:
            q = self.quantized
            lines.append(
                f"  int8: {Path(q['path']).name} {q['size']:,} bytes; max abs change vs fp32 ORT {q['max_abs_change']:.3e} "
                f"(relative {q['relative_change']:.3e}), vs PyTorch {q['max_abs_diff_vs_torch']:.3e}"
            )
        return "\n".join(lines)

    __str__ = summary


# --- checks before any work ---------------------------------------------------------------------

def check_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a file path ending in .onnx (str or os.PathLike), got {type(path).__name__}")
    target = Path(path)
    if target.suffix != ".onnx":
        raise ExportError(f"path must end in .onnx, got {str(path)!r}")
    parent = target.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {target}: folder {parent} does not exist (or is not a folder); create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {target}: folder {parent} is not writable; choose another path")
    if target.is_dir():
        raise ExportError(f"cannot write {target}: it is a folder")
    return target


def _check_options(merge: bool, quantize: str | None, opset: int | None, atol: float) -> None:
    if not isinstance(merge, bool):
        raise ExportError(f"merge must be True or False, got {merge!r}")
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and not merge:
        raise ExportError("quantize='int8' applies to a merged export; use merge=True (adapters cannot be hot-swapped into int8 weights)")
    if opset is not None:
        newest = onnx.defs.onnx_opset_version()
        if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
            raise ExportError(
                f"opset must be an integer from {MIN_OPSET} (the dynamo exporter's lowest) to {newest} "
                f"(onnx {onnx.__version__}'s newest), got {opset!r}; leave it None for the exporter's default"
            )
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol > 0:
        raise ExportError(f"atol must be a positive number, got {atol!r}")


@contextlib.contextmanager
def _eval(am: nn.Module) -> Iterator[None]:
    """Eval mode for the export, every module's own flag restored afterwards."""
    modes = {m: m.training for m in am.modules()}
    am.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


# --- unmerged adapters as graph inputs ------------------------------------------------------------

@dataclass
class Slot:
    """One adapter tensor as a graph input."""

    input_name: str  # "<adapter>.<site>.<param>"
    graph_path: str  # the parameter's path inside the captured graph
    adapter: str
    value: torch.Tensor  # what the adapter file holds (B with the scale folded in)
    default: torch.Tensor  # rank 0 (A, B) or ||W|| (DoRA magnitude): the base model
    rank_axis: int | None


def _slots(am) -> list[Slot]:
    slots = []
    for name, layers in am.adapters.items():
        for site in am.adapter_sites(name):
            key = site_key(site.name)
            layer = layers[key]
            weight = am.base_model.get_parameter(site.weight).detach()
            for pname, param in layer.named_parameters():
                value = param.detach()
                if pname.endswith("B"):
                    value = value * layer.scaling  # folded in: the graph runs every layer at scale 1
                if pname == "lora_magnitude_vector":
                    rank_axis = None
                    oriented = layer._oriented(weight).float()
                    default = oriented.flatten(1).norm(p=2, dim=1).to(value.dtype)
                else:
                    rank_axis = 0 if pname.endswith("A") else 1
                    shape = list(value.shape)
                    shape[rank_axis] = 0
                    default = value.new_zeros(shape)
                slots.append(Slot(f"{name}.{site.name}.{pname}", f"{ADAPTERS_ATTR}.{name}.{key}.{pname}", name, value, default, rank_axis))
    return slots


@contextlib.contextmanager
def _every_layer_live(am) -> Iterator[None]:
    """Trace every adapter (active or not) at scale 1: which one applies is chosen per ORT run."""
    layers = [layer for group in am.adapters.values() for layer in group.values()]
    saved = [(layer.active, layer.scaling) for layer in layers]
    try:
        for layer in layers:
            layer.active, layer.scaling = True, 1.0
        yield
    finally:
        for layer, (active, scaling) in zip(layers, saved):
            layer.active, layer.scaling = active, scaling


# --- torch -> ONNX --------------------------------------------------------------------------------

_OP = re.compile(r"(aten[.:]{1,2}[A-Za-z_0-9.]+|[A-Za-z_0-9]+::[A-Za-z_0-9.]+)")


def _torch_export(flat: FlatCall, tensors: list[torch.Tensor], shapes: list[dict], names: list[str],
                  outs: list[str], opset: int | None) -> ir.Model:
    try:
        # prefiltered_default_rules: the exporter's own onnxscript optimize pass is otherwise quadratic
        with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None), _quiet(), prefiltered_default_rules():
            program = torch.onnx.export(
                flat.eval(), tuple(tensors), dynamo=True, input_names=names, output_names=outs,
                dynamic_shapes=(tuple(shapes),), opset_version=opset, verbose=False,
                custom_translation_table=experts.onnx_translations(),  # transformers' grouped expert matmul
            )
    except Exception as error:  # the exporter raises many kinds; all mean the same to the user
        message = str(error)
        op = _OP.search(message)
        detail = re.search(r"<class '[^']+'>: (.+)", message)
        first = (detail.group(1) if detail else describe_failure(error)).strip()
        raise ExportError(
            f"torch.onnx.export failed{' at ' + op.group(1) if op else ''}: {first[:400]}. "
            "Hint: the ONNX exporter has no lowering for an op the model uses, or could not trace it; rewrite that "
            "part with standard ops, or pass a translation with torch.onnx.export(custom_translation_table=...)."
        ) from error
    _forget_size_one_shapes(program.model)
    return program.model


def _forget_size_one_shapes(model: ir.Model) -> None:
    """Drop the recorded shape of every intermediate value with a fixed size-1 axis.

    The exporter records a size the example happened to give as fixed: timm's MobileNetV3 at 32 x 32
    ends in 1 x 1 feature maps, recorded as [batch, 144, 1, 1], though a 48 x 48 input gives 2 x 2.
    ONNX Runtime trusts recorded shapes when it plans buffer reuse and then fails at run time
    ("Shape mismatch attempting to re-use buffer"). Without them ORT infers the shapes itself.
    """
    outputs = set(model.graph.outputs)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            if value in outputs or value.shape is None:
                continue
            if any(isinstance(dim, int) and dim == 1 for dim in value.shape):
                value.shape = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _axis_name(tensor: torch.Tensor, axis: int) -> str:
    if axis == 0:
        return "batch"
    if tensor.dim() >= 4 and axis >= tensor.dim() - 2:
        return ("height", "width")[axis - tensor.dim() + 2]
    if axis == 1 and tensor.dim() <= 3:
        return "sequence" if not tensor.is_floating_point() else "time"
    if axis == 1:
        return "channels"
    return f"dim{axis}"


def _name_dims(model: ir.Model, tensors: list[torch.Tensor], slots: list[Slot]) -> dict[str, dict[int, str]]:
    """Give the exporter's symbols (s0, s17, ...) readable names everywhere in the graph."""
    graph = model.graph
    rename: dict[str, str] = {}
    used: set[str] = set()
    axes: dict[str, dict[int, str]] = {}
    for index, value in enumerate(graph.inputs):
        if value.shape is None:
            continue
        mine = axes.setdefault(value.name, {}) if index < len(tensors) else None
        for axis, dim in enumerate(value.shape.dims):
            if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
                continue
            if dim.value not in rename:
                if index < len(tensors):
                    wanted = _axis_name(tensors[index], axis)
                    name = wanted if wanted not in used else f"{value.name}_{wanted}"
                else:
                    name = slots[index - len(tensors)].input_name.rsplit(".", 1)[0] + ".rank"
                rename[dim.value] = name
                used.add(name)
            if mine is not None:
                mine[axis] = rename[dim.value]
    if not rename:
        return axes
    token = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")

    def renamed(shape: ir.Shape | None) -> ir.Shape | None:
        if shape is None:
            return None
        dims = [
            ir.SymbolicDim(token.sub(lambda m: rename[m.group(1)], d.value))
            if isinstance(d, ir.SymbolicDim) and d.value is not None else d
            for d in shape.dims
        ]
        return ir.Shape(dims)

    values = list(graph.inputs) + list(graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values.extend(node.outputs)
    for value in values:
        if value.shape is not None:
            value.shape = renamed(value.shape)
    return axes


def _add_defaults(model: ir.Model, slots: list[Slot]) -> None:
    """Rank-0 initializers behind the LoRA inputs: with no adapter active, the base model."""
    by_name = {value.name: value for value in model.graph.inputs}
    for slot in slots:
        value = by_name[slot.input_name]
        if slot.rank_axis is not None and isinstance(value.shape.dims[slot.rank_axis], int):
            raise ExportError(
                f"the exporter fixed the rank of {slot.input_name} at {value.shape.dims[slot.rank_axis]}, so adapters "
                "cannot be swapped at that site; export with merge=True"
            )
        value.const_value = ir.tensor(slot.default.float().numpy() if slot.default.dtype == torch.bfloat16 else slot.default.numpy())
        model.graph.register_initializer(value)


def _weights_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# --- parity ---------------------------------------------------------------------------------------

_VARIED = ("batch", "sequence", "time", "height", "width")


def _fresh_inputs(path: Path, example: list[torch.Tensor], count: int,
                  varied: tuple[str, ...] = _VARIED) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Random inputs at another batch size and length: every named axis gets a new size."""
    proto = onnx.load(str(path), load_external_data=False)
    generator = torch.Generator().manual_seed(1234)
    sizes: dict[str, int] = {}
    fresh = []
    for value, tensor in zip(list(proto.graph.input)[:count], example):
        shape = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            size = tensor.shape[axis]
            if dim.dim_param and dim.dim_param.endswith(varied):  # not channels: the weights fix those
                if dim.dim_param not in sizes:
                    # Shorter, not longer: a length can be capped (positions, image size); a batch cannot.
                    sizes[dim.dim_param] = size + 1 if dim.dim_param == "batch" or size <= 2 else size - max(1, size // 4)
                size = sizes[dim.dim_param]
            shape.append(size)
        fresh.append(_like(tensor, shape, generator))
    return fresh, sizes


def _like(tensor: torch.Tensor, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    if tensor.is_floating_point():
        std = tensor.float().std().item() if tensor.numel() > 1 else 1.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        mean = tensor.float().mean().item()
        return (torch.randn(shape, generator=generator) * std + mean).to(tensor.dtype)
    low, high = int(tensor.min()), int(tensor.max())
    return torch.randint(low, high + 1, shape, generator=generator).to(tensor.dtype)


def _max_diff(got: list[np.ndarray], expected: list[torch.Tensor], names: list[str]) -> float:
    if len(got) != len(expected):
        raise ExportError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for value, ref, name in zip(got, expected, names):
        ref = ref.detach().float().numpy()
        if value.shape != ref.shape:
            raise ExportError(f"parity check failed: output {name} has shape {value.shape} in ONNX Runtime, {ref.shape} in PyTorch")
        if value.size:
            diff = np.abs(value.astype(np.float64) - ref.astype(np.float64))
            worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))
    return worst


# --- the entry point ------------------------------------------------------------------------------

def export_onnx(
    am: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = None,
    merge: bool = True,
    optimize: bool = True,
    opset: int | None = None,
    quantize: str | None = None,
    *,
    external_data: bool | None = None,
    atol: float = 1e-4,
    latency_runs: int = 20,
    mixed_adapters: bool = False,
) -> ExportReport:
    """Export an AdaptedModel to ONNX at ``path``, optimized for ONNX Runtime, and prove it matches PyTorch.

    ``example_inputs`` default to the capture's. ``merge=True`` folds the active adapters in (``am`` is left
    as it was); ``merge=False`` keeps every adapter swappable (see the module docstring). ``optimize`` runs
    onnxscript's ORT fusions and ORT's extended graph optimizations and saves the result. ``opset`` defaults
    to the exporter's. ``quantize='int8'`` also writes ``<stem>.int8.onnx`` (ORT dynamic quantization) and
    reports its accuracy change. ``external_data`` (default: weights over 1 GiB) puts the weights in
    ``<name>.data``. The parity check runs ONNX Runtime on fresh random inputs at another batch size and
    length and raises ExportError, writing nothing, if any output differs from PyTorch by more than ``atol``
    times the outputs' largest magnitude (at least 1: absolute for small outputs, relative for large ones).

    ``mixed_adapters=True`` exports every LoRA adapter stacked, with an ``adapter_index`` input choosing each
    row's adapter (``merge`` is then not consulted; ``report.mixed_adapters`` lists the adapters by index),
    and checks a batch that mixes them against PyTorch's mixed batch (``am(..., adapter_names=...)``).
    A decoder with a key/value cache (``task="text-generation"``) is ``targets.onnx_decoder.export_decoder``;
    ``adaptc.export_onnx`` (targets/export.py) chooses between the two.
    """
    if not isinstance(am, AdaptedModel):
        raise InputError(f"export_onnx takes an AdaptedModel (from adaptc.inject), got {type(am).__name__}")
    target = check_path(path)
    _check_options(merge, quantize, opset, atol)
    _check_latency_runs(latency_runs)
    if _check_mixed(am, mixed_adapters, quantize):
        merge = False  # every adapter stays in the graph, stacked
    _check_unmerged_methods(am, merge)
    inputs = normalize_inputs(example_inputs) if example_inputs is not None else am.example_inputs
    inputs = _batch_of_two(am, inputs)
    external = _weights_bytes(am) > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    options = ExportOptions(merge, optimize, opset, quantize, external, atol, latency_runs, mixed_adapters)
    am = _full_precision(am, inputs, merge)  # a quantized base (QLoRA) exports as a merged fp copy
    with _workspace(target) as work, _eval(am), torch.no_grad():
        lowered = _lower(am, inputs, options, work)
        optimized = _optimize(lowered, options, work)
        parity = _check_parity(am, lowered, optimized, options, work)
        measured = _measure(am, inputs, lowered, optimized, parity, options, work)
        return _publish(lowered, optimized, parity, measured, options, work)


def _check_latency_runs(latency_runs: int) -> None:
    if isinstance(latency_runs, bool) or not isinstance(latency_runs, int) or latency_runs < 1:
        raise ExportError(f"latency_runs must be a positive integer, got {latency_runs!r}")


def _check_mixed(am: AdaptedModel, mixed_adapters: bool, quantize: str | None) -> bool:
    """mixed_adapters=True: LoRA adapters only (targets/onnx_mixed.py says which), fp32, a full-precision base."""
    if not isinstance(mixed_adapters, bool):
        raise ExportError(f"mixed_adapters must be True or False, got {mixed_adapters!r}")
    if not mixed_adapters:
        return False
    if quantize:
        raise ExportError("quantize='int8' applies to a merged export; a mixed-adapter graph keeps its adapters "
                          "(use mixed_adapters=False, merge=True)")
    if quantized_modules(am.base_model):
        raise ExportError("this model has a quantized base (inject(..., quantize=...)): mixed_adapters=True needs a "
                          "full-precision base; export each adapter merged instead")
    try:
        stackable_adapters(am)
    except ConfigError as error:
        raise ExportError(str(error)) from error
    return True


def _check_unmerged_methods(am: AdaptedModel, merge: bool) -> None:
    """merge=False only for methods whose tensors can be graph inputs (Method.unmerged_export)."""
    fixed = [n for n, c in am.adapter_configs().items() if not get_method(c).unmerged_export]
    if not fixed or merge:
        return
    method = get_method(am.adapter_configs()[fixed[0]])
    inputs = [m for m in available_methods() if get_method(m).unmerged_export]
    why = "its virtual tokens change the graph's shapes" if method.edits_sequence else \
        "its tensors are not lowered as graph inputs"
    kept = {"weights": "folds it into the base weights", "constants": "folds it into constants of the graph"}
    raise ExportError(
        f"adapter {fixed[0]!r} is a {method.name!r} adapter: merge=False (hot-swappable ORT adapter files) keeps "
        f"only {', '.join(inputs)} adapters as ORT adapter inputs ({method.name}: {why}). Export it with "
        f"merge=True (the default), which {kept.get(method.merge, 'keeps it in the graph with its trained values')}"
        "; adapters that cannot be merged stay in the graph there"
    )


def _batch_of_two(am, inputs: Inputs) -> Inputs:
    """A batch of one, traced as a batch of two: the ONNX model must accept any batch.

    torch.export specialises every axis of size 1 to the constant 1 (its 0/1 specialisation), even
    under ``Dim.AUTO``: a graph captured from one row bakes the batch into its reshapes and
    broadcasts, while the ONNX input still says ``batch`` (measured on Llama: at batch 2, ONNX
    Runtime failed in a Mul broadcasting 6 against 12, batch x length flattened). When every tensor input has 1 row, the rows are repeated
    to 2 for capture and export; a model that rejects that (axis 0 was not a batch) keeps its own.
    """
    leaves = [leaf for leaf in inputs.flat() if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1]
    if not leaves or any(leaf.shape[0] != 1 for leaf in leaves):
        return inputs
    def two(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            return torch.cat([leaf, leaf])
        return leaf

    args, kwargs = pytree.tree_map(two, (inputs.args, inputs.kwargs))
    doubled = Inputs(tuple(args), dict(kwargs))
    try:
        with _eval(am), torch.no_grad():
            am.graph_for(doubled)  # captured here (or found), so a failure falls back to the original
    except Exception:  # noqa: BLE001 - axis 0 was not a batch: export from the example as given
        return inputs
    return doubled


def _full_precision(am, inputs: Inputs, merge: bool):
    """A quantized base (QLoRA) is exported merged, in full precision: a merged fp copy, captured anew."""
    if not quantized_modules(am.base_model):
        return am
    if not merge:
        raise ExportError(
            "this model has a quantized base (inject(..., quantize=...)): export it merged (merge=True, the default), "
            "which writes full-precision weights (add quantize='int8' for ORT int8); unmerged export is not supported"
        )
    return adapt(merged_copy(am), inputs, training=False)


# --- the stages: lower -> optimize -> check parity -> measure -> publish ------------------------

@dataclass(frozen=True)
class ExportOptions:
    """export_onnx's options, checked, as every stage reads them."""

    merge: bool
    optimize: bool
    opset: int | None
    quantize: str | None
    external: bool  # weights in a .data file beside each model
    atol: float
    latency_runs: int
    mixed: bool = False  # every LoRA adapter stacked, an adapter_index input (targets/onnx_mixed.py)


@dataclass(frozen=True)
class Workspace:
    """A temporary folder beside the target: the stages write here, publish moves the files out."""

    target: Path
    folder: Path

    @property
    def final(self) -> Path:
        """The model as it will be published (under the target's name)."""
        return self.folder / self.target.name

    @property
    def stage(self) -> Path:
        """Intermediate models (exported, fused): a subfolder, so publish never moves them."""
        return self.folder / "stage"


@contextlib.contextmanager
def _workspace(target: Path) -> Iterator[Workspace]:
    """The workspace, removed afterwards whatever happened: a failed export leaves no file."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.stem}.adaptc-", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}; choose a writable folder") from exc
    try:
        work = Workspace(target, folder)
        work.stage.mkdir()
        yield work
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Lowered:
    """The exported graph on disk, and how its inputs and outputs map to the PyTorch call."""

    path: Path  # the saved model: work.final when not optimizing, else an intermediate in work.stage
    flat: FlatCall  # the captured graph as a call on plain tensors
    example: list[torch.Tensor]  # the example call's tensors, in graph-input order
    names: list[str]  # their input names (the adapter inputs, named by their slots, follow)
    outs: list[str]
    slots: list[Slot]  # merge=False: every adapter tensor as a graph input
    axes: dict[str, dict[int, str]]  # input -> {axis: name}
    adapters: dict[str, Path]  # merge=False: adapter -> its .onnx_adapter file in the workspace
    torch_ms: float | None  # the merged model's eager latency: it exists only while lowering
    stacked: list[str] = field(default_factory=list)  # mixed: adapter_index value -> adapter (the last input)


def _lower(am: AdaptedModel, inputs: Inputs, options: ExportOptions, work: Workspace) -> Lowered:
    """torch.export the captured graph to ONNX, adapters merged in or kept live as graph inputs."""
    if options.mixed:
        return _lower_mixed(am, inputs, options, work)
    graph = am.graph_for(inputs)
    slots = [] if options.merge else _slots(am)
    names = input_names(am.base_model, inputs)
    with merged_weights(am) if options.merge else _every_layer_live(am):
        flat = FlatCall(graph, inputs, [s.graph_path for s in slots])
        example = flat.example_tensors()
        outs = output_names(graph(*inputs.args, **inputs.kwargs), set(names) | {s.input_name for s in slots})
        model = _torch_export(flat, example + [s.value for s in slots], _dynamic_shapes(am, example, slots),
                              names + [s.input_name for s in slots], outs, options.opset)
        torch_ms = None
        if options.merge and not _graph_held_methods(am):  # PyTorch eager: the merged model, as the user would run it
            torch_ms = rt.median_ms(lambda: am.base_model(*inputs.args, **inputs.kwargs), options.latency_runs)
        axes = _name_dims(model, example, slots)
        if slots:
            _add_defaults(model, slots)
        path = work.stage / "exported.onnx" if options.optimize else work.final
        # Saved inside the block: the exported initializers still read the (merged) parameters lazily.
        rt.save(model, path, options.external)
    adapters = {} if options.merge else _write_adapters(am, slots, work)
    return Lowered(path, flat, example, names, outs, slots, axes, adapters, torch_ms)


def _lower_mixed(am: AdaptedModel, inputs: Inputs, options: ExportOptions, work: Workspace) -> Lowered:
    """The captured graph with every LoRA adapter stacked (targets/onnx_mixed.py), ``adapter_index`` last."""
    stacked = stacked_adapters_graph(am, am.graph_for(inputs))
    names = input_names(am.base_model, inputs)
    flat = FlatCall(stacked.module, inputs)
    example = flat.example_tensors()
    batch = example[0].shape[0] if example and example[0].dim() else 1
    index = torch.arange(batch) % (len(stacked.adapters) + 1)  # adapters and the base: no index is special-cased
    outs = output_names(flat_outputs(am(*inputs.args, **inputs.kwargs)), set(names) | {ADAPTER_INDEX})
    shapes = _dynamic_shapes(am, example, []) + [{0: torch.export.Dim.AUTO}]
    model = _torch_export(IndexedCall(flat, stacked), example + [index], shapes, names + [ADAPTER_INDEX], outs,
                          options.opset)
    axes = _name_dims(model, example + [index], [])
    path = work.stage / "exported.onnx" if options.optimize else work.final
    rt.save(model, path, options.external)
    return Lowered(path, flat, example + [index], names + [ADAPTER_INDEX], outs, [], axes, {}, None, stacked.adapters)


def _graph_held_methods(am: AdaptedModel) -> list[str]:
    """Adapters the base model does not carry once merged (virtual tokens, prefixes): the graph holds them."""
    return [n for n, c in am.adapter_configs().items() if get_method(c).merge != "weights"]


def _dynamic_shapes(am: AdaptedModel, example: list[torch.Tensor], slots: list[Slot]) -> list[dict | None]:
    """Every input axis dynamic as the capture made it; an adapter's rank axis too, to swap any rank in."""
    fixed = fixed_image_size(am.base_model)  # as the capture did: see adaptc.capture.fixed_image_size
    shapes: list[dict | None] = [auto_dims(t, fixed) or {} for t in example]
    return shapes + [{s.rank_axis: torch.export.Dim.AUTO} if s.rank_axis is not None else None for s in slots]


def _write_adapters(am: AdaptedModel, slots: list[Slot], work: Workspace) -> dict[str, Path]:
    """One .onnx_adapter file per adapter (active or not): the parity check loads them as users will."""
    adapters = {}
    for name in am.adapters:
        file = work.folder / f"{work.target.stem}.{name}.onnx_adapter"
        rt.write_adapter(file, {s.input_name: s.value.float().numpy() for s in slots if s.adapter == name})
        adapters[name] = file
    return adapters


@dataclass
class Optimized:
    """The model to check and publish, and the fusions that made it."""

    path: Path  # always work.final
    fusions: dict[str, int]  # onnxscript ORT fusion rule -> times applied


def _optimize(lowered: Lowered, options: ExportOptions, work: Workspace) -> Optimized:
    """onnxscript's ORT fusions and ORT's extended optimizations, when asked for."""
    fusions = _fuse_for_ort(lowered.path, work.final, options.external) if options.optimize else {}
    shutil.rmtree(work.stage)  # the intermediates: only the final model and its weights remain
    return Optimized(work.final, fusions)


@dataclass
class Parity:
    """ONNX Runtime against PyTorch on fresh inputs; what the later measurements reuse."""

    checks: dict[str, float]  # check -> max |ORT - PyTorch|
    inputs: str  # the fresh call, described
    feeds: dict[str, np.ndarray]  # the fresh inputs by graph-input name
    reference: tuple[torch.Tensor, ...]  # PyTorch's outputs on them, the active adapters applied
    session: ort.InferenceSession  # on the optimized model: opened once, timed later


def _check_parity(am: AdaptedModel, lowered: Lowered, optimized: Optimized, options: ExportOptions,
                  work: Workspace) -> Parity:
    """Raise ExportError, before anything is published, if ORT and PyTorch differ beyond atol x scale."""
    session = rt.open_session(optimized.path)
    if options.mixed:
        call, feeds, reference, checks = _mixed_parity(am, lowered, session, optimized.path)
    else:
        call, fresh, reference = _fresh_call(am, lowered, optimized.path)
        feeds = {name: t.numpy() for name, t in zip(lowered.names, fresh)}
        checks = _parity_checks(am, lowered, session, feeds, call, reference, options.merge)
    worst = max(checks.values())
    # fp32 rounding is relative: large outputs (an LM's logits) get atol per unit of their magnitude.
    scale = max([1.0, *(float(r.detach().abs().max()) for r in reference if r.numel() and r.is_floating_point())])
    if not worst <= options.atol * scale:
        raise ExportError(
            f"parity check failed: ONNX Runtime differs from PyTorch by {worst:.3e} (> atol {options.atol:g} x output "
            f"scale {scale:.3g}) on fresh inputs "
            f"{call.describe()} ({', '.join(f'{k}: {v:.3e}' for k, v in checks.items())}); nothing was written to "
            f"{work.target}. Try optimize=False, or the default opset, to find the step that changes the numbers."
        )
    return Parity(checks, call.describe(), feeds, reference, session)


def _fresh_call(am: AdaptedModel, lowered: Lowered,
                path: Path) -> tuple[Inputs, list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Fresh random inputs at new sizes (the call, its tensors) and PyTorch's outputs on them."""
    count = len(lowered.example)
    fresh, _ = _fresh_inputs(path, lowered.example, count)
    call = lowered.flat.unflatten(fresh)
    try:
        return call, fresh, flat_outputs(am(*call.args, **call.kwargs))
    except Exception:  # noqa: BLE001 - an axis named 'time' was features after all: vary the batch only
        fresh, _ = _fresh_inputs(path, lowered.example, count, ("batch",))
        call = lowered.flat.unflatten(fresh)
        return call, fresh, flat_outputs(am(*call.args, **call.kwargs))


def _mixed_parity(am: AdaptedModel, lowered: Lowered, session: ort.InferenceSession,
                  path: Path) -> tuple[Inputs, dict[str, np.ndarray], tuple[torch.Tensor, ...], dict[str, float]]:
    """A fresh batch whose rows cycle through the adapters and the base (as -1), against PyTorch's mixed
    batch (``adapter_names``); and every row at -1 against the base model."""
    from adaptc.mixed_batch import BASE, batch_size_of

    count = len(lowered.example) - 1  # the model's inputs; adapter_index is the last
    fresh, _ = _fresh_inputs(path, lowered.example[:count], count)
    call = lowered.flat.unflatten(fresh)
    rows = batch_size_of(call.args, call.kwargs) or 1
    stacked = lowered.stacked
    index = [i % (len(stacked) + 1) for i in range(rows)]
    index = np.array([-1 if i == len(stacked) else i for i in index], dtype=np.int64)
    feeds = {name: t.numpy() for name, t in zip(lowered.names, fresh)}
    mixed = flat_outputs(am(*call.args, **call.kwargs, adapter_names=[stacked[i] if i >= 0 else BASE for i in index]))
    checks = {"mixed rows": _max_diff(rt.run(session, {**feeds, ADAPTER_INDEX: index}), mixed, lowered.outs)}
    with am.disable_adapters():
        base = flat_outputs(am(*call.args, **call.kwargs))
    checks["every row -1 (base)"] = _max_diff(rt.run(session, {**feeds, ADAPTER_INDEX: np.full(rows, -1, np.int64)}),
                                              base, lowered.outs)
    return call, {**feeds, ADAPTER_INDEX: index}, mixed, checks


def _parity_checks(am: AdaptedModel, lowered: Lowered, session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                   call: Inputs, reference: tuple[torch.Tensor, ...], merge: bool) -> dict[str, float]:
    """Merged: one check. Unmerged: the active adapters through their files, and no adapter at all."""
    if merge:
        return {"merged" if am.enabled_adapters else "base": _max_diff(rt.run(session, feeds), reference, lowered.outs)}
    loaded = {name: rt.load_adapter(file) for name, file in lowered.adapters.items()}  # each file must load
    active = [loaded[n] for n in am.enabled_adapters]
    checks = {"+".join(am.enabled_adapters) or "base": _max_diff(rt.run(session, feeds, active), reference, lowered.outs)}
    with am.disable_adapters():
        base_reference = flat_outputs(am(*call.args, **call.kwargs))
    checks["no adapter"] = _max_diff(rt.run(session, feeds), base_reference, lowered.outs)
    return checks


@dataclass
class Measurements:
    """What the report states about the checked model besides parity."""

    torch_ms: float  # median, example inputs
    ort_ms: float
    quantized: dict[str, Any] | None  # quantize='int8': its file, size and accuracy change
    opset: int  # the default ONNX domain's, as saved
    fused_ops: dict[str, int]  # com.microsoft op -> count in the saved model
    sizes: dict[str, int]  # workspace file name -> bytes: every file publish moves


def _measure(am: AdaptedModel, inputs: Inputs, lowered: Lowered, optimized: Optimized, parity: Parity,
             options: ExportOptions, work: Workspace) -> Measurements:
    """Latencies on the example inputs, the int8 model and its accuracy, what the saved files hold."""
    torch_ms = lowered.torch_ms
    if torch_ms is None:  # prompts live in the adapted model's graph, not in the base model
        torch_ms = rt.median_ms(lambda: am(*inputs.args, **inputs.kwargs), options.latency_runs)
    example_feeds = {name: t.numpy() for name, t in zip(lowered.names, lowered.example)}
    active = [rt.load_adapter(lowered.adapters[n]) for n in am.enabled_adapters] if lowered.adapters else []
    ort_ms = rt.median_ms(lambda: rt.run(parity.session, example_feeds, active), options.latency_runs)
    quantized = None
    if options.quantize == "int8":
        fp32 = rt.run(parity.session, parity.feeds)
        quantized = _quantize(optimized.path, work.folder / f"{work.target.stem}.int8.onnx", parity.feeds, fp32,
                              parity.reference, lowered.outs, options.external)
    saved = onnx.load(str(optimized.path), load_external_data=False)
    opset = next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx"))
    fused = rt.op_counts(optimized.path, rt.CONTRIB_DOMAIN)
    sizes = {f.name: f.stat().st_size for f in sorted(work.folder.iterdir()) if f.is_file()}
    return Measurements(torch_ms, ort_ms, quantized, opset, fused, sizes)


def _publish(lowered: Lowered, optimized: Optimized, parity: Parity, measured: Measurements,
             options: ExportOptions, work: Workspace) -> ExportReport:
    """Move every file into place (only now, after parity passed) and report where each went."""
    folder = work.target.parent
    files = {}
    for name, size in measured.sizes.items():
        os.replace(work.folder / name, folder / name)  # a rename within one folder: atomic
        files[str(folder / name)] = size
    quantized = measured.quantized
    if quantized:
        quantized = {**quantized, "path": str(folder / Path(quantized["path"]).name)}
    return ExportReport(
        path=str(work.target), files=files, opset=measured.opset, merged=options.merge, dynamic_axes=lowered.axes,
        fusions=optimized.fusions, fused_ops=measured.fused_ops, parity=parity.checks, parity_inputs=parity.inputs,
        ort_latency_ms=measured.ort_ms, torch_latency_ms=measured.torch_ms,
        adapters={n: str(folder / f.name) for n, f in lowered.adapters.items()}, quantized=quantized,
        mixed_adapters=list(lowered.stacked),
    )


# --- optimize and quantize: the files ------------------------------------------------------------

def _fuse_for_ort(exported: Path, final: Path, external: bool) -> dict[str, int]:
    """onnxscript's ORT fusions, then ORT's own optimizations; the fusions are dropped if ORT rejects them.
    Last, fused skip-norms are split again where that is faster on ORT's CPU provider (targets/split_skip_norm.py).

    (Measured: a fusion rule could leave a Gemm on a rank-3 input, which ORT refuses; targets/flat_gemm.py now
    prevents the cases seen, the fallback stays for the ones not seen.)
    """
    stage = exported.parent
    optimized = stage / final.name
    try:
        fused, counts = rt.fuse(exported)
        rt.save(fused, stage / "fused.onnx", external)
        del fused
        rt.optimize_saved(stage / "fused.onnx", optimized, external)
    except (ExportError, Exception):  # noqa: BLE001 - fall back to ORT's optimizer alone
        for leftover in stage.glob(optimized.name + "*"):
            leftover.unlink()
        rt.optimize_saved(exported, optimized, external)
        counts = {"onnxscript fusions skipped (ORT rejected the fused graph)": 1}
    split = 0
    if SKIP_NORMS & set(rt.op_counts(optimized, rt.CONTRIB_DOMAIN)):
        model = ir.load(optimized)
        split = split_skip_norms(model)
    if split:
        rt.save(model, final, external)
        return {**counts, "skip-norms split back (adaptc)": split}
    # Nothing to rewrite: move ORT's files instead of loading and saving the model again. Its
    # weights file, when external, is named after the model (optimize_saved), so the reference holds.
    for name in (final.name, f"{final.name}.data"):
        if (stage / name).exists():
            os.replace(stage / name, final.parent / name)
    return counts


def _quantize(source: Path, target: Path, feeds: dict, fp32: list[np.ndarray], reference: list[torch.Tensor],
              outs: list[str], external: bool) -> dict[str, Any]:
    stage = target.parent / "int8-stage"  # a folder: the export moves only the files beside the model
    stage.mkdir()
    try:
        if "Attention" in rt.op_counts(source, rt.CONTRIB_DOMAIN):  # read the model only where there is one
            model = ir.load(source)
            if unpack_attention(model):  # packed Q/K/V stay fp32 under ORT's quantizer: see targets/unpack_attention.py
                rt.save(model, stage / source.name, external)
                source = stage / source.name
            del model
        rt.quantize_int8(source, target, external)
    finally:
        shutil.rmtree(stage)
    got = rt.run(rt.open_session(target), feeds)
    change = _max_diff(got, [torch.from_numpy(v) for v in fp32], outs)
    scale = max(float(np.abs(v).max()) for v in fp32 if v.size) or 1.0
    return {
        "path": str(target), "size": target.stat().st_size, "max_abs_change": change,
        "relative_change": change / scale, "max_abs_diff_vs_torch": _max_diff(got, reference, outs),
    }
