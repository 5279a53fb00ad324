"""What LoHa and LoKr share (the LyCORIS family): a layer that builds a weight update and applies it.

A LyCORIS adapter never runs a low-rank path on the activations: it builds a full-size update
``dW`` from its factors (a Hadamard product for LoHa, a Kronecker product for LoKr) and adds
``op(x, dW)`` to the frozen op's output, where ``op`` is the site's own linear or convolution
(stride, padding, dilation, groups). Merging adds ``dW`` to the weight. Both follow PEFT's
LyCORIS layers: scale ``alpha / r``, rank dropout (output channels of ``dW`` dropped during
training) and module dropout (the whole update skipped for a training step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adaptc.errors import TargetError

from .sites import Site
from .wrap import route_weight_uses

_CONV_FN = {1: F.conv1d, 2: F.conv2d}
SUPPORTED = "linear ops (nn.Linear, F.linear, GPT-2's Conv1D, x @ W) and 1-D / 2-D convolutions"


def supports(site: Site) -> bool:
    """Whether a LyCORIS layer can go at ``site`` (PEFT's LoHa / LoKr: Linear, Conv1d, Conv2d)."""
    return site.kind == "linear" or (site.kind == "conv" and site.conv is not None and site.conv["dims"] in _CONV_FN)


def supported_sites(chosen: list[Site], method: str, targets: object) -> list[Site]:
    """``chosen`` if every site is one a LyCORIS layer takes; a TargetError naming the others otherwise.

    ``targets="all"`` picks embeddings too: those are left out rather than refused.
    """
    if targets in ("all", "all-linear"):
        chosen = [s for s in chosen if supports(s)]
    other = [s for s in chosen if not supports(s)]
    if other:
        named = ", ".join(f"{s.name} ({s.kind}, {s.op})" for s in other[:4]) + (" ..." if len(other) > 4 else "")
        raise TargetError(
            f"{method} adapts {SUPPORTED}; target_modules={targets!r} also selected {named}. "
            "Leave those out with exclude_modules or a narrower target_modules."
        )
    if not chosen:
        raise TargetError(f"{method} found no site to adapt: it looked for {SUPPORTED} among target_modules={targets!r}")
    return chosen


def kaiming_(tensor: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) default: kaiming uniform with a = sqrt(5)."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def effective_conv(site: Site, use_effective_conv2d: bool) -> bool:
    """PEFT's rule: the CP (Tucker) form of a conv update only where the kernel is larger than 1."""
    return use_effective_conv2d and site.kind == "conv" and any(k != 1 for k in site.weight_shape[2:])


class LycorisLayer(nn.Module):
    """One site's LyCORIS adapter. Subclasses create the factors and build the update (``_update``)."""

    def __init__(self, site: Site, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                 rank_dropout_scale: bool) -> None:
        super().__init__()
        self.kind = site.kind
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.fan_in_fan_out = site.fan_in_fan_out
        self.conv = dict(site.conv) if site.conv else None
        # The update's shape, [out, in, ...] whatever order the model stores its weight in.
        self.oriented_shape = tuple(reversed(site.weight_shape)) if site.fan_in_fan_out else tuple(site.weight_shape)
        self.active = True  # switched by AdaptedModel.set_adapter / disable_adapters

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}"

    def _update(self) -> torch.Tensor:
        """The scaled update, any shape holding ``prod(oriented_shape)`` elements in [out, in, ...] order."""
        raise NotImplementedError

    def oriented_delta(self) -> torch.Tensor:
        return self._update().reshape(self.oriented_shape)

    def delta_weight(self) -> torch.Tensor:
        """The update shaped like the stored weight (what merge adds)."""
        delta = self.oriented_delta()
        return delta.T if self.fan_in_fan_out else delta

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return current + self.delta_weight().to(current.dtype)

    def forward(self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active:
            return base
        if self.training and self.module_dropout > 0 and float(torch.rand(1)) <= self.module_dropout:
            return base  # module dropout: this step runs the frozen op alone
        delta = self.oriented_delta()
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean()
            delta = delta * keep.reshape(-1, *([1] * (delta.dim() - 1)))
        x = x.to(delta.dtype)
        if self.kind == "linear":
            update = F.linear(x, delta)
        else:
            c = self.conv
            update = _CONV_FN[c["dims"]](x, delta, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        return base + update.to(base.dtype)


def build_layers(sites: list[Site], model: nn.Module, make) -> dict[str, LycorisLayer]:
    """``make(site)`` for every site, in the dtype and on the device of its weight; fills ``params_added``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = {}
    for site in sites:
        weight = params[site.weight]
        layer = make(site)
        layer.to(dtype=weight.dtype if weight.is_floating_point() else torch.float32, device=weight.device)
        site.params_added = sum(p.numel() for p in layer.parameters())
        layers[site.name] = layer
    return layers


def insert(gm: torch.fx.GraphModule, model: nn.Module, layers: dict[str, nn.Module], prefix: str) -> int:
    """Route every use of a selected weight through its layer; returns the count."""
    return route_weight_uses(gm, model, layers, prefix)
