"""Prefix tuning (P-Tuning v2): learned keys and values in front of every attention's own.

A local graph edit: each attention op ``sdpa(q, k, v, mask, ...)`` becomes a call of its
:class:`PrefixLayer`, which concatenates ``num_virtual_tokens`` learned keys and values along
the sequence axis and widens the mask so every query sees them (a causal op gets an explicit
mask: the prefix, then the causal triangle). The output keeps its shape, so nothing
downstream changes. With grouped-query attention the prefix has the model's key/value head
count and is repeated like the model's own keys.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.config import PrefixConfig

from .attention import canonicalize
from .sequence import AttentionSite, attention_nodes

PREFIX_META = "adaptc_prefix_of"  # node.meta key: the attention op a prefix node replaced


class PrefixEncoder(nn.Module):
    """Prefix tuning's reparameterisation: ``embedding -> Linear -> tanh -> Linear`` gives every
    layer's keys and values at once (PEFT's ``prefix_projection``)."""

    def __init__(self, num_virtual_tokens: int, hidden: int, width: int, out_features: int) -> None:
        super().__init__()
        self.active = True
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)
        self.transform = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, out_features))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


class PrefixLayer(nn.Module):
    """The prefix of one attention op: keys [kv_heads, P, head_dim] and values [kv_heads, P, value_dim]."""

    def __init__(self, site: AttentionSite, num_virtual_tokens: int, encoder: PrefixEncoder | None = None,
                 offset: int = 0) -> None:
        super().__init__()
        self.kv_heads, self.tokens = site.source_kv_heads, num_virtual_tokens
        self.head_dim, self.value_dim = site.head_dim, site.value_dim
        self.active = True
        self.offset = offset  # where this layer's keys start in the encoder's output row
        self._encoder = [encoder]  # shared by every layer; a list so it is not registered here
        if encoder is None:
            self.key = nn.Parameter(torch.randn(self.kv_heads, num_virtual_tokens, self.head_dim))
            self.value = nn.Parameter(torch.randn(self.kv_heads, num_virtual_tokens, self.value_dim))

    @property
    def numel(self) -> int:
        return self.kv_heads * self.tokens * (self.head_dim + self.value_dim)

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self._encoder[0]
        if encoder is None:
            return self.key, self.value
        rows = encoder()[:, self.offset: self.offset + self.numel // self.tokens]  # [P, kv_heads * (head_dim + value_dim)]
        k_size = self.kv_heads * self.head_dim
        key = rows[:, :k_size].reshape(self.tokens, self.kv_heads, self.head_dim).transpose(0, 1)
        value = rows[:, k_size:].reshape(self.tokens, self.kv_heads, self.value_dim).transpose(0, 1)
        return key, value

    @torch.no_grad()
    def fold(self) -> None:
        """Keep the current keys and values as constants (merge): no parameters, no encoder."""
        key, value = (t.detach().clone() for t in self.prefix())
        for name in ("key", "value"):
            self._parameters.pop(name, None)
        self._encoder = [None]
        self.register_buffer("key", key)
        self.register_buffer("value", value)

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not self.active:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                  enable_gqa=enable_gqa)
        key, value = self.prefix()
        repeat = k.shape[1] // self.kv_heads  # the model repeated its own keys for grouped-query attention
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, dim=0), value.repeat_interleave(repeat, dim=0)
        batch = k.shape[0]
        k = torch.cat([key.to(k.dtype).expand(batch, -1, -1, -1), k], dim=2)
        v = torch.cat([value.to(v.dtype).expand(batch, -1, -1, -1), v], dim=2)
        attn_mask = prefix_mask(attn_mask, is_causal, q, k, self.tokens)
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, False, scale=scale,
                                              enable_gqa=enable_gqa)


def prefix_mask(mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor, k: torch.Tensor,
                tokens: int) -> torch.Tensor | None:
    """The attention mask with ``tokens`` visible key columns in front; None when nothing is masked."""
    if mask is None and not is_causal:
        return None
    if mask is None:  # causal: query i sees the prefix and real keys 0..i (bottom-right aligned)
        lq, lk = q.shape[-2], k.shape[-2] - tokens
        rows = torch.arange(lq, device=q.device).unsqueeze(1) + (lk - lq)
        cols = torch.arange(lk, device=q.device).unsqueeze(0)
        mask = cols <= rows
    visible = torch.ones((), dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool else \
        torch.zeros((), dtype=mask.dtype, device=mask.device)
    front = visible.expand(*mask.shape[:-1], tokens)
    return torch.cat([front, mask], dim=-1)


def build_layers(sites: list[AttentionSite], config: PrefixConfig, hidden: int) -> tuple[dict[str, nn.Module], PrefixEncoder | None]:
    """One PrefixLayer per attention site (and the shared encoder with ``prefix_projection``)."""
    encoder = None
    if config.prefix_projection:
        total = sum(s.source_kv_heads * (s.head_dim + s.value_dim) for s in sites)
        encoder = PrefixEncoder(config.num_virtual_tokens, hidden, config.encoder_hidden_size or hidden, total)
    layers, offset = {}, 0
    for site in sites:
        layer = PrefixLayer(site, config.num_virtual_tokens, encoder, offset)
        offset += layer.numel // config.num_virtual_tokens
        layers[site.name] = layer
    return layers, encoder


_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal")


def insert(gm: fx.GraphModule, layers: dict[str, str]) -> int:
    """Replace each selected attention op by a call of its prefix layer (``layers``: site -> module target)."""
    canonicalize(gm)  # unfused attention becomes one op first
    count = 0
    for name, node in attention_nodes(gm).items():
        if name not in layers:
            continue
        q, k, v, *rest = node.args
        kwargs = dict(zip(_SDPA_ARGS, rest))
        kwargs.update(node.kwargs)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(layers[name], (q, k, v), kwargs)
        new.meta.update(node.meta)
        new.meta[PREFIX_META] = node.target
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


def remove(gm: fx.GraphModule, target_prefix: str) -> None:
    """Put back the attention ops an adapter's prefix layers replaced."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(target_prefix) and PREFIX_META in node.meta:
            with gm.graph.inserting_before(node):
                original = gm.graph.call_function(node.meta[PREFIX_META], node.args, node.kwargs)
            original.meta.update({k: v for k, v in node.meta.items() if k != PREFIX_META})
            node.replace_all_uses_with(original)
            gm.graph.erase_node(node)


