"""OFT's layer: a block-diagonal orthogonal rotation of each selected weight's input space.

A site's weight ``W`` [out, in] becomes ``W R^T``, ``R`` block-diagonal with ``r`` blocks of size
``oft_block_size`` (``r * oft_block_size = in``; for a convolution ``in`` is its whole filter,
in_channels x kernel). Each block is the Cayley transform of a skew-symmetric matrix ``Q`` whose upper
triangle is the trained vector: ``R = (I - Q)(I + Q)^-1``, or its Neumann series
``I + 2Q + 2Q^2 + ... + Q^(n-1)`` (PEFT's ``use_cayley_neumann``, the default). Both start at ``R = I``.
``coft`` clamps each block's ``||Q||`` to ``eps / sqrt(blocks)`` before use (constrained OFT),
``block_share`` uses one block everywhere, ``module_dropout`` replaces a fraction of the blocks by
the identity in training. All as PEFT 0.21's OFT, so checkpoints and outputs match.

A linear site rotates its input (``y = W (R x) + b``, as PEFT computes it); a convolution is run
with the rotated kernel, which is what merging gives. (PEFT 0.21 instead rotates unfolded input
patches and folds them back, which for kernels larger than 1x1 sums overlapping patches and does
not equal its own merged model; adaptc's convolution equals PEFT's merged model.)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .sites import Site

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def fan_in(site: Site) -> int:
    """The dimension OFT rotates: a linear's inputs, a convolution's filter (in_channels x kernel)."""
    if site.kind == "conv":
        return site.weight_shape[1] * math.prod(site.weight_shape[2:])
    return site.in_features


def nearest_divisor(features: int, wanted: int) -> int:
    """PEFT's adjustment of an r / block size that does not divide ``features``: the closest divisor."""
    if wanted >= features:
        return features
    higher = wanted
    while higher <= features and features % higher:
        higher += 1
    lower = wanted
    while lower > 1 and features % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(site: Site, r: int, block_size: int) -> tuple[int, int]:
    """(blocks, block size) at ``site`` from the config's ``r`` or ``oft_block_size`` (one is 0), as PEFT."""
    features = fan_in(site)
    if r == 0:
        size = block_size
        if features % size or size > features:
            size = nearest_divisor(features, size)
            warnings.warn(f"adaptc: oft_block_size={block_size} does not divide {site.name}'s {features} input "
                          f"features; using {size} there (as PEFT)", UserWarning, stacklevel=3)
        return features // size, size
    blocks = r
    if features % blocks or blocks > features:
        blocks = nearest_divisor(features, blocks)
        warnings.warn(f"adaptc: r={r} does not divide {site.name}'s {features} input features; using r={blocks} "
                      "there (as PEFT)", UserWarning, stacklevel=3)
    return blocks, features // blocks


class OftLayer(nn.Module):
    """One site's rotation; ``forward(x, output, weight, bias)`` as every routed module."""

    def __init__(self, site: Site, blocks: int, block_size: int, *, coft: bool, eps: float, block_share: bool,
                 use_cayley_neumann: bool, num_cayley_neumann_terms: int, module_dropout: float) -> None:
        super().__init__()
        self.kind = site.kind
        self.blocks, self.block_size = blocks, block_size
        self.coft, self.eps, self.block_share = coft, eps, block_share
        self.use_cayley_neumann, self.terms = use_cayley_neumann, num_cayley_neumann_terms
        self.module_dropout = module_dropout
        self.fan_in_fan_out = site.fan_in_fan_out
        self.conv = dict(site.conv) if site.conv else None
        self.weight_shape = tuple(site.weight_shape)
        self.active = True  # switched by AdaptedModel.set_adapter / disable_adapters
        n_elements = block_size * (block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(1 if block_share else blocks, n_elements))  # PEFT's oft_R.weight
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, blocks={self.blocks}, block_size={self.block_size}, coft={self.coft}, "
                f"block_share={self.block_share}, cayley_neumann={self.use_cayley_neumann}")

    # -- the rotation ---------------------------------------------------------------------------

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        q = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(-2, -1)

    @torch.no_grad()
    def _constrain(self) -> None:
        """COFT: each block's ``||Q||_F`` at most ``eps / sqrt(blocks)`` (PEFT writes it back into the weight)."""
        limit = self.eps / math.sqrt(self.oft_R.shape[0])
        norm = self._skew(self.oft_R).flatten(1).norm(dim=1, keepdim=True)
        self.oft_R.copy_(torch.where(norm <= limit, self.oft_R, limit * self.oft_R / norm))

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks, [blocks (1 with block_share), size, size]."""
        if self.coft:
            self._constrain()
        q = self._skew(self.oft_R)
        eye = torch.eye(self.block_size, dtype=q.dtype, device=q.device).expand_as(q)
        if not self.use_cayley_neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        rotation = eye.clone()
        if self.terms > 1:
            rotation = rotation + 2 * q
            if self.terms > 2:
                power = q @ q
                rotation = rotation + 2 * power
                for _ in range(3, self.terms - 1):
                    power = power @ q
                    rotation = rotation + 2 * power
                rotation = rotation + power @ q
        return rotation

    def _blocks(self) -> torch.Tensor:
        rotation = self.rotations()
        if self.block_share:
            rotation = rotation.expand(self.blocks, -1, -1)
        if self.training and self.module_dropout > 0 and self.blocks > 1:  # PEFT's multiplicative dropout
            count = int(self.module_dropout * self.blocks)
            mask = torch.zeros(self.blocks, dtype=rotation.dtype, device=rotation.device)
            mask[torch.randperm(self.blocks, device=rotation.device)[:count]] = 1
            mask = mask.view(-1, 1, 1)
            eye = torch.eye(self.block_size, dtype=rotation.dtype, device=rotation.device)
            rotation = (1 - mask) * rotation + mask * eye
        return rotation

    def matrix(self) -> torch.Tensor:
        """The full block-diagonal R [in, in], in PEFT's convention (x is rotated as ``x @ R``)."""
        return torch.block_diag(*self._blocks().unbind(0))

    def _rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W R^T`` over the filter dimension, in the weight's stored layout."""
        rotation = self.matrix().to(weight.dtype)
        if self.kind == "conv":
            flat = weight.reshape(weight.shape[0], -1)
            return (flat @ rotation.T).reshape(weight.shape)
        if self.fan_in_fan_out:  # stored [in, out]: x @ R @ W
            return rotation @ weight
        return weight @ rotation.T

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return self._rotated_weight(current)

    def forward(
        self, x: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.active:
            return output
        if self.kind == "conv":
            c = self.conv
            kernel = self._rotated_weight(weight.to(self.oft_R.dtype)).to(x.dtype)
            return _CONV_FN[c["dims"]](x, kernel, bias, c["stride"], c["padding"], c["dilation"], c["groups"])
        blocks = self._blocks()
        shaped = x.to(blocks.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", shaped, blocks).reshape(x.shape).to(x.dtype)
        w = weight.T if self.fan_in_fan_out else weight
        return F.linear(rotated, w.to(x.dtype), bias)
