"""Training checkpoints: ``last/`` and ``best/`` adapter folders, each with the state to resume from.

A checkpoint folder holds the adapter in PEFT's format (loadable by ``adaptc.load_adapter`` and
``adaptc export --adapter``) plus ``trainer_state.pt``: the adapter tensors, the optimizer and
scheduler state, the step, the data position and the RNG state. The folder is written whole
under a temporary name and swapped into place, so a crash leaves the old checkpoint or the new
one, never a mix: ``<name>`` is renamed to ``.<name>.old``, the new folder to ``<name>``, then
the old one is deleted; a reader that finds only ``.<name>.old`` (a crash between the two
renames) uses it.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .atomic import _fsync_dir, atomic_write_bytes
from .errors import CheckpointError

STATE_NAME = "trainer_state.pt"
STATE_VERSION = 1


def save_checkpoint(am: Any, root: Path, name: str, state: dict[str, Any]) -> Path:
    """Write ``root/name`` (adapter + trainer state) atomically; returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give what mkdir would
        am.save_adapter(tmp, am.active_adapter)
        buffer = io.BytesIO()
        torch.save({"version": STATE_VERSION, **state}, buffer)
        atomic_write_bytes(tmp / STATE_NAME, buffer.getvalue())
        target, old = root / name, root / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def checkpoint_dir(root: Path, name: str) -> Path | None:
    """The folder of checkpoint ``name`` under ``root``, or None when there is none."""
    for candidate in (root / name, root / f".{name}.old"):
        if (candidate / STATE_NAME).is_file():
            return candidate
    return None


def load_state(folder: Path) -> dict[str, Any]:
    """The trainer state saved in ``folder`` (tensors and plain values only: nothing is unpickled)."""
    path = folder / STATE_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}); delete {folder} to start over"
        ) from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not a trainer state written by this version of adaptc; delete {folder} to start over")
    return state
