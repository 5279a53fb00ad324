"""LoHa: a weight update that is the Hadamard product of two low-rank products (FedPara, LyCORIS).

``dW = scale * (W1a W1b) * (W2a W2b)`` with every factor of rank ``r``; on a convolution with a
kernel larger than 1 and ``use_effective_conv2d``, each product is a CP (Tucker) form with a small
core ``t`` over the kernel instead. Parameter names and shapes are PEFT's (``hada_w1_a``, ...), so
checkpoints are PEFT's as they are. The application and merge are shared with LoKr
(:mod:`adaptc.passes.lycoris`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lycoris import LycorisLayer, effective_conv, kaiming_
from .sites import Site


def loha_shapes(site: Site, r: int, use_effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
    """The parameters a rank-``r`` LoHa adds at ``site``, by PEFT's names."""
    out = site.out_features
    if site.kind == "linear":
        return {"hada_w1_a": (out, r), "hada_w1_b": (r, site.in_features),
                "hada_w2_a": (out, r), "hada_w2_b": (r, site.in_features)}
    per_group = site.weight_shape[1]  # in_channels // groups
    kernel = tuple(site.weight_shape[2:])
    if effective_conv(site, use_effective_conv2d):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        return {"hada_t1": core, "hada_w1_a": (r, out), "hada_w1_b": (r, per_group),
                "hada_t2": core, "hada_w2_a": (r, out), "hada_w2_b": (r, per_group)}
    flat = per_group * math.prod(kernel)
    return {"hada_w1_a": (out, r), "hada_w1_b": (r, flat), "hada_w2_a": (out, r), "hada_w2_b": (r, flat)}


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP-form product: the core's two rank axes mapped to [out, in], its kernel axes kept."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


class LoHaLayer(LycorisLayer):
    def __init__(self, site: Site, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                 use_effective_conv2d: bool) -> None:
        # LoHa always rescales the kept channels by their mean (PEFT and LyCORIS do).
        super().__init__(site, r, alpha, rank_dropout, module_dropout, rank_dropout_scale=True)
        for name, shape in loha_shapes(site, r, use_effective_conv2d).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.cp = hasattr(self, "hada_t1")

    @torch.no_grad()
    def initialize(self, init_weights: bool) -> None:
        """PEFT's init: He (kaiming) uniform everywhere, ``hada_w2_b`` zero so the update starts at 0.
        ``init_weights=False`` leaves it random too (a non-zero update, for tests)."""
        for name, p in self.named_parameters(recurse=False):
            if name == "hada_w2_b" and init_weights:
                nn.init.zeros_(p)
            else:
                kaiming_(p)

    def _update(self) -> torch.Tensor:
        if self.cp:
            first = _cp(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            second = _cp(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            first = self.hada_w1_a @ self.hada_w1_b
            second = self.hada_w2_a @ self.hada_w2_b
        return first * second * self.scaling
