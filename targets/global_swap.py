"""A library's module attribute replaced while any of several blocks is open.

onnxscript reads some of its rule tables and fusion functions from module globals, so adaptc swaps
them for the duration of a fusion run. Blocks may nest or overlap across threads: the first to open
swaps the attribute in, the last to close puts the original back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class SharedSwap:
    """``owner().<attr>`` replaced by ``replacement(original)`` inside :meth:`applied` blocks.

    Nothing is swapped when ``owner()`` is None, the attribute is missing, or ``replacement`` returns
    None (another library version: nothing to change).
    """

    def __init__(self, owner: Callable[[], Any], attr: str, replacement: Callable[[Any], Any]) -> None:
        self._owner, self._attr, self._replacement = owner, attr, replacement
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple[Any, Any] | None = None  # (owner, original) while swapped

    @contextmanager
    def applied(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._swap_in()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._saved is not None:
                    owner, original = self._saved
                    setattr(owner, self._attr, original)
                    self._saved = None

    def _swap_in(self) -> None:
        owner = self._owner()
        original = getattr(owner, self._attr, None) if owner is not None else None
        new = self._replacement(original) if original is not None else None
        if new is not None:
            setattr(owner, self._attr, new)
            self._saved = (owner, original)