class PositionShift:
    """Real tokens' position ids start after the prefix (PEFT's semantics, from its KV cache):
    a model whose ``forward`` takes ``position_ids`` gets ``P .. P+S-1`` (or the caller's + P)."""

    # Generation with a key/value cache applies this edit at every step (it adds no tokens).
    prefill_tokens = 0

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        signature = inspect.signature(model.forward)
        if "position_ids" not in signature.parameters:
            yield
            return

        def hook(_module, args: tuple, kwargs: dict[str, Any]):
            bound = signature.bind(*args, **kwargs)
            given = bound.arguments.get("position_ids")
            if isinstance(given, torch.Tensor):
                bound.arguments["position_ids"] = given + self.tokens
                return bound.args, bound.kwargs
            ids = bound.arguments.get("input_ids")
            if ids is None:
                ids = bound.arguments.get("inputs_embeds")
            if not isinstance(ids, torch.Tensor):
                return None
            length = ids.shape[1]
            start = self.tokens + _cached_length(bound.arguments)  # a generation step after the cached ones
            positions = torch.arange(start, start + length, device=ids.device).unsqueeze(0)
            bound.arguments["position_ids"] = positions.expand(ids.shape[0], length)
            return bound.args, bound.kwargs

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _cached_length(arguments: dict[str, Any]) -> Any:
    """How many tokens the key/value cache passed to this call holds (0 without one)."""
    cache = arguments.get("cache", arguments.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return cache.get_seq_length()
