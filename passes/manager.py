"""One interface for graph passes, and the manager that owns their order.

A pass is a :class:`GraphPass`: ``run(gm)`` edits ``gm.graph`` in place and says whether it changed
anything; calling the pass returns a :class:`PassResult` (the shape of torch.fx.passes.infra's
``PassResult``). A pass declares

- ``modes``: the training modes whose graphs it applies to (``{True}``: training graphs only);
- ``needs_frozen_ops``: whether it must see the frozen linear ops that LoRA groups take into themselves
  (:func:`adaptc.passes.lora_fused.absorb_bases`); the manager hands them back before such a pass runs
  and lets the groups absorb them again after.

The :class:`PassManager` runs, on every captured graph: narrowing (training graphs), the methods' passes
in adapter order, the frozen model's speedups (kernel fusions, dropout), then absorption (the others look for the frozen ops),
then passes a model switches on into ``after`` (activation checkpointing, appended last: it cuts the finished graph).
With ``debug=True`` (or ``ADAPTC_DEBUG_PASSES=1``) it lints the graph after every pass and checks that no
pass but a removal dropped an adapted op use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import fx

from adaptc.errors import AdaptcError

from . import gqa, lora_fused, narrow, speedups

ADAPTERS_ATTR = "_adaptc_adapters"  # the module path under which captured graphs reach the adapters
BOTH_MODES = frozenset({True, False})


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class GraphPass:
    """Base class of graph passes: set ``name`` (and ``modes`` / ``needs_frozen_ops``), implement :meth:`run`."""

    name: str = "pass"
    modes: frozenset[bool] = BOTH_MODES
    needs_frozen_ops: bool = True

    def run(self, gm: fx.GraphModule) -> bool:
        raise NotImplementedError

    def applies_to(self, gm: fx.GraphModule) -> bool:
        return bool(getattr(gm, "_adaptc_active", True)) in self.modes

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, bool(self.run(gm)) if self.applies_to(gm) else False)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class FunctionPass(GraphPass):
    """A pass from a function ``fn(gm) -> int | bool | None`` (a count of edits, or whether it edited)."""

    def __init__(self, name: str, fn: Callable[[fx.GraphModule], object], *, modes: Iterable[bool] = BOTH_MODES,
                 needs_frozen_ops: bool = True) -> None:
        self.name, self.fn = name, fn
        self.modes = frozenset(modes)
        self.needs_frozen_ops = needs_frozen_ops

    def run(self, gm: fx.GraphModule) -> bool:
        return bool(self.fn(gm))


# Evaluation graphs stay bit-identical to the base model: narrowing runs on training graphs only.
NARROW = FunctionPass("narrow-rows", narrow.narrow_rows, modes={True})
# The frozen model's own ops: fused GELU / RMSNorm / RoPE (training graphs: they round differently),
# cheaper dropout masks.
FUSE_KERNELS = FunctionPass("fuse-kernels", speedups.fuse_kernels, modes={True})
FAST_DROPOUT = FunctionPass("fast-dropout", speedups.fast_dropout)
DROP_NO_OPS = FunctionPass("drop-no-ops", speedups.drop_no_ops, needs_frozen_ops=False)
ABSORB = FunctionPass("absorb-bases", lora_fused.absorb_bases, needs_frozen_ops=False)
# Grouped-query attention on un-repeated keys and values (evaluation graphs: generation reads the cache).
GQA = FunctionPass("gqa-attention", gqa.use_gqa, modes={False}, needs_frozen_ops=False)


def adapted_uses(gm: fx.GraphModule) -> int:
    """How many op uses the adapters take part in: adapter nodes, plus each LoRA group's members."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target.startswith(ADAPTERS_ATTR + "."):
            count += 1
        elif node.target.startswith(lora_fused.SIBLINGS_ATTR + "."):
            count += len(gm.get_submodule(node.target).layers)
        elif hasattr(gm.get_submodule(node.target), "adapted_uses"):  # a checkpointed block (passes/checkpoint.py)
            count += gm.get_submodule(node.target).adapted_uses()
    return count


class PassManager:
    """Runs passes in their fixed order: ``before`` (narrowing), the method passes, ``after`` (speedups, absorb)."""

    def __init__(self, before: list[GraphPass] | None = None, after: list[GraphPass] | None = None,
                 debug: bool | None = None) -> None:
        self.before = [NARROW] if before is None else before
        self.after = [FUSE_KERNELS, DROP_NO_OPS, FAST_DROPOUT, GQA, ABSORB] if after is None else after
        self.debug = os.environ.get("ADAPTC_DEBUG_PASSES") == "1" if debug is None else debug

    def run(self, gm: fx.GraphModule, method_passes: Iterable[GraphPass]) -> list[tuple[GraphPass, PassResult]]:
        """Every pass on a newly captured graph, in order."""
        return [(p, self._run(gm, p)) for p in [*self.before, *method_passes, *self.after]]

    def run_one(self, gm: fx.GraphModule, graph_pass: GraphPass | Callable[[fx.GraphModule], object],
                *, removal: bool = False) -> PassResult:
        """One pass on a graph the manager already ran: the LoRA groups hand their frozen ops back first
        when the pass needs them, and take them in again after."""
        if not isinstance(graph_pass, GraphPass):
            graph_pass = FunctionPass(getattr(graph_pass, "__name__", "pass"), graph_pass)
        # Later passes that take frozen ops into themselves (``undo``: chunked loss, checkpointing) give them back too.
        hiding = [p for p in self.after if hasattr(p, "undo") and p is not graph_pass] if graph_pass.needs_frozen_ops else []
        for p in reversed(hiding):  # the last applied first
            p.undo(gm)
        if graph_pass.needs_frozen_ops:
            lora_fused.restore_bases(gm)
        result = self._run(gm, graph_pass, removal=removal)
        for p in hiding:
            self._run(gm, p)
        if graph_pass.needs_frozen_ops:
            lora_fused.absorb_bases(gm)
        return result

    def _run(self, gm: fx.GraphModule, graph_pass: GraphPass, removal: bool = False) -> PassResult:
        before = adapted_uses(gm) if self.debug else 0
        result = graph_pass(gm)
        if self.debug:
            gm.graph.lint()
            after = adapted_uses(gm)
            if after < before and not removal:
                raise AdaptcError(f"pass {graph_pass.name!r} dropped adapted op uses ({before} -> {after})")
        return result
