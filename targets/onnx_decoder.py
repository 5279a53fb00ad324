"""Export a causal LM as an ONNX decoder with a key/value cache, for ONNX Runtime and onnxruntime-genai.

One graph serves the whole generation: the prompt (past length 0) and every new token (past
length ``n``). It is the graph ``am.generate`` runs at a decoding step (captured with
transformers' ``DynamicCache`` as graph input and output, :mod:`adaptc.cached_generation`),
lowered with plain tensors in and out under the names Optimum and onnxruntime-genai use::

    input_ids [batch, sequence], attention_mask [batch, total_sequence], position_ids [batch, sequence],
    past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_size]
    -> logits [batch, sequence, vocab], present.{i}.key / .value [batch, kv_heads, total_sequence, head_size]

Nothing here names an architecture: the cache's layout is read from the cache the model fills.
Adapters are merged, or kept as ``<adapter>.onnx_adapter`` files exactly as ``targets.onnx`` does
for a single forward (``merge=False``), so onnxruntime-genai and ``RunOptions.add_active_adapter``
switch them per request. The folder gets ``genai_config.json`` (:mod:`.genai_config`) and, given a
tokenizer, its files. Files are written in a temporary folder and moved into place only after the
parity check (ORT against ``am`` with its cache, prefill then decoding steps) has passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import nn

from adaptc import cached_generation
from adaptc.errors import ExportError, InputError
from adaptc.inputs import Inputs
from adaptc.methods import get_method
from adaptc.mixed_batch import BASE
from adaptc.model import AdaptedModel

from . import genai_config
from . import onnx as single
from . import ort as rt
from .decoder_loop import empty_past, greedy, presents_as_past, step_feeds
from .flat import FlatCall
from .merge import merged_weights
from .onnx_mixed import IndexedCall, stackable_adapters, stacked_adapters_graph

TASK = "text-generation"
MIXED_INPUT = "adapter_index"  # targets/onnx_mixed.py's input: one adapter per row
MIXED_FILE = "mixed_adapters.json"  # the folder's adapter_index -> adapter table
QUANTIZE = (None, "int8", "int4")
MODEL_FILE = "model.onnx"
_EXAMPLE = {"batch": 2, "past": 4, "sequence": 3}  # sizes >= 2: torch.export specialises 0 and 1
_CHECK = {"batch": 3, "prompt": 5, "steps": 3}  # the parity check's sizes, other than the export's


@dataclass
class DecoderReport:
    """What ``export_onnx(..., task="text-generation")`` wrote and checked."""

    folder: str
    files: dict[str, int]  # path -> bytes
    merged: bool
    layers: int
    kv_heads: int
    head_size: int
    fusions: dict[str, int]  # onnxscript ORT fusion rule -> times applied
    fused_ops: dict[str, int]  # com.microsoft op -> count in the saved model
    parity: dict[str, float]  # check -> max |ORT logits - PyTorch logits| over the prefill and decoding steps
    adapters: dict[str, str] = field(default_factory=dict)  # merge=False: adapter -> .onnx_adapter file
    genai_config: str | None = None
    tokenizer_files: list[str] = field(default_factory=list)
    quantized: dict[str, Any] | None = None  # kind, greedy token agreement with fp32, max logit change
    mixed_adapters: list[str] = field(default_factory=list)  # mixed_adapters=True: adapter_index value -> adapter
    warnings: list[str] = field(default_factory=list)

    @property
    def parity_max_abs_diff(self) -> float:
        return max(self.parity.values())

    def summary(self) -> str:
        kind = "merged" if self.merged else f"unmerged, {len(self.adapters)} ORT adapter file(s)"
        if self.mixed_adapters:
            kind = (f"{len(self.mixed_adapters)} adapters stacked, {MIXED_INPUT}: "
                    f"{', '.join(f'{i}={n}' for i, n in enumerate(self.mixed_adapters))}, -1=base")
        lines = [f"wrote {self.folder} (decoder with a key/value cache, {kind}; "
                 f"{self.layers} layers, {self.kv_heads} kv heads x {self.head_size})"]
        lines += [f"  {Path(f).name}: {size:,} bytes" for f, size in self.files.items()]
        lines.append(f"  onnxscript fusions: {', '.join(f'{k}={v}' for k, v in self.fusions.items()) or 'none applied'}")
        lines.append(f"  fused ops: {', '.join(f'{k}={v}' for k, v in self.fused_ops.items()) or 'none'}")
        checks = ", ".join(f"{k} {v:.2e}" for k, v in self.parity.items())
        lines.append(f"  parity (max abs logit diff vs am with its cache, prefill + decoding steps): {checks}")
        if self.quantized:
            q = self.quantized
            lines.append(f"  {q['kind']}: greedy tokens agree with fp32 on {q['token_agreement']:.0%} of "
                         f"{q['tokens']} new tokens; max abs logit change {q['max_abs_change']:.3e}")
        if self.genai_config is None:
            lines.append("  no genai_config.json: keys and values of different head sizes")
        lines += [f"  note: {w}" for w in self.warnings]
        return "\n".join(lines)

    __str__ = summary


# --- checks before any work ---------------------------------------------------------------------

def check_folder(folder: str | os.PathLike) -> Path:
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"the text-generation export writes a folder: pass its path, got {type(folder).__name__}")
    target = Path(folder)
    if target.suffix == ".onnx":
        raise ExportError(f"task='text-generation' writes a folder (model.onnx, genai_config.json, ...), got "
                          f"{str(folder)!r}; pass a folder path such as 'out/'")
    if target.exists() and not target.is_dir():
        raise ExportError(f"cannot write the folder {target}: a file of that name exists")
    parent = target if target.is_dir() else target.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {target}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {target}: folder {parent} is not writable; choose another path")
    return target


def check_decoder(am: AdaptedModel, merge: bool, quantize: str | None, mixed: bool = False) -> None:
    """Everything that would stop the export, before any capture or file."""
    if not isinstance(merge, bool) or not isinstance(mixed, bool):
        raise ExportError(f"merge and mixed_adapters must be True or False, got {merge!r}, {mixed!r}")
    if mixed:
        if quantize:
            raise ExportError(f"quantize={quantize!r} applies to a merged export; a mixed-adapter graph keeps its "
                              "adapters (leave quantize None)")
        stackable_adapters(am)  # a ConfigError naming an adapter that cannot be stacked
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be None, 'int8' or 'int4' for task='text-generation', got {quantize!r}")
    if quantize and not merge:
        raise ExportError(f"quantize={quantize!r} applies to a merged export; use merge=True "
                          "(adapters cannot be hot-swapped into quantized weights)")
    held = [n for n, c in am.adapter_configs().items() if _method(c).merge != "weights"]
    if held:
        raise ExportError(
            f"adapter {held[0]!r} is a {_method(am.adapter_configs()[held[0]]).name!r} adapter: the text-generation "
            "export takes adapters that live in the weights (LoRA, DoRA); export it with task=None (one forward)"
        )
    if not merge and not mixed:
        single._check_unmerged_methods(am, merge)  # adapter files: the methods whose tensors are graph inputs
    blocker = cached_generation.cache_blocker(am, 0)
    if blocker is not None:
        raise ExportError(
            f"cannot export {type(am.base_model).__name__} as a decoder with a key/value cache: {blocker}. "
            "Export one forward pass instead (task=None), which recomputes the sequence per token"
        )
    if not isinstance(getattr(getattr(am.base_model, "config", None), "vocab_size", None), int):
        raise ExportError(f"{type(am.base_model).__name__}'s config has no vocab_size: the decoder export needs it")


def _method(config: Any) -> Any:
    return get_method(config)


# --- the example call: a cache of past length 4, three new tokens ---------------------------------

@dataclass
class Layout:
    """The cache as the model fills it: read, not assumed."""

    layers: int
    kv_heads: int
    head_size: int
    value_head_size: int
    windows: list[int | None]  # a sliding-window layer's window, per layer
    cache_name: str  # the forward's keyword: past_key_values or cache
    keywords: list[str]  # of input_ids, attention_mask, position_ids: those the forward takes

    @property
    def window(self) -> int | None:
        windows = [w for w in self.windows if w]
        return min(windows) if windows else None


def _forward_parameters(base: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(base.forward).parameters)


def _prefilled_cache(base: nn.Module, ids: torch.Tensor, cache_name: str) -> Any:
    """The base model's own cache after ``ids`` (eager, unadapted: only the layout and sizes matter)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(input_ids=ids, use_cache=True, **{cache_name: cache})
    return cache


