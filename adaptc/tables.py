"""Plain-text tables and numbers for the command line and the methods' reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A plain-text table; columns whose index is in ``right`` are right-aligned (numbers)."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def in_out(site: Any) -> str:
    return f"{site.in_features}->{site.out_features}"


def number(value: int) -> str:
    return f"{value:,}"


def few(names: Sequence[str], n: int = 4) -> str:
    """The first ``n`` names, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def site_kind(site: Any) -> str:
    """A site's kind for a table: an expert weight shows how many experts it holds (``experts x8``)."""
    return f"{site.kind} x{site.experts}" if getattr(site, "experts", 0) else site.kind


def expert_groups(sites: Sequence[Any]) -> dict[str, list[Any]]:
    """Expert-weight sites by role (``gate_up_proj``, ``down_proj``: the parameter's name), in first-seen order."""
    groups: dict[str, list[Any]] = {}
    for site in sites:
        if getattr(site, "experts", 0):
            groups.setdefault(site.name.rpartition(".")[2], []).append(site)
    return groups
