"""Grouped-query models keep their fused rotary embeddings: onnxscript's GroupQueryAttention fusion off.

With the rotary embedding fused (targets/rope_angles.py), onnxscript's ``fuse_gqa`` turns a
grouped-query attention (fewer key/value heads than query heads: Llama 2/3, Mistral, Qwen2/3, Phi-3,
Gemma ...) into ORT's ``GroupQueryAttention``, which rotates inside the kernel at positions it derives
from per-row sequence lengths, not from transformers' position ids, and failed on a batch the export
had not seen. adaptc used to fuse such models a second time with the rotary rewrite left out, so every
layer ran its rotation as ~10 element-wise ops (Split, Neg, Concat, Mul, Add, Transpose ...) for q
and k, while the same model with as many key/value heads as query heads got ``RotaryEmbedding``.

Within :func:`without_gqa` onnxscript's two GQA fusions (``fuse_gqa``, ``fuse_qkv_gqa``, the names
``fuse_xformers`` calls) rewrite nothing, so the rotary embeddings stay ``RotaryEmbedding`` nodes at
transformers' position ids and the attention fuses to ``MultiHeadAttention`` after the key/value
heads are repeated, as it does without the rotary rewrite. With an onnxscript that lacks either name
it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .global_swap import SharedSwap


def _fusion_module() -> Any:
    try:
        from onnxscript.rewriter.ort_fusions import _core
    except ImportError:
        return None
    return _core


def _nothing(model: Any, debug: bool = False, **kwargs: Any) -> int:
    """A fusion that rewrites nothing (how many it applied: none)."""
    del model, debug, kwargs
    return 0


_swaps = [SharedSwap(_fusion_module, name, lambda _original: _nothing) for name in ("fuse_gqa", "fuse_qkv_gqa")]


@contextlib.contextmanager
def without_gqa() -> Iterator[None]:
    """Within the block ``optimize_for_ort`` fuses no ``GroupQueryAttention`` (blocks may nest or overlap
    across threads: see :mod:`adaptc.targets.global_swap`)."""
    with contextlib.ExitStack() as stack:
        for swap in _swaps:
            stack.enter_context(swap.applied())
        yield
