"""adaptc: a model-agnostic adapter compiler.

Capture any ``nn.Module`` as a graph, insert parameter-efficient adapters with rewrite
passes that match ops rather than module names, train them, and lower the result.
"""

from .api import inject, inspect_sites
from .capture import CapturedGraphModule, capture
from .config import LoraConfig
from .errors import AdaptcError, CaptureError, ConfigError, InputError, TargetError
from .model import AdaptedModel

__version__ = "0.1.0"

__all__ = [
    "AdaptcError",
    "AdaptedModel",
    "CaptureError",
    "CapturedGraphModule",
    "ConfigError",
    "InputError",
    "LoraConfig",
    "TargetError",
    "capture",
    "inject",
    "inspect_sites",
]
