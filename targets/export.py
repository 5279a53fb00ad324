"""The ONNX export's entry point: one forward pass (targets/onnx.py) or, with ``task="text-generation"``,
a decoder folder with a key/value cache (targets/onnx_decoder.py, which builds on onnx.py).

The choice lives here, above both, so that neither of the two modules imports the other in a circle.
"""

from __future__ import annotations

import os
from typing import Any

from adaptc.errors import ExportError

from . import onnx as single
from .onnx_decoder import TASK, check_folder, export_decoder

__all__ = ["TASK", "check_folder", "export_onnx"]


def export_onnx(
    am: Any,
    path: str | os.PathLike,
    example_inputs: Any = None,
    merge: bool = True,
    optimize: bool = True,
    opset: int | None = None,
    quantize: str | None = None,
    *,
    task: str | None = None,
    tokenizer: Any = None,
    mixed_adapters: bool = False,
    external_data: bool | None = None,
    atol: float = 1e-4,
    **options: Any,
) -> Any:
    """``task=None``: ``targets.onnx.export_onnx`` (one forward pass, an ExportReport).
    ``task="text-generation"``: ``path`` is a folder, written by ``targets.onnx_decoder.export_decoder`` (a
    decoder with a key/value cache, ``genai_config.json`` and ``tokenizer``'s files; a DecoderReport)."""
    if task is None:
        if tokenizer is not None:
            raise ExportError("tokenizer= is for task='text-generation' (a folder onnxruntime-genai runs)")
        return single.export_onnx(
            am,
            path,
            example_inputs,
            merge,
            optimize,
            opset,
            quantize,
            external_data=external_data,
            atol=atol,
            mixed_adapters=mixed_adapters,
            **options,
        )
    if task != TASK:
        raise ExportError(
            f"task must be None (one forward pass) or {TASK!r} (a decoder with a key/value cache), got {task!r}"
        )
    if example_inputs is not None or options:
        given = ["example_inputs"] * (example_inputs is not None) + sorted(options)
        raise ExportError(
            f"{', '.join(given)}: not options of task={TASK!r} (its example call is built from the "
            "model's config); leave them out"
        )
    return export_decoder(
        am,
        path,
        merge,
        optimize,
        opset,
        quantize,
        tokenizer=tokenizer,
        external_data=external_data,
        atol=atol,
        mixed_adapters=mixed_adapters,
    )
