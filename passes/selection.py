"""Choosing sites by name, PEFT's way, plus layer indices.

- a string is ``re.fullmatch`` on the site name; ``"all-linear"`` is every linear-like
  site but the output head;
- a list matches exact names or dotted suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- ``exclude`` uses the same rules; ``layers`` keeps sites in those repeated-layer indices.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from adaptc.errors import ConfigError, TargetError

from .sites import Site, layer_index

Selector = str | Sequence[str] | None


def compile_selector(selector: Selector, what: str) -> Selector:
    """Validate a selector before anything is captured; returns it normalised."""
    if selector is None:
        return None
    if isinstance(selector, str):
        if selector in ("all-linear", "all"):
            return selector
        if not selector:
            raise ConfigError(f"{what} is an empty string; give a regular expression or a list of module names")
        try:
            re.compile(selector)
        except re.error as exc:
            raise ConfigError(f"{what}={selector!r} is not a valid regular expression: {exc}") from None
        return selector
    if isinstance(selector, (list, tuple, set, frozenset)):
        names = list(selector)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ConfigError(f"{what} must hold non-empty module names, got {bad!r}")
        if not names:
            raise ConfigError(f"{what} is an empty list; name at least one module, or use 'all-linear'")
        return names
    raise ConfigError(
        f"{what} must be a regular expression string, a list of module names or 'all-linear'; "
        f"got {type(selector).__name__}"
    )


def matches(selector: Selector, site: Site) -> bool:
    if selector is None:
        return False
    if selector == "all-linear":
        return site.linear_like and not site.is_head
    if selector == "all":
        return not site.is_head
    if isinstance(selector, str):
        return re.fullmatch(selector, site.name) is not None
    return any(site.name == n or site.name.endswith("." + n) for n in selector)


def select(
    sites: list[Site],
    targets: Selector,
    exclude: Selector = None,
    layers: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[Site]:
    """The sites ``targets`` picks, minus ``exclude``, within ``layers``; raises when none."""
    chosen = [s for s in sites if matches(targets, s) and not matches(exclude, s)]
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        patterns = (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern or ()) or None
        chosen = [s for s in chosen if layer_index(s.name, patterns) in wanted]
    if not chosen:
        raise TargetError(_no_match_message(sites, targets, exclude, layers))
    return chosen


def _no_match_message(sites: list[Site], targets: Selector, exclude: Selector, layers) -> str:
    names = [s.name for s in sites]
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    close: list[str] = []
    for w in wanted:
        pool = names + sorted({n.rsplit(".", 1)[-1] for n in names})
        close += [c for c in difflib.get_close_matches(str(w), pool, n=5, cutoff=0.4) if c not in close]
    detail = f"targets={targets!r}"
    if exclude is not None:
        detail += f", exclude={exclude!r}"
    if layers is not None:
        detail += f", layers={layers!r}"
    hint = f" Closest site names: {', '.join(close[:8])}." if close else ""
    if not sites:
        return f"{detail} matched nothing: the model has no linear, conv or embedding op to adapt."
    sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return (
        f"{detail} matched no site of the model.{hint} The model has {len(sites)} sites ({sample}); "
        "`adaptc inspect` lists them all."
    )