def example_call(am: AdaptedModel) -> tuple[Inputs, Layout]:
    """The decoding call the graph is captured and exported from, and the cache's layout."""
    base = am.base_model
    batch, past, new = _EXAMPLE["batch"], _EXAMPLE["past"], _EXAMPLE["sequence"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, past + new), generator=generator)
    cache_name = cached_generation._cache_parameter(base) or "past_key_values"
    cache = _prefilled_cache(base, ids[:, :past], cache_name)
    layers = cache.layers
    keys, values = layers[0].keys, layers[0].values
    if any(layer.keys is None or layer.keys.shape[-2] != past for layer in layers):
        raise ExportError(f"{type(base).__name__} does not keep every layer's keys in its cache: the decoder export "
                          "needs one key/value pair per layer")
    parameters = _forward_parameters(base)
    keywords = ["input_ids"] + [k for k in ("attention_mask", "position_ids") if k in parameters]
    kwargs: dict[str, Any] = {"input_ids": ids[:, past:].contiguous()}
    if "attention_mask" in keywords:
        kwargs["attention_mask"] = torch.ones(batch, past + new, dtype=torch.long)
    if "position_ids" in keywords:
        kwargs["position_ids"] = torch.arange(past, past + new).expand(batch, new).contiguous()
    kwargs[cache_name] = cache
    kwargs["use_cache"] = True
    kwargs = cached_generation.cache_keywords(base, kwargs)
    layout = Layout(len(layers), keys.shape[1], keys.shape[-1], values.shape[-1],
                    [getattr(layer, "sliding_window", None) for layer in layers], cache_name, keywords)
    return Inputs((), kwargs), layout


