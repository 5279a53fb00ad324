"""The method registry and the built-in methods (LoRA, prompt tuning, P-tuning, prefix tuning).

``register_method`` adds a method of your own; ``available_methods()`` lists them. See
:mod:`adaptc.methods.base` for what a method declares, and docs/extending.md for a complete one.
"""

from .adalora import AdaLoraMethod
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
from .bottleneck import BottleneckMethod
from .ia3 import IA3Method
from .ln_tuning import LNTuningMethod
from .loha import LoHaMethod
from .lokr import LoKrMethod
from .lora import LoraMethod
from .oft import OftMethod
from .prefix import PrefixMethod
from .prompt import PromptMethod, PTuningMethod
from .vera import VeraMethod

for _builtin in (LoraMethod, PromptMethod, PTuningMethod, PrefixMethod, IA3Method, LNTuningMethod, BottleneckMethod, AdaLoraMethod, OftMethod, LoHaMethod, LoKrMethod, VeraMethod):
    register_method(_builtin)

__all__ = [
    "ADAPTERS_ATTR", "AdapterBuild", "Method", "adapter_prefix", "available_methods", "config_dict", "get_method",
    "make_config", "method_for_checkpoint", "register_method",
]
