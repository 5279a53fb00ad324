"""The ONNX Runtime side of lowering: fusions, ORT graph optimization, sessions, LoRA adapter
files, int8 quantization, and the small measurements the export report carries.

Fusions come from ``onnxscript.rewriter.ort_fusions``: ``onnxruntime.transformers``'
``optimize_model`` does not fuse attention in dynamo exports (and crashes on GPT-2; see
docs/export.md). ORT's own optimizer then runs at the *extended* level and its result is saved:
that level's fusions are portable, whereas the *all* level adds layout changes specific to
the machine that ran it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from adaptc.errors import ExportError

from .flat_gemm import unflatten_gemms
from .linear_rules import prefiltered_default_rules
from .mha_bias import true_bias_mha
from .no_gqa import without_gqa
from .rope_angles import expand_rotary_positions, rope_angles_as_matmul

CONTRIB_DOMAIN = "com.microsoft"
EXTERNAL_MIN_BYTES = 1024  # initializers from this size go to the .data file when data is external


def fuse(path: Path) -> tuple[ir.Model, dict[str, int]]:
    """onnxscript's ORT fusions (attention, layer norm, GELU, rotary ...) of the model at ``path``; counts of
    those applied.

    With the rotary embedding fused, onnxscript would also fuse grouped-query attention into ORT's
    ``GroupQueryAttention``, which rotates inside the kernel at positions it derives from per-row
    sequence lengths, not from transformers' position ids (and failed on a batch the export had not
    seen): :func:`~adaptc.targets.no_gqa.without_gqa` turns that fusion off, so grouped-query models
    get ``RotaryEmbedding`` + ``MultiHeadAttention`` as the others do. Should an onnxscript fuse one
    anyway, the model is fused again with its rotary embedding left unfused (positions exactly as
    transformers computes them).
    """
    model, counts = _fuse(ir.load(path), rope=True)
    if counts.get("gqa"):
        model, counts = _fuse(ir.load(path), rope=False)
    return model, counts


def _fuse(model: ir.Model, rope: bool) -> tuple[ir.Model, dict[str, int]]:
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns for every LoRA input it must not deduplicate
    try:
        unflatten_gemms(model)  # GPT-2's Conv1D: without it the attention fusion breaks the graph
        if rope:
            rope_angles_as_matmul(model)  # RoPE angles in the spelling the rotary fusion matches
        inputs = list(model.graph.inputs)
        # prefiltered: onnxscript's multi-output matcher is quadratic otherwise; true_bias_mha: its MHA bias
        # fusion would take an unmerged LoRA's per-token delta for the attention's 1-D bias; without_gqa:
        # ORT's GroupQueryAttention takes positions from sequence lengths, not transformers' position ids
        with prefiltered_default_rules(), true_bias_mha(), without_gqa():
            model, counts = optimize_for_ort(model)
        _restore_inputs(model, inputs)
        expand_rotary_positions(model)
    finally:
        quiet.setLevel(level)
    return model, {name: n for name, n in counts.items() if n}


def _restore_inputs(model: ir.Model, inputs: list[ir.Value]) -> None:
    """Put back the graph inputs that have a default initializer: optimize_for_ort ends by dropping
    such inputs, and an unmerged export's LoRA weights are exactly that (ORT adapters feed them)."""
    graph = model.graph
    if list(graph.inputs) == inputs:
        return
    kept = [v for v in inputs if v in graph.inputs or graph.initializers.get(v.name) is v]
    graph.inputs.clear()
    graph.inputs.extend(kept)


def save(model: ir.Model, path: Path, external: bool) -> None:
    """Write ``model``; with ``external`` its weights go to ``<name>.data`` beside it."""
    if external:
        ir.save(model, path, external_data=f"{path.name}.data", size_threshold_bytes=EXTERNAL_MIN_BYTES)
    else:
        ir.save(model, path)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
    return options


def optimize_saved(source: Path, target: Path, external: bool) -> None:
    """Run ORT's extended graph optimizations on ``source`` and save the result at ``target``."""
    options = session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{target.name}.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
        )
    open_session(source, options)


def open_session(path: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session, or an ExportError saying why ORT cannot load the model."""
    try:
        return ort.InferenceSession(str(path), options or session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, all with the reason in the text
        opsets = {o.domain or "ai.onnx": o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
        raise ExportError(
            f"ONNX Runtime {ort.__version__} cannot load the exported model (opsets {opsets}): "
            f"{_first_line(exc)}. Export at the default opset (opset=None) or one this ONNX Runtime supports."
        ) from exc


def run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], adapters: Sequence[ort.LoraAdapter] = ()
) -> list[np.ndarray]:
    options = ort.RunOptions()
    for adapter in adapters:
        options.add_active_adapter(adapter)
    try:
        return session.run(None, feeds, options)
    except Exception as exc:
        raise ExportError(
            f"ONNX Runtime {ort.__version__} failed running the exported model: {_first_line(exc)}. "
            "If an opset was given, try the default (opset=None)."
        ) from exc


def op_counts(path: Path, domain: str | None = None) -> dict[str, int]:
    """Node counts by op type (of one domain when given), subgraphs included."""
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if domain is None or node.domain == domain:
                counts[node.op_type] += 1
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    return dict(sorted(counts.items()))


# --- LoRA adapters ----------------------------------------------------------------------------

def write_adapter(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One ``.onnx_adapter`` file: tensors by graph-input name, for RunOptions.add_active_adapter."""
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t)) for name, t in tensors.items()})
    adapter.export_adapter(str(path))


def load_adapter(path: Path) -> ort.LoraAdapter:
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    return adapter


# --- quantization ------------------------------------------------------------------------------

def quantize_int8(source: Path, target: Path, external: bool) -> None:
    """ORT dynamic quantization: int8 weights, activations quantized per call."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing tip on the root logger every call
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, use_external_data_format=external)
    except Exception as exc:
        raise ExportError(f"int8 quantization failed: {_first_line(exc)}") from exc
    finally:
        root.setLevel(level)


# --- measurements ------------------------------------------------------------------------------

def median_ms(fn: Callable[[], object], runs: int, budget_s: float = 2.0) -> float:
    """Median wall time of ``fn`` in milliseconds, after one warm-up; stops early past ``budget_s``."""
    fn()
    times = []
    start = time.perf_counter()
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 1000 * statistics.median(times)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]
