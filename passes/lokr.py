"""LoKr: a weight update that is a Kronecker product ``dW = scale * W1 (x) W2`` (LyCORIS).

Each output and input size is factored in two (``factorization``: near the square root, or by
``decompose_factor``); ``W1`` is [out_l, in_m] and ``W2`` [out_k, in_n] (times the kernel on a
conv). A factor is stored whole, or as a rank-``r`` product where ``r`` is below half its larger
side (``W1`` only with ``decompose_both``); on a conv with ``use_effective_conv2d``, ``W2`` is a
CP form with a core over the kernel. Names, shapes, the rules and the init are PEFT's
(``lokr_w1``, ``lokr_w1_a``, ...). Application and merge are shared with LoHa (:mod:`.lycoris`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lycoris import LycorisLayer, effective_conv, kaiming_
from .sites import Site


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Two numbers ``m <= n`` with ``m * n == dimension``: ``(factor, dimension / factor)`` when ``factor``
    divides it; otherwise the pair nearest the square root with ``m <= factor`` (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


def lokr_shapes(site: Site, r: int, decompose_both: bool, decompose_factor: int,
                use_effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
    """The parameters a rank-``r`` LoKr adds at ``site``, by PEFT's names."""
    in_dim = site.in_features if site.kind == "linear" else site.weight_shape[1]  # per group on a conv
    out_l, out_k = factorization(site.out_features, decompose_factor)
    in_m, in_n = factorization(in_dim, decompose_factor)
    kernel = tuple(site.weight_shape[2:]) if site.kind == "conv" else ()
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and r < max(out_l, in_m) / 2:
        shapes |= {"lokr_w1_a": (out_l, r), "lokr_w1_b": (r, in_m)}
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if not r < max(out_k, in_n) / 2:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    elif effective_conv(site, use_effective_conv2d):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        shapes |= {"lokr_t2": core, "lokr_w2_a": (r, out_k), "lokr_w2_b": (r, in_n)}
    else:
        shapes |= {"lokr_w2_a": (out_k, r), "lokr_w2_b": (r, in_n * math.prod(kernel))}
    return shapes


class LoKrLayer(LycorisLayer):
    def __init__(self, site: Site, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                 rank_dropout_scale: bool, decompose_both: bool, decompose_factor: int,
                 use_effective_conv2d: bool) -> None:
        super().__init__(site, r, alpha, rank_dropout, module_dropout, rank_dropout_scale)
        shapes = lokr_shapes(site, r, decompose_both, decompose_factor, use_effective_conv2d)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    @torch.no_grad()
    def initialize(self, init_weights: bool | str) -> None:
        """PEFT's init. ``True``: W1 (or W1a) zero, the rest He uniform; ``"lycoris"``: W2 (or W2b) zero
        instead; ``False``: everything random (a non-zero update, for tests)."""
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init_weights, ())
        for name, p in self.named_parameters(recurse=False):
            if name in zero:
                nn.init.zeros_(p)
            else:
                kaiming_(p)

    def _factor(self, name: str) -> torch.Tensor:
        whole = getattr(self, f"lokr_{name}", None)
        if whole is not None:
            return whole
        a, b = getattr(self, f"lokr_{name}_a"), getattr(self, f"lokr_{name}_b")
        if name == "w2" and hasattr(self, "lokr_t2"):
            return torch.einsum("i j k l, i p, j r -> p r k l", self.lokr_t2, a, b)
        return a @ b

    def _update(self) -> torch.Tensor:
        w1, w2 = _dense(self._factor("w1")), _dense(self._factor("w2"))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # PEFT's exact layout, so that its checkpoints mean the same here (including torch.kron's
        # rule for a 3-D W2 on a Conv1d, which pads W1 in front).
        return torch.kron(w1, w2) * self.scaling


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides. torch.kron views its inputs and fails on a tensor whose size-1
    axes carry other strides (``contiguous()`` keeps those): the rank-1 products and CP forms here
    make such tensors, and PEFT 0.21 fails on them (decompose_both with use_effective_conv2d, or a Conv1d)."""
    return t if t.stride() == _row_major(t.shape) else t.reshape(-1).clone().view(t.shape)


def _row_major(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
