"""Warnings attributed to the user's line: the first frame outside adaptc (its front end, passes, targets)."""

from __future__ import annotations

import os
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
_PROJECT = os.path.dirname(_HERE)
# Installed, passes/ and targets/ live inside adaptc/; in a checkout (editable install) beside it.
_INSIDE = tuple(os.path.join(d, "") for d in (_HERE, os.path.join(_PROJECT, "passes"), os.path.join(_PROJECT, "targets")))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside adaptc (Python 3.11 has no
    ``skip_file_prefixes``)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is the frame that called warn_user
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