def io_names(layout: Layout) -> tuple[list[str], list[str]]:
    """Graph inputs in the example's leaf order (keywords, then every layer's key, then values) and outputs."""
    n = layout.layers
    past = [f"past_key_values.{i}.key" for i in range(n)] + [f"past_key_values.{i}.value" for i in range(n)]
    present = [f"present.{i}.key" for i in range(n)] + [f"present.{i}.value" for i in range(n)]
    return layout.keywords + past, ["logits"] + present


def _dynamic_shapes(example: list[torch.Tensor], names: list[str]) -> list[dict[int, Any]]:
    """Batch and lengths dynamic; heads and head size fixed (the weights fix them)."""
    auto = torch.export.Dim.AUTO
    return [{0: auto, 2: auto} if name.startswith("past_key_values.") else {0: auto, 1: auto}
            if tensor.dim() == 2 else {} for tensor, name in zip(example, names)]


_AXES = {"input_ids": ("batch", "sequence"), "position_ids": ("batch", "sequence"),
         "attention_mask": ("batch", "total_sequence"), MIXED_INPUT: ("batch",)}


def _name_dims(model: ir.Model, names: list[str], slots: list[single.Slot]) -> None:
    """The exporter's symbols (s0, s17 ...) renamed batch, sequence, past_sequence, total_sequence, <adapter>.rank."""
    rename: dict[str, str] = {}
    slot_names = {s.input_name: s.input_name.rsplit(".", 1)[0] + ".rank" for s in slots}
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for axis, dim in enumerate(value.shape.dims):
            if not isinstance(dim, ir.SymbolicDim) or dim.value is None or dim.value in rename:
                continue
            if value.name in _AXES:
                rename[dim.value] = _AXES[value.name][axis]
            elif value.name.startswith("past_key_values."):
                rename[dim.value] = ("batch", None, "past_sequence")[axis] or dim.value
            elif value.name in slot_names:
                rename[dim.value] = slot_names[value.name]
    if not rename:
        return
    token = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")

    def renamed(shape: ir.Shape) -> ir.Shape:
        return ir.Shape([ir.SymbolicDim(token.sub(lambda m: rename[m.group(1)], d.value))
                         if isinstance(d, ir.SymbolicDim) and d.value is not None else d for d in shape.dims])

    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    for value in values:
        if value.shape is not None:
            value.shape = renamed(value.shape)
    for value in model.graph.outputs:  # sequence + past_sequence is the mask's length: say so
        if value.name.startswith("present.") and value.shape is not None:
            dims = list(value.shape.dims)
            dims[2] = ir.SymbolicDim("total_sequence")
            value.shape = ir.Shape(dims)


