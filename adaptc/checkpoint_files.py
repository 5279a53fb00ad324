"""An adapter's two files: PEFT's folder layout, atomic writes, the digest, reading and checking them.

Nothing here knows a method; the methods' own save and load (adaptc/methods/) fill the fields and
tensors. See adaptc/checkpoint.py for the safety rules (atomic renames, the embedded config copy).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import CheckpointError, ConfigError, InputError
from .warn import warn_user

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
DEFAULT_ADAPTER = "default"


def adapter_folder(root: Path, name: str) -> Path:
    return root if name == DEFAULT_ADAPTER else root / name


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: safetensors itself has no checksum."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """One adapter's files, read and checked as files (not yet against a model)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_path: Path
    weights_path: Path


def locate(directory: str | os.PathLike, adapter_name: str) -> Path:
    """The folder holding ``adapter_name``.

    ``directory/<name>`` when the adapter was saved there (save_adapter's and PEFT's save_pretrained's
    layout for an adapter not named ``default``). Otherwise ``directory``'s own files, loaded under
    ``adapter_name`` as PEFT's ``load_adapter(model_id, adapter_name)`` does, but only when ``directory`` is
    a one-adapter folder: in a folder that also holds adapters in subfolders, a name that is none of them is
    refused, rather than silently loading the folder's own adapter in its place.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise InputError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder; give the folder that holds {CONFIG_NAME}")
    if adapter_name != DEFAULT_ADAPTER and (root / adapter_name / CONFIG_NAME).is_file():
        return root / adapter_name
    inside = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    if (root / CONFIG_NAME).is_file():
        if adapter_name != DEFAULT_ADAPTER and inside:
            raise CheckpointError(
                f"{root} has no adapter {adapter_name!r} (no {root / adapter_name / CONFIG_NAME}); it holds "
                f"{DEFAULT_ADAPTER!r} (its own {CONFIG_NAME}) and, in subfolders, {', '.join(map(repr, inside))}. "
                f"Pass one of these names, or the folder of the adapter itself (e.g. {root / inside[0]})"
            )
        return root
    hint = f"; it has adapters in subfolders: {', '.join(inside)} (pass adapter_name=...)" if inside else ""
    raise CheckpointError(f"{root} holds no {CONFIG_NAME}{hint}")


def read_checkpoint(directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> Checkpoint:
    folder = locate(directory, adapter_name)
    weights_path, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights_path.is_file():
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{folder / LEGACY_WEIGHTS_NAME} is a pickle (PEFT's legacy format); adaptc never unpickles, since "
                "loading a pickle can run arbitrary code. If you trust the file, convert it once with "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), "
                f"'{weights_path}'), or re-save the adapter with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise CheckpointError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    raw = weights_path.read_bytes()
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others on odd input)
        raise CheckpointError(f"{weights_path} is not a complete safetensors file ({exc}): truncated or corrupted") from None
    metadata = _metadata(raw)
    if "adaptc_sha256" in metadata and metadata["adaptc_sha256"] != digest(tensors):
        raise CheckpointError(f"{weights_path}: the tensors do not match the checksum saved with them: corrupted file")
    config = _read_json(config_path)
    embedded = metadata.get("adaptc_config")
    if embedded is not None:
        try:
            stored = json.loads(embedded)
        except ValueError:
            raise CheckpointError(f"{weights_path}: its copy of the adapter config is not valid JSON") from None
        if _save_id(stored) != _save_id(config):
            # The weights come from a later save than the config file: that save was interrupted between
            # its two renames. Its own config, stored with the weights, makes the checkpoint whole.
            warn_user(
                f"{config_path} is older than {weights_path.name} (a save was interrupted between writing the two "
                "files); using the config saved inside the weights file"
            )
            config = stored
    return Checkpoint(config, tensors, config_path, weights_path)


def _save_id(config: dict[str, Any]) -> Any:
    own = config.get("adaptc")
    return own.get("save_id") if isinstance(own, dict) else None


def _metadata(raw: bytes) -> dict[str, str]:
    # Called after safetensors parsed the file, so the header is known to be well formed.
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]).get("__metadata__") or {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def check_new_name(existing: Any, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"adapter name must be an identifier such as 'default' or 'task_a', got {name!r}")
    if name in existing:
        raise ConfigError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name")
