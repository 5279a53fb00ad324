"""LoHa (low-rank Hadamard product): the method's registry entry and its config.

``adaptc.inject(model, "loha", r=8, alpha=8, target_modules=...)``; PEFT's option names, defaults
and checkpoints (``peft_type: "LOHA"``). The layer is :mod:`adaptc.passes.loha`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.passes import loha, lycoris

from .lycoris import LycorisConfig, LycorisMethod, check_bool


@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa: ``dW = alpha / r * (W1a W1b) * (W2a W2b)`` at every selected linear and conv site.

    ``use_effective_conv2d``: the CP form on convolutions with a kernel above 1 (fewer parameters);
    ``init_weights=False`` starts from a random (non-zero) update, as PEFT's does.
    """

    method: ClassVar[str] = "loha"
    title: ClassVar[str] = "LoHa"

    def validate(self) -> None:
        super().validate()
        check_bool(self.init_weights, "init_weights")


class LoHaMethod(LycorisMethod):
    name = "loha"
    config_class = LoHaConfig
    peft_types = ("LOHA",)
    param_prefix = "hada_"

    supports = staticmethod(lycoris.supports)

    def make_layer(self, site: Any, config: LoHaConfig) -> loha.LoHaLayer:
        return loha.LoHaLayer(site, config.rank_for(site.name), config.alpha_for(site.name), config.rank_dropout,
                              config.module_dropout, config.use_effective_conv2d)

    def shapes(self, site: Any, config: LoHaConfig) -> dict[str, tuple[int, ...]]:
        return loha.loha_shapes(site, config.rank_for(site.name), config.use_effective_conv2d)

    def peft_fields(self, config: LoHaConfig, sites: list) -> dict[str, Any]:
        return peft_fields(config, sites)


def peft_fields(config: LycorisConfig, sites: list) -> dict[str, Any]:
    """PEFT's config fields for LoHa (and, with LoKr's own added, LoKr): the adapted modules listed by name."""
    return {
        "peft_type": config.method.upper(), "task_type": None, "inference_mode": True,
        "r": config.r, "alpha": config.alpha, "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout, "use_effective_conv2d": config.use_effective_conv2d,
        "target_modules": [site.name for site in sites], "exclude_modules": None,
        "init_weights": config.init_weights, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": None,
    }