# --- the stages -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _workspace(target: Path) -> Iterator[Path]:
    parent = target if target.is_dir() else target.parent
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.adaptc-", dir=parent))
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}; choose a writable folder") from exc
    try:
        (folder / "stage").mkdir()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Lowered:
    path: Path
    names: list[str]
    outs: list[str]
    slots: list[single.Slot]
    adapters: dict[str, Path]
    layout: Layout
    mixed: list[str] = field(default_factory=list)  # adapter_index value -> adapter


def _lower(am: AdaptedModel, merge: bool, opset: int | None, external: bool, work: Path,
           mixed: bool = False) -> Lowered:
    inputs, layout = example_call(am)
    graph = am.graph_for(inputs)
    slots = [] if merge or mixed else single._slots(am)
    names, outs = io_names(layout)
    stacked = None
    if mixed:  # every adapter stacked, one per row (targets/onnx_mixed.py)
        stacked = stacked_adapters_graph(am, graph)
    context = contextlib.nullcontext() if mixed else merged_weights(am) if merge else single._every_layer_live(am)
    with context:
        flat = FlatCall(stacked.module if stacked else graph, inputs, [s.graph_path for s in slots])
        example = flat.example_tensors()
        if len(example) != len(names):
            raise ExportError(f"the decoding call has {len(example)} tensors, expected {len(names)} "
                              f"({', '.join(layout.keywords)} and {layout.layers} key/value pairs)")
        extra = [s.value for s in slots]
        extra_shapes = [{s.rank_axis: torch.export.Dim.AUTO} if s.rank_axis is not None else None for s in slots]
        extra_names = [s.input_name for s in slots]
        module: nn.Module = flat
        if stacked is not None:
            module = IndexedCall(flat, stacked, batch_input=0)
            extra, extra_shapes, extra_names = [stacked.index_for([stacked.adapters[0], None])], [{0: torch.export.Dim.AUTO}], [MIXED_INPUT]
        got = module(*example, *extra)
        if len(got) != len(outs):
            raise ExportError(f"{type(am.base_model).__name__} returns {len(got)} tensors at a decoding step, expected "
                              f"the logits and {layout.layers} key/value pairs; the decoder export cannot name them")
        model = single._torch_export(module, example + extra, _dynamic_shapes(example, names) + extra_shapes,
                                     names + extra_names, outs, opset)
        _name_dims(model, names, slots)
        if slots:
            single._add_defaults(model, slots)
        path = work / "stage" / "exported.onnx"
        rt.save(model, path, external)  # inside the block: the initializers read the (merged) weights lazily
    adapters = {}
    for name in ([] if merge else am.adapters):
        adapters[name] = work / f"{name}.onnx_adapter"
        rt.write_adapter(adapters[name], {s.input_name: s.value.float().numpy() for s in slots if s.adapter == name})
    return Lowered(path, names, outs, slots, adapters, layout, list(stacked.adapters) if stacked else [])


def _optimize(lowered: Lowered, work: Path, external: bool, fuse: bool) -> dict[str, int]:
    """onnxscript's ORT fusions then ORT's extended optimizations (``fuse=False``: ORT's alone) into MODEL_FILE."""
    final = work / MODEL_FILE
    for old in (final, work / f"{MODEL_FILE}.data"):
        old.unlink(missing_ok=True)
    if fuse:
        return single._fuse_for_ort(lowered.path, final, external)
    rt.optimize_saved(lowered.path, final, external)
    return {}


