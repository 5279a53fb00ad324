"""Keep onnxscript's default rewrite rules linear in the graph's size during an export.

onnxscript's matcher for a pattern with several output nodes (in the default rule set:
``SlicesSplit``, two ``Slice`` of one tensor -> ``Split``) takes the node it is offered as the first
output and looks for the others among *every* node of the graph: for each node offered it indexes
the whole graph by op type, then tries every combination of candidates. That is quadratic in the
node count, and an export runs the default rules in every optimizer call (the exporter's own, three
in ``optimize_for_ort``, twice that where the fusions run again): on a 32-layer Llama this one
rule took 30 of the export's 64 s (2.0 s at 8 layers, 7.3 at 16; bench/bench_compile.py).

:func:`prefiltered_default_rules` wraps each such rule so that it is tried only on nodes its first
output node accepts (the op type and domain check the matcher makes first anyway) and, where every
other output node of the pattern reads a value the first one reads (SlicesSplit: both Slices read
``x``), searches the other outputs only among that value's readers: a match can use no other node.
(Not among the readers of all the first node's inputs: constants like ``[1]`` have hundreds.)
The rules and their order are unchanged, and the candidates come in graph order as before.

It leans on two onnxscript internals (``rewriter._DEFAULT_REWRITE_RULES`` and a rule's
``_target_pattern``); where a version lacks them it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import onnx_ir as ir

from .global_swap import SharedSwap


class _Neighbourhood:
    """The nodes a match starting at ``node`` can use, for the matcher to search instead of the graph: the
    readers of ``node``'s inputs at ``positions`` (``node`` among them), in the order they were added as
    readers, which is graph order in a graph as loaded (the matcher tries candidates in order, and
    SlicesSplit takes the first structural match even when its check then fails). Everything but
    iteration is the real ``graph``'s (the matcher checks values against ``.graph``; a rewrite records
    its opsets in ``opset_imports``)."""

    def __init__(self, graph: ir.Graph, node: ir.Node, positions: list[int]) -> None:
        self.graph = graph
        nodes: dict[ir.Node, None] = {}  # a dict: ordered and deduplicated
        for position in positions:
            value = node.inputs[position] if position < len(node.inputs) else None
            if value is not None:
                nodes.update((user, None) for user, _ in value.uses())
        self._nodes = list(nodes)

    def __iter__(self) -> Iterator[ir.Node]:
        return iter(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)


class _FirstOutputFilter:
    """A multi-output rule that skips the nodes it cannot start a match at."""

    def __init__(self, rule: Any) -> None:
        self._rule = rule
        outputs = list(rule._target_pattern.output_nodes)
        self._first = outputs[0]
        # For each other output, one input position of the first output it must share a value with:
        # its match is then a reader of that value. None when some output shares none.
        positions = [_shared_position(self._first, other) for other in outputs[1:]]
        self._positions = None if None in positions else sorted(set(positions))

    def __getattr__(self, name: str) -> Any:  # everything else is the rule's own
        return getattr(self._rule, name)

    def __repr__(self) -> str:
        return f"prefiltered({self._rule!r})"

    def try_rewrite(self, model: ir.Model, graph: ir.Graph | ir.Function, node: ir.Node, **kwargs: Any) -> Any:
        if not (self._first.op.matches(node.op_type) and self._first.domain.matches(node.domain)):
            return None
        if self._positions is not None and isinstance(graph, ir.Graph):
            graph = _Neighbourhood(graph, node, self._positions)
        return self._rule.try_rewrite(model, graph, node, **kwargs)


def _shared_position(first: Any, other: Any) -> int | None:
    """A position of ``first``'s inputs holding a pattern value that ``other`` reads too."""
    theirs = {id(v) for v in other.inputs if v is not None}
    return next((i for i, v in enumerate(first.inputs) if v is not None and id(v) in theirs), None)


def prefilter(rules: tuple) -> tuple:
    """``rules`` with every multi-output rule wrapped in :class:`_FirstOutputFilter`."""
    return tuple(_FirstOutputFilter(rule) if _multi_output(rule) else rule for rule in rules)


def _multi_output(rule: Any) -> bool:
    pattern = getattr(rule, "_target_pattern", None)
    return pattern is not None and not pattern.has_single_output_node


def _rewriter_module() -> Any:
    from onnxscript import rewriter

    return rewriter


_swap = SharedSwap(_rewriter_module, "_DEFAULT_REWRITE_RULES", prefilter)


def prefiltered_default_rules() -> contextlib.AbstractContextManager[None]:
    """Within the block, ``onnxscript.optimizer.optimize`` (which reads ``rewriter._DEFAULT_REWRITE_RULES``
    when called) runs the prefiltered rules. The rules are a module global: blocks may nest or overlap
    across threads; the first to open swaps them in, the last to close puts the originals back."""
    return _swap.applied()

