"""onnxscript's MultiHeadAttention bias fusion, limited to true biases.

``onnxscript.rewriter.ort_fusions.mha_bias.FuseBiasMHA`` matches ``Add(query_matmul, q_bias)`` (and
the same for key and value) in front of a ``MultiHeadAttention`` and moves ``q_bias`` into the op's
packed ``bias`` input, which ORT requires to be 1-D ([Dq + Dk + Dv]). The rule checks the shape of
``query_matmul`` but never of ``q_bias``: any addend is taken. In an unmerged LoRA export the query
is ``Add(base_linear, lora_delta)`` with a per-token delta of shape [batch, seq, D], so the rule
folded the delta into the bias and ORT failed at run time ("Input 'bias' is expected to have 1
dimension, got 3"; OPT, whose q/k/v Adds feed attention directly).

:class:`TrueBiasMHA` adds the missing check: every matched bias must be 1-D of exactly the hidden
size of what it is added to (what ``Add`` then broadcasts as ORT's bias does). Otherwise the rule
does not fire and the Adds stay in front of the attention, as they are for a model without biases.
:func:`true_bias_mha` swaps it in for ``onnxscript.rewriter.ort_fusions._core.fuse_mha_bias`` (the
name ``fuse_xformers`` calls) while the fusions run; with an onnxscript that lacks either it changes
nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import onnx_ir as ir

from .global_swap import SharedSwap


def _true_bias(bias: ir.Value | None, size: Any, dtype: Any) -> bool:
    """``bias`` is a 1-D tensor of ``size`` elements (an int: the hidden size) of ``dtype``."""
    if bias is None or bias.shape is None or not isinstance(size, int):
        return False
    dims = list(bias.shape)
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] == size and bias.dtype == dtype


def _rule_class() -> type | None:
    try:
        from onnxscript.rewriter.ort_fusions.mha_bias import FuseBiasMHA
    except ImportError:  # another onnxscript: nothing to guard
        return None

    class TrueBiasMHA(FuseBiasMHA):
        """FuseBiasMHA that takes only 1-D biases of the hidden size (see the module docstring)."""

        def check(self, context, query_matmul, key_matmul, value_matmul, has_q_bias, has_k_bias, has_v_bias,
                  q_bias=None, k_bias=None, v_bias=None, **kwargs):
            result = super().check(context, query_matmul, key_matmul, value_matmul, has_q_bias, has_k_bias,
                                   has_v_bias, **kwargs)
            if not result:
                return result
            for has, bias, matmul, size in ((has_q_bias, q_bias, query_matmul, self.Dh_q),
                                            (has_k_bias, k_bias, key_matmul, self.Dh_k),
                                            (has_v_bias, v_bias, value_matmul, self.Dh_v)):
                if has and not _true_bias(bias, size, matmul.dtype):
                    shape = None if bias is None or bias.shape is None else list(bias.shape)
                    return result.fail(f"{bias} (shape {shape}) is not a 1-D bias of size {size}: not fused", bias)
            return result

    return TrueBiasMHA


def _fuse_true_bias_mha() -> Any:
    from onnxscript.rewriter import _fusion_utils, pattern

    rule_class = _rule_class()
    return None if rule_class is None else _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([rule_class.rule()]))


def _fusion_module() -> Any:
    try:
        from onnxscript.rewriter.ort_fusions import _core
    except ImportError:
        return None
    return _core


_swap = SharedSwap(_fusion_module, "fuse_mha_bias", lambda _original: _fuse_true_bias_mha())


def true_bias_mha() -> contextlib.AbstractContextManager[None]:
    """Within the block, ``optimize_for_ort`` fuses attention biases with :class:`TrueBiasMHA` (it may
    nest or overlap across threads: see :mod:`adaptc.targets.global_swap`)."""
    return _swap.applied()