def _ort_steps(session: ort.InferenceSession, ids: torch.Tensor, steps: int,
               adapters: list[ort.LoraAdapter], extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Last-position logits of the prompt step, then of each forced next token (the reference's)."""
    names = {v.name for v in session.get_inputs()}
    outs = [o.name for o in session.get_outputs()]
    prompt = ids.shape[1] - steps
    options = ort.RunOptions()
    for adapter in adapters:
        options.add_active_adapter(adapter)
    past = empty_past(session, ids.shape[0])
    logits = []
    new = ids[:, :prompt].numpy()
    for step in range(steps + 1):
        length = prompt + step
        mask = np.ones((ids.shape[0], length), np.int64)
        feeds = {**step_feeds(names, new, mask, past), **(extra or {})}
        result = dict(zip(outs, session.run(None, feeds, options)))
        logits.append(result["logits"])
        past = presents_as_past(result)
        if step < steps:
            new = ids[:, length:length + 1].numpy()
    return logits


def _torch_steps(am: AdaptedModel, layout: Layout, ids: torch.Tensor, steps: int,
                 rows: list[str] | None = None) -> list[np.ndarray]:
    """The same steps through ``am`` with transformers' cache (the graphs am.generate runs)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=am.base_model.config)
    prompt = ids.shape[1] - steps
    logits = []
    for step in range(steps + 1):
        start, end = (0, prompt) if step == 0 else (prompt + step - 1, prompt + step)
        kwargs: dict[str, Any] = {"input_ids": ids[:, start:end].contiguous(), layout.cache_name: cache,
                                  "use_cache": True}
        if "attention_mask" in layout.keywords:
            kwargs["attention_mask"] = torch.ones(ids.shape[0], end, dtype=torch.long)
        if "position_ids" in layout.keywords:
            kwargs["position_ids"] = torch.arange(start, end).expand(ids.shape[0], end - start).contiguous()
        if rows is not None:
            kwargs["adapter_names"] = rows  # PyTorch's mixed batch: row i runs adapter rows[i]
        logits.append(am(**kwargs).logits.float().numpy())
    return logits


def _max_diff(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            raise ExportError(f"parity check failed: ONNX Runtime's logits are {a.shape}, PyTorch's {b.shape}")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max(initial=0.0)))
    return worst


def _check_parity(am: AdaptedModel, lowered: Lowered, path: Path, merge: bool, atol: float) -> dict[str, float]:
    """Prefill (past length 0) then decoding steps at another batch and length than the export's."""
    session = rt.open_session(path)
    vocab = am.base_model.config.vocab_size
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (_CHECK["batch"], _CHECK["prompt"] + _CHECK["steps"]), generator=generator)
    checks: dict[str, float] = {}
    if lowered.mixed:
        return _check_mixed_parity(am, lowered, session, ids, atol)
    with torch.no_grad():
        reference = _torch_steps(am, lowered.layout, ids, _CHECK["steps"])
        adapters = [] if merge else [rt.load_adapter(lowered.adapters[n]) for n in am.enabled_adapters]
        label = "merged" if merge and am.enabled_adapters else "+".join(am.enabled_adapters) or "base"
        checks[label] = _max_diff(_ort_steps(session, ids, _CHECK["steps"], adapters), reference)
        if not merge:
            with am.disable_adapters():
                base_reference = _torch_steps(am, lowered.layout, ids, _CHECK["steps"])
            checks["no adapter"] = _max_diff(_ort_steps(session, ids, _CHECK["steps"], []), base_reference)
    scale = max(1.0, *(float(np.abs(r).max()) for r in reference))
    worst = max(checks.values())
    if not worst <= atol * scale:
        raise ParityError(worst, atol, scale, checks)
    return checks


def _check_mixed_parity(am: AdaptedModel, lowered: Lowered, session: ort.InferenceSession, ids: torch.Tensor,
                        atol: float) -> dict[str, float]:
    """Rows of the first adapter, the base model and the last adapter in one batch, against PyTorch's mixed batch."""
    names = lowered.mixed
    rows = [names[0], BASE, names[-1]]
    index = np.array([0, len(names), len(names) - 1], np.int64)
    reference = _torch_steps(am, lowered.layout, ids, _CHECK["steps"], rows)
    got = _ort_steps(session, ids, _CHECK["steps"], [], {MIXED_INPUT: index})
    checks = {f"mixed rows {'/'.join(r if r != BASE else 'base' for r in rows)}": _max_diff(got, reference)}
    scale = max(1.0, *(float(np.abs(r).max()) for r in reference))
    if not checks[next(iter(checks))] <= atol * scale:
        raise ParityError(max(checks.values()), atol, scale, checks)
    return checks


class ParityError(ExportError):
    def __init__(self, worst: float, atol: float, scale: float, checks: dict[str, float]) -> None:
        super().__init__(
            f"parity check failed: ONNX Runtime's logits differ from PyTorch's (with its cache) by {worst:.3e} "
            f"(> atol {atol:g} x logit scale {scale:.3g}) over a prompt and {_CHECK['steps']} decoding steps "
            f"({', '.join(f'{k}: {v:.3e}' for k, v in checks.items())}); nothing was written. Try optimize=False"
        )


# --- quantization ----------------------------------------------------------------------------------

def _quantize(kind: str, path: Path, work: Path, external: bool, vocab: int) -> dict[str, Any]:
    """Replace MODEL_FILE by its int8 (dynamic) or 4-bit (MatMulNBits) version; how far greedy decoding moves."""
    quantized = work / "stage" / f"model.{kind}.onnx"
    if kind == "int8":
        rt.quantize_int8(path, quantized, external)
    else:
        _quantize_int4(path, quantized, external)
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, vocab, (1, 8), generator=generator)
    fp32, fp32_logits = greedy(rt.open_session(path), prompt.numpy(), 32)
    low, low_logits = greedy(rt.open_session(quantized), prompt.numpy(), 32)
    agree = float(np.mean(fp32[0, 8:] == low[0, 8:]))
    change = _max_diff(low_logits[:1], fp32_logits[:1])  # the prompt step: the same inputs for both
    for name in (MODEL_FILE, f"{MODEL_FILE}.data"):
        (work / name).unlink(missing_ok=True)
    for file in quantized.parent.glob(quantized.name + "*"):
        os.replace(file, work / file.name.replace(quantized.name, MODEL_FILE))
    if external and (work / f"{MODEL_FILE}.data").exists():
        _point_external_data(work / MODEL_FILE, f"{quantized.name}.data", f"{MODEL_FILE}.data")
    return {"kind": kind, "token_agreement": agree, "tokens": 32, "max_abs_change": change}


