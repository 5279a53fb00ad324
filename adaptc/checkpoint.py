"""Saving and loading adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

Safety: weights are read with safetensors only (nothing is unpickled); every file is written
to a temporary file in the same folder and renamed into place (``adaptc.atomic``), and a
checkpoint is checked against the model completely (keys, shapes, options) before the model
is touched.

The two files of one adapter are renamed one after the other, weights first. So that a save
interrupted between the two renames still loads as one complete checkpoint, the safetensors
metadata carries a copy of the config (PEFT ignores it) and a digest of the tensors. Both
copies carry a random save id: when the config file's id differs from the weights', the
config file is from an earlier save and adaptc uses the copy (a config edited by hand keeps
its id and is used as edited). Tensors that do not match the digest are refused.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch

from .atomic import atomic_write_bytes
from .checkpoint_files import (
    CONFIG_NAME,
    DEFAULT_ADAPTER,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Checkpoint,
    adapter_folder,
    check_new_name,
    digest,
    read_checkpoint,
)
from .errors import CheckpointError, InputError
from .methods import config_dict, get_method, method_for_checkpoint
from .methods.lora_checkpoint import plan_load
from .version import __version__

# --- saving ------------------------------------------------------------------------------------

def save_adapter(am: Any, directory: str | os.PathLike, adapter_name: str | list[str] | None = None) -> list[Path]:
    """Write adapters in PEFT's format; returns the folders written.

    ``adapter_name``: one name, a list, or None for every adapter. Like PEFT, the adapter
    named ``default`` goes in ``directory`` itself and any other in ``directory/<name>``.
    Every adapter is serialised (and every error raised) before the first file is written.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise InputError(f"directory must be a folder path (str or os.PathLike), got {type(directory).__name__}")
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name or am.adapters)
    unknown = [n for n in names if n not in am.adapters]
    if unknown or not names:
        raise CheckpointError(f"unknown adapter {unknown or names!r}; this model has: {', '.join(am.adapters)}")
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder; adapters are saved as a folder of two files")
    files = [(adapter_folder(root, name), *serialize(am, name)) for name in names]
    for folder, config_bytes, weights_bytes in files:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / WEIGHTS_NAME, weights_bytes)  # weights first: see the module docstring
        atomic_write_bytes(folder / CONFIG_NAME, config_bytes)
    return [folder for folder, _, _ in files]


def serialize(am: Any, name: str) -> tuple[bytes, bytes]:
    """(config file bytes, safetensors bytes) of adapter ``name``: its method's fields and tensors, plus
    what every checkpoint carries (the base model's name and class, adaptc's own config and save id)."""
    config = am.adapter_configs()[name]
    fields, tensors = get_method(config).save(am, name)
    base = am.base_model
    fields.setdefault("base_model_name_or_path", getattr(getattr(base, "config", None), "name_or_path", None) or None)
    fields.setdefault("auto_mapping", {"base_model_class": type(base).__name__, "parent_library": type(base).__module__})
    # adaptc's own settings (the selector as the user wrote it, init); PEFT ignores this field.
    # save_id tells an interrupted save (config file older than the weights) from a hand-edited config.
    fields["adaptc"] = {"version": __version__, "config": config_dict(config), "save_id": uuid.uuid4().hex}
    config_text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", "adaptc_config": config_text, "adaptc_sha256": digest(tensors)}
    return config_text.encode("utf-8"), safetensors.torch.save(tensors, metadata=metadata)


# --- loading -----------------------------------------------------------------------------------

def load_into(am: Any, directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Read, check, then add the adapter to ``am`` (it becomes the active one) and fill in its tensors."""
    check_new_name(am.adapters, adapter_name)
    load_checkpoint(am, read_checkpoint(directory, adapter_name), adapter_name)


def load_checkpoint(am: Any, ckpt: Checkpoint, adapter_name: str) -> None:
    """Add the adapter ``ckpt`` holds to ``am`` with the method its ``peft_type`` names."""
    method_for_checkpoint(ckpt.config, str(ckpt.config_path)).load(am, ckpt, adapter_name)


__all__ = [
    "CONFIG_NAME", "DEFAULT_ADAPTER", "LEGACY_WEIGHTS_NAME", "WEIGHTS_NAME", "Checkpoint", "adapter_folder",
    "load_checkpoint", "load_into", "plan_load", "read_checkpoint", "save_adapter", "serialize",
]
