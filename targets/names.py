"""Names for nodes that a rewrite puts in place of another."""

from __future__ import annotations

import onnx_ir as ir


def derived_name(node: ir.Node, suffix: str) -> str | None:
    """``node``'s name plus ``suffix``; none when ``node`` had none (node names must stay unique)."""
    return f"{node.name}{suffix}" if node.name else None