def _quantize_int4(source: Path, target: Path, external: bool) -> None:
    """ORT's 4-bit weight-only quantizer (MatMulNBits, block 32, symmetric) on every MatMul with a constant weight."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=32, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=external)
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many kinds
        raise ExportError(f"4-bit quantization failed: {rt._first_line(exc)}; use quantize='int8' or None") from exc
    finally:
        root.setLevel(level)


def _point_external_data(model_path: Path, old: str, new: str) -> None:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(model, str(model_path))


# --- the entry point --------------------------------------------------------------------------------

def export_decoder(
    am: AdaptedModel,
    folder: str | os.PathLike,
    merge: bool = True,
    optimize: bool = True,
    opset: int | None = None,
    quantize: str | None = None,
    *,
    tokenizer: Any = None,
    external_data: bool | None = None,
    atol: float = 1e-4,
    mixed_adapters: bool = False,
) -> DecoderReport:
    """Export ``am`` (a causal LM) to ``folder`` as a decoder with a key/value cache for ONNX Runtime.

    The folder holds ``model.onnx``, ``genai_config.json`` (``onnxruntime_genai.Model(folder)`` runs it),
    the tokenizer's files when ``tokenizer`` (a transformers tokenizer) is given, and with ``merge=False``
    one ``<adapter>.onnx_adapter`` per adapter. ``quantize``: ``'int8'`` (ORT dynamic quantization) or
    ``'int4'`` (ORT's MatMulNBits weight-only quantizer) replaces the model by its quantized version and
    reports its greedy token agreement with fp32. ``mixed_adapters=True`` stacks every LoRA adapter in the
    graph (targets/onnx_mixed.py) with an ``adapter_index`` input [batch], one adapter per row (``-1``: the
    base model), written down in ``mixed_adapters.json``; the session loop of :mod:`adaptc.ort` feeds it
    (onnxruntime-genai knows no such input). Raises ExportError, writing nothing, when ORT's logits
    differ from ``am``'s (with its cache) by more than ``atol`` x the logits' magnitude.
    """
    if not isinstance(am, AdaptedModel):
        raise InputError(f"export_onnx takes an AdaptedModel (from adaptc.inject), got {type(am).__name__}")
    target = check_folder(folder)
    single._check_options(True, None, opset, atol)
    check_decoder(am, merge, quantize, mixed_adapters)
    merge = merge and not mixed_adapters  # every adapter stays in the graph, stacked
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InputError(f"tokenizer must be a transformers tokenizer (with save_pretrained), got {type(tokenizer).__name__}")
    external = single._weights_bytes(am) > single.EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    am = single._full_precision(am, am.example_inputs, merge)  # a quantized base (QLoRA): a merged fp copy
    with _workspace(target) as work, single._eval(am), torch.no_grad():
        lowered = _lower(am, merge, opset, external, work, mixed_adapters)
        fusions = _optimize(lowered, work, external, fuse=optimize) if optimize else {}
        if not optimize:
            os.replace(lowered.path, work / MODEL_FILE)
            if external:
                os.replace(lowered.path.with_name(f"{lowered.path.name}.data"), work / f"{MODEL_FILE}.data")
                _point_external_data(work / MODEL_FILE, f"{lowered.path.name}.data", f"{MODEL_FILE}.data")
        try:
            parity = _check_parity(am, lowered, work / MODEL_FILE, merge, atol)
        except ParityError:
            if not fusions:
                raise
            # onnxscript's fusions did not keep the numbers on this graph: ORT's own optimizations only
            fusions = {**_optimize(lowered, work, external, fuse=False), "onnxscript fusions dropped (parity)": 1}
            parity = _check_parity(am, lowered, work / MODEL_FILE, merge, atol)
        quantized = _quantize(quantize, work / MODEL_FILE, work, external, am.base_model.config.vocab_size) \
            if quantize else None
        fused_ops = rt.op_counts(work / MODEL_FILE, rt.CONTRIB_DOMAIN)
        shutil.rmtree(work / "stage")
        config_file = genai_config.write(work, am.base_model, lowered.layout, MODEL_FILE)
        if lowered.mixed:
            (work / MIXED_FILE).write_text(json.dumps({MIXED_INPUT: lowered.mixed, "base": -1}, indent=2) + "\n")
        tokenizer_files = genai_config.save_tokenizer(tokenizer, work) if tokenizer is not None else []
        return _publish(work, target, am.base_model, lowered, merge, fusions, fused_ops, parity, config_file, tokenizer_files,
                        quantized)


def _publish(work: Path, target: Path, base: nn.Module, lowered: Lowered, merge: bool, fusions: dict[str, int],
             fused_ops: dict[str, int], parity: dict[str, float], config_file: Path | None,
             tokenizer_files: list[str], quantized: dict[str, Any] | None) -> DecoderReport:
    """Move every file into the folder (only now, after parity passed)."""
    target.mkdir(exist_ok=True)
    files = {}
    for file in sorted(work.iterdir()):
        if file.is_file():
            os.replace(file, target / file.name)
            files[str(target / file.name)] = (target / file.name).stat().st_size
    layout = lowered.layout
    return DecoderReport(
        folder=str(target), files=files, merged=merge, layers=layout.layers, kv_heads=layout.kv_heads,
        head_size=layout.head_size, fusions=fusions, fused_ops=fused_ops, parity=parity, mixed_adapters=lowered.mixed,
        adapters={n: str(target / f.name) for n, f in lowered.adapters.items()},
        warnings=[w for w in [genai_config.missing_eos(base)] if w],
        genai_config=str(target / config_file.name) if config_file else None,
        tokenizer_files=[str(target / n) for n in tokenizer_files], quantized=quantized,
    )
