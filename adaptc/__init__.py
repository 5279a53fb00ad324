"""adaptc: a model-agnostic adapter compiler.

Capture any ``nn.Module`` as a graph, insert parameter-efficient adapters with rewrite
passes that match ops rather than module names, train them, and lower the result.
"""

import os
from typing import Any

from . import ort  # adaptc.ort.generate: an exported text-generation folder under ONNX Runtime
from .api import inject, inspect_sites, load_adapter
from .capture import CapturedGraphModule, capture
from .config import LoraConfig, PrefixConfig, PromptConfig, PTuningConfig
from .errors import (
    AdaptcError,
    CaptureError,
    CheckpointError,
    ConfigError,
    ExportError,
    InputError,
    MergeError,
    TargetError,
    TrainingError,
)
from .generate import generate
from .methods import Method, available_methods, register_method
from .methods.adalora import AdaLoraConfig
from .methods.bottleneck import BottleneckConfig
from .methods.ia3_config import IA3Config
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.oft import OftConfig
from .methods.vera import VeraConfig
from .model import AdaptedModel
from .passes.quantize import QuantConfig, quantize_model
from .train import TrainConfig, TrainResult, evaluate, train
from .version import __version__


def export_onnx(
    am: Any,
    path: str | os.PathLike,
    example_inputs: Any = None,
    merge: bool = True,
    optimize: bool = True,
    opset: int | None = None,
    quantize: str | None = None,
    **options: Any,
) -> Any:
    """Merge, export to ONNX, optimize for ONNX Runtime and check parity; returns the report.

    ``task="text-generation"`` writes a folder with a decoder that keeps a key/value cache, for
    onnxruntime-genai and :mod:`adaptc.ort` (``adaptc.targets.onnx_decoder``).

    See ``adaptc.targets.export.export_onnx``. Imported lazily: onnx, onnxscript and
    onnxruntime are optional dependencies, needed only here.
    """
    from adaptc.targets.export import export_onnx as _export

    return _export(am, path, example_inputs=example_inputs, merge=merge, optimize=optimize, opset=opset,
                   quantize=quantize, **options)


__all__ = [
    "__version__",
    "AdaLoraConfig",
    "AdaptcError",
    "AdaptedModel",
    "BottleneckConfig",
    "Method",
    "CaptureError",
    "CapturedGraphModule",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "IA3Config",
    "InputError",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MergeError",
    "OftConfig",
    "PTuningConfig",
    "PrefixConfig",
    "PromptConfig",
    "TargetError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "VeraConfig",
    "available_methods",
    "capture",
    "evaluate",
    "export_onnx",
    "generate",
    "inject",
    "inspect_sites",
    "load_adapter",
    "ort",
    "QuantConfig",  # QLoRA (adaptc.passes.quantize)
    "quantize_model",
    "register_method",
    "train",
]
