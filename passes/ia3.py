"""IA3: a learned scale on an op's output (keys, values) or on its input (feed-forward layers).

PEFT's semantics, on ops rather than modules:

- a site that is not a feed-forward module: ``y = s * (W x + b)`` (bias included), one ``s`` per
  output channel;
- a feed-forward site: ``y = W (s * x) + b``, one ``s`` per input channel.

Output scales go through :func:`adaptc.passes.wrap.route_weight_uses`; input scales are a node
inserted on the op's data input, called as ``layer(x, x)`` so that removing it (whose second
argument is the value it replaces) restores the op. The vectors keep PEFT's shapes (``[out, 1]`` /
``[1, in]`` for linear ops, ``[1, C, 1, ...]`` for convolutions), so checkpoints are PEFT's tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .sites import Site, match_ops, site_key
from .wrap import route_weight_uses

UNKNOWN_BIAS = "<unknown>"  # the op adds a bias that is not a parameter of the site's module


class IA3Layer(nn.Module):
    """One site's IA3 vector ``ia3_l``; starts at 1 (the base model)."""

    def __init__(self, site: Site, feedforward: bool) -> None:
        super().__init__()
        self.kind, self.active, self.feedforward = site.kind, True, feedforward
        self.fan_in_fan_out = site.fan_in_fan_out
        self.conv_dims = site.conv["dims"] if site.kind == "conv" else 0
        self.groups = site.conv["groups"] if site.kind == "conv" else 1
        self.weight_shape = tuple(site.weight_shape)
        self.bias_name: str | None = None  # the bias parameter an output scale also scales (merge)
        n = site.in_features if feedforward else site.out_features
        if site.kind == "conv":
            shape = (1, n) + (1,) * self.conv_dims
        else:
            shape = (1, n) if feedforward else (n, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape))

    def scale_for(self, value: torch.Tensor) -> torch.Tensor:
        """The vector shaped to broadcast over ``value``: channels last for linear ops, dim 1 for convolutions."""
        if self.kind != "conv":
            return self.ia3_l.flatten()
        unbatched = value.dim() == self.conv_dims + 1  # [C, ...] instead of [N, C, ...]
        return self.ia3_l.view(*(() if unbatched else (1,)), -1, *([1] * self.conv_dims))

    def forward(
        self, x: torch.Tensor, output: torch.Tensor, weight: Any = None, bias: Any = None
    ) -> torch.Tensor:
        if not self.active:
            return output
        return output * self.scale_for(output).to(output.dtype)

    # -- merge (targets/merge.py) --------------------------------------------------------------

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """The weight with the scale folded in, in the weight's storage order."""
        s = self.ia3_l.detach().flatten().to(current.dtype)
        if self.kind == "conv":
            tail = [1] * self.conv_dims
            if not self.feedforward:
                return current * s.view(-1, 1, *tail)
            per_group = current.shape[1]  # in_channels / groups: the same input scales in every group
            grouped = s.view(self.groups, 1, per_group, *tail).expand(
                self.groups, current.shape[0] // self.groups, per_group, *tail
            )
            return current * grouped.reshape(current.shape[0], per_group, *tail)
        on_rows = self.feedforward == self.fan_in_fan_out  # the scaled axis is the weight's first
        return current * (s[:, None] if on_rows else s[None, :])

    def merge_bias_into(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias * self.ia3_l.detach().flatten().to(bias.dtype)


def bias_names(gm: fx.GraphModule, model: nn.Module, layers: dict[str, IA3Layer]) -> None:
    """Record on each output-scaling layer the bias parameter its op adds (merge scales it too)."""
    for match in match_ops(gm, model):
        layer = layers.get(match.site.name)
        if layer is None or layer.feedforward or layer.kind != match.site.kind:
            continue
        bias = match.bias
        if bias is None:
            name = None
        elif isinstance(bias, str):  # a call_module leaf
            name = f"{match.node.target}.bias"
        elif isinstance(bias, fx.Node) and bias.op == "get_attr":
            name = bias.target
        else:
            name = UNKNOWN_BIAS
        if layer.bias_name is None:
            layer.bias_name = name
        elif name != layer.bias_name:
            layer.bias_name = UNKNOWN_BIAS


def scale_inputs(gm: fx.GraphModule, model: nn.Module, layers: dict[str, IA3Layer], prefix: str) -> int:
    """Insert the input scale of every feed-forward site's op; returns the count."""
    graph = gm.graph
    count = 0
    for match in match_ops(gm, model):
        layer = layers.get(match.site.name)
        if layer is None or not layer.feedforward or layer.kind != match.site.kind:
            continue
        with graph.inserting_before(match.node):
            scaled = graph.call_module(f"{prefix}.{site_key(match.site.name)}", (match.x, match.x))
        scaled.meta = {k: v for k, v in match.node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        match.node.replace_input_with(match.x, scaled)
        count += 1
    return count


def insert(gm: fx.GraphModule, model: nn.Module, layers: dict[str, IA3Layer], prefix: str) -> int:
    """Every IA3 scale of ``layers`` (by site name) into ``gm``; returns the number of op uses adapted."""
    outputs = {name: layer for name, layer in layers.items() if not layer.feedforward}
    bias_names(gm, model, outputs)
    count = scale_inputs(gm, model, layers, prefix)
    count += route_weight_uses(gm, model, outputs, prefix)
    return count
