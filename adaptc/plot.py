"""Pictures: the training loss curve, and where adapters would go in a model (``adaptc inspect --plot``).

matplotlib is optional: it is imported here only, with the non-interactive Agg backend, and
the PNG is written atomically (rendered to memory, then renamed into place).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes
from .errors import InputError


def _pyplot(required: bool) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise InputError("drawing a plot needs matplotlib; install it (pip install matplotlib)") from None
        warnings.warn("matplotlib is not installed: no loss curve is drawn (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def loss_curve(log: dict[str, Any], path: str | Path) -> Path | None:
    """Draw the training loss per step (and evaluation loss/metric where logged) to ``path``."""
    plt = _pyplot(required=False)
    if plt is None or not log.get("steps"):
        return None
    steps = [r["step"] for r in log["steps"]]
    losses = [r["loss"] for r in log["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.plot(steps, losses, lw=1, color="tab:blue", label="train loss")
        evals = log.get("evals") or []
        if any("loss" in e for e in evals):
            points = [(e["step"], e["loss"]) for e in evals if "loss" in e]
            ax.plot(*zip(*points), "o-", color="tab:orange", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if any("metric" in e for e in evals):
            points = [(e["step"], e["metric"]) for e in evals if "metric" in e]
            right = ax.twinx()
            right.plot(*zip(*points), "s--", color="tab:green", label="eval metric")
            right.set_ylabel("eval metric")
            right.legend(loc="upper right")
        ax.legend(loc="upper center" if evals else "best")
        ax.set_title("adaptc train")
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def sites_plot(rows: Sequence[tuple[str, str, int | None, int]], path: str | Path, title: str) -> Path:
    """Per layer, the sites an adapter would go to and the parameters each adds.

    ``rows``: (site name, kind, layer index or None, parameters added). Sites outside the repeated
    layers (embeddings, heads) are drawn in a column of their own at each end.
    """
    plt = _pyplot(required=True)
    layered = sorted({r[2] for r in rows if r[2] is not None})
    columns = ["before"] + [str(i) for i in layered] + ["after"]
    first_layer_row = next((i for i, r in enumerate(rows) if r[2] is not None), len(rows))

    def column(i: int, layer: int | None) -> int:
        if layer is not None:
            return 1 + layered.index(layer)
        return 0 if i < first_layer_row else len(columns) - 1

    # A row per distinct site role (the name with its layer index taken out), in first-seen order.
    def role(name: str, layer: int | None) -> str:
        if layer is None:
            return name
        parts = name.split(".")
        return ".".join(p for p in parts if p != str(layer)) if str(layer) in parts else name

    roles: list[str] = []
    for name, _, layer, _ in rows:
        if role(name, layer) not in roles:
            roles.append(role(name, layer))
    colors = {"linear": "tab:blue", "conv": "tab:orange", "embedding": "tab:green", "experts": "tab:purple"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(columns) + 4), 2 + 0.3 * len(roles) + 2.5),
                                      gridspec_kw={"height_ratios": [max(2, 0.3 * len(roles)), 2]})
    try:
        biggest = max((r[3] for r in rows), default=1) or 1
        per_column = [0] * len(columns)
        for i, (name, kind, layer, added) in enumerate(rows):
            x, y = column(i, layer), roles.index(role(name, layer))
            per_column[x] += added
            top.scatter([x], [y], s=20 + 280 * added / biggest, color=colors.get(kind, "tab:gray"), alpha=0.8)
        top.set_yticks(range(len(roles)), roles, fontsize=7)
        top.set_xticks(range(len(columns)), columns)
        top.invert_yaxis()
        top.set_title(title, fontsize=9)
        for kind, color in colors.items():
            if any(r[1] == kind for r in rows):
                top.scatter([], [], color=color, label=kind)
        top.legend(fontsize=7, loc="lower right")
        bottom.bar(range(len(columns)), per_column, color="tab:blue")
        bottom.set_xticks(range(len(columns)), columns)
        bottom.set_xlabel("layer (before / after: sites outside the repeated layers)")
        bottom.set_ylabel("params added")
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
