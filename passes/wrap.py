"""Route every use of a weight through a module: the graph edit of every method that adapts an op's output.

The module is called as ``module(x, output, weight, bias)``: the op's input, the op's own output (the
frozen computation, left in the graph untouched), its weight and its bias (None without one); what it
returns replaces the output for every user. LoRA and user-defined methods (docs/extending.md) share it.
"""

from __future__ import annotations

from torch import fx, nn

from .sites import match_ops, site_key


def route_weight_uses(gm: fx.GraphModule, model: nn.Module, layers: dict[str, nn.Module], prefix: str) -> int:
    """Route every use of a weight whose site is in ``layers`` (by site name) through that module; returns the count.

    ``prefix`` is the dotted path under ``gm`` of the module dict holding ``layers`` by site key
    (:func:`adaptc.methods.adapter_prefix`). A module with a ``kind`` attribute takes only sites of that kind.
    """
    graph = gm.graph
    count = 0
    # Last op first: rerouting an op's users then also reaches the adapters inserted after it,
    # whose input was recorded as the op's original node.
    for match in reversed(match_ops(gm, model)):
        layer = layers.get(match.site.name)
        if layer is None or getattr(layer, "kind", match.site.kind) != match.site.kind:
            continue
        node = match.node
        with graph.inserting_before(node):
            weight = match.weight if match.weight is not None else graph.get_attr(match.site.weight)
            bias = match.bias
            if isinstance(bias, str):  # a call_module leaf (fx graphs): read its bias attribute
                bias = graph.get_attr(f"{node.target}.bias")
        with graph.inserting_after(node):
            adapted = graph.call_module(f"{prefix}.{site_key(match.site.name)}", (match.x, node, weight, bias))
        adapted.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        node.replace_all_uses_with(adapted, delete_user_cb=lambda user, adapted=adapted: user is not adapted)
        count += 1
    return count
