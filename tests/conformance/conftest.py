"""The full matrix runs only under `make conformance` (ADAPTC_CONFORMANCE=1); otherwise only the
fast subset (FAST in test_matrix.py) is collected, so `make test` stays quick."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # zoo, cell, report import each other by name


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ADAPTC_CONFORMANCE") == "1":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("conformance_full") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
