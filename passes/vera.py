"""VeRA: one pair of frozen random projections shared by every adapted layer, and two trained vectors per layer.

``y = W x + lambda_b * (B[:out] (lambda_d * (A[:, :in] x)))``: ``A`` [r, max_in] and ``B`` [max_out, r]
are drawn once from ``projection_prng_key`` (PEFT's generator and kaiming-uniform bounds, so the
same key gives PEFT's matrices), sized to the largest adapted layer, and never train; each layer
slices them to its own size and trains ``lambda_d`` [r] and ``lambda_b`` [out]. Merging adds
``(lambda_b B)(lambda_d A)`` to the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sites import Site


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # PEFT's _kaiming_init: gain sqrt(2) (a = 0) over fan_in = shape[1], drawn from the generator.
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen ``vera_A`` [r, in] and ``vera_B`` [out, r] (buffers: they never train)."""

    def __init__(self, r: int, in_features: int, out_features: int, prng_key: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(prng_key)
        self.register_buffer("vera_A", _kaiming_uniform((r, in_features), generator))  # A first, as PEFT draws
        self.register_buffer("vera_B", _kaiming_uniform((out_features, r), generator))

    @classmethod
    def for_sites(cls, sites: list[Site], r: int, prng_key: int) -> VeraProjections:
        """Sized to the largest input and output among ``sites`` (PEFT's ``_find_dim``)."""
        return cls(r, max(s.in_features for s in sites), max(s.out_features for s in sites), prng_key)

    @torch.no_grad()
    def replace(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        """Take a checkpoint's matrices (they may be larger than this model needs: each layer slices)."""
        self.vera_A = vera_A.to(self.vera_A.device, self.vera_A.dtype).clone()
        self.vera_B = vera_B.to(self.vera_B.device, self.vera_B.dtype).clone()


class VeraLayer(nn.Module):
    """One site's ``lambda_d`` and ``lambda_b`` over the shared projections."""

    def __init__(self, site: Site, r: int, dropout: float, projections: VeraProjections) -> None:
        super().__init__()
        self.kind = site.kind
        self.r = r
        self.in_features, self.out_features = site.in_features, site.out_features
        self.fan_in_fan_out = site.fan_in_fan_out
        self.active = True  # switched by AdaptedModel.set_adapter / disable_adapters
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projections = projections  # the same module in every layer of the adapter
        self.vera_lambda_b = nn.Parameter(torch.ones(site.out_features))
        self.vera_lambda_d = nn.Parameter(torch.randn(r))

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"

    @torch.no_grad()
    def initialize(self, init_weights: bool, d_initial: float) -> None:
        """PEFT's init: ``lambda_b`` zero (the update starts at 0), ``lambda_d`` = ``d_initial``.
        ``init_weights=False`` keeps ``lambda_b`` one and ``lambda_d`` normal (for tests)."""
        if init_weights:
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(d_initial)

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.projections
        dtype = self.vera_lambda_d.dtype
        return p.vera_A[:, : self.in_features].to(dtype), p.vera_B[: self.out_features].to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """``(lambda_b B)(lambda_d A)`` shaped like the stored weight."""
        a, b = self._sliced()
        delta = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return current + self.delta_weight().to(current.dtype)

    def forward(self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active:
            return base
        a, b = self._sliced()
        hidden = self.vera_lambda_d * F.linear(self.dropout(x.to(a.dtype)), a)
        return base + (self.vera_lambda_b * F.linear(hidden, b)).to(base.dtype)
