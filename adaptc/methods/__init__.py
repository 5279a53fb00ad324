"""The method registry and the built-in methods (LoRA, prompt tuning, P-tuning, prefix tuning).

``register_method`` adds a method of your own; ``available_methods()`` lists them. See
:mod:`adaptc.methods.base` for what a method declares, and docs/extending.md for a complete one.
"""

from .base import (
    ADAPTERS_ATTR,
    AdapterBuild,
    Method,
    adapter_prefix,
    available_methods,
    config_dict,
    get_method,
    make_config,
    method_for_checkpoint,
    register_method,
)
from .lora import LoraMethod
from .prefix import PrefixMethod
from .prompt import PromptMethod, PTuningMethod

for _builtin in (LoraMethod, PromptMethod, PTuningMethod, PrefixMethod):
    register_method(_builtin)

__all__ = [
    "ADAPTERS_ATTR", "AdapterBuild", "Method", "adapter_prefix", "available_methods", "config_dict", "get_method",
    "make_config", "method_for_checkpoint", "register_method",
]
