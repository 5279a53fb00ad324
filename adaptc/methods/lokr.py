"""LoKr (low-rank Kronecker product): the method's registry entry and its config.

``adaptc.inject(model, "lokr", r=8, alpha=8, decompose_both=..., decompose_factor=...)``; PEFT's
option names, defaults and checkpoints (``peft_type: "LOKR"``). The layer is :mod:`adaptc.passes.lokr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from adaptc.errors import ConfigError
from adaptc.passes import lokr, lycoris

from .loha import peft_fields
from .lycoris import LycorisConfig, LycorisMethod, check_bool


@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr: ``dW = alpha / r * W1 (x) W2`` at every selected linear and conv site.

    ``decompose_both``: W1 as a rank-r product too (where r is below half its larger side);
    ``decompose_factor``: the size to factor each dimension by (-1: near its square root);
    ``rank_dropout_scale``: rescale the kept channels by their mean under rank dropout;
    ``init_weights``: True (W1 zero), ``"lycoris"`` (W2 zero) or False (random).
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True

    method: ClassVar[str] = "lokr"
    title: ClassVar[str] = "LoKr"

    def validate(self) -> None:
        super().validate()
        check_bool(self.decompose_both, "decompose_both")
        check_bool(self.rank_dropout_scale, "rank_dropout_scale")
        if self.init_weights not in (True, False, "lycoris") or isinstance(self.init_weights, int) and \
                not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor != -1 and factor <= 0):
            raise ConfigError(f"decompose_factor must be -1 (near the square root) or a positive integer, got {factor!r}")


class LoKrMethod(LycorisMethod):
    name = "lokr"
    config_class = LoKrConfig
    peft_types = ("LOKR",)
    param_prefix = "lokr_"

    supports = staticmethod(lycoris.supports)

    def make_layer(self, site: Any, config: LoKrConfig) -> lokr.LoKrLayer:
        return lokr.LoKrLayer(site, config.rank_for(site.name), config.alpha_for(site.name), config.rank_dropout,
                              config.module_dropout, config.rank_dropout_scale, config.decompose_both,
                              config.decompose_factor, config.use_effective_conv2d)

    def shapes(self, site: Any, config: LoKrConfig) -> dict[str, tuple[int, ...]]:
        return lokr.lokr_shapes(site, config.rank_for(site.name), config.decompose_both, config.decompose_factor,
                                config.use_effective_conv2d)

    def peft_fields(self, config: LoKrConfig, sites: list) -> dict[str, Any]:
        return peft_fields(config, sites) | {
            "decompose_both": config.decompose_both, "decompose_factor": config.decompose_factor,
            "rank_dropout_scale": config.rank_dropout_scale,
        }
