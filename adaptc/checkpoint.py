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

import hashlib
import json
import math
import os
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .atomic import atomic_write_bytes
from .config import LoraConfig
from .errors import AdaptcError, CheckpointError, ConfigError, InputError
from .peft_format import (
    FileLora,
    conv_groups,
    exact_pattern,
    from_peft,
    key_for,
    parse_key,
    peft_difference,
    peft_fields,
    peft_shapes,
    read_file_lora,
    residual_init,
    to_peft,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
DEFAULT_ADAPTER = "default"


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
    files = [(adapter_folder(root, name), *_serialize(am, name)) for name in names]
    for folder, config_bytes, weights_bytes in files:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / WEIGHTS_NAME, weights_bytes)  # weights first: see the module docstring
        atomic_write_bytes(folder / CONFIG_NAME, config_bytes)
    return [folder for folder, _, _ in files]


def adapter_folder(root: Path, name: str) -> Path:
    return root if name == DEFAULT_ADAPTER else root / name


def _serialize(am: Any, name: str) -> tuple[bytes, bytes]:
    import adaptc
    from adaptc.passes.sites import site_key

    config = am.adapter_configs()[name]
    if not isinstance(config, LoraConfig):
        from . import prompt_checkpoint

        return prompt_checkpoint.serialize(am, name, _digest, _config_dict)
    sites = am.adapter_sites(name)
    tensors: dict[str, torch.Tensor] = {}
    peft_rank: dict[str, int] = {}
    peft_alpha: dict[str, float] = {}
    for site in sites:
        layer = am.adapters[name][site_key(site.name)]
        own = {param: p.detach().cpu() for param, p in layer.named_parameters(recurse=False)}
        for param, tensor in to_peft(site, own).items():
            tensors[key_for(site.name, param)] = tensor.contiguous().clone()
        groups = conv_groups(site)
        if groups > 1:  # PEFT's rank is r * groups there; keep alpha / rank (see peft_format)
            peft_rank[site.name] = layer.r * groups
            peft_alpha[site.name] = layer.alpha * (math.sqrt(groups) if config.rslora else groups)
    _warn_peft_differences(am, name, config, sites)
    fields = peft_fields(config, sites, peft_rank, peft_alpha)
    base = am.base_model
    fields["base_model_name_or_path"] = getattr(getattr(base, "config", None), "name_or_path", None) or None
    fields["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    # adaptc's own settings (the selector as the user wrote it, init); PEFT ignores this field.
    # save_id tells an interrupted save (config file older than the weights) from a hand-edited config.
    fields["adaptc"] = {"version": adaptc.__version__, "config": _config_dict(config), "save_id": uuid.uuid4().hex}
    config_text = json.dumps(fields, indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", "adaptc_config": config_text, "adaptc_sha256": _digest(tensors)}
    return config_text.encode("utf-8"), safetensors.torch.save(tensors, metadata=metadata)


def _warn_peft_differences(am: Any, name: str, config: LoraConfig, sites: list) -> None:
    """adaptc reloads every adapter it saves; PEFT cannot reproduce a few sites. Say which, at save time."""
    params = dict(am.base_model.named_parameters(remove_duplicate=False))
    notes = []
    for site in sites:
        reason = peft_difference(site, config.use_dora)
        if reason is None:
            try:  # PEFT wraps modules: the site must be a module whose .weight is the adapted weight
                owner = am.base_model.get_submodule(site.name)
            except AttributeError:
                owner = None
            weight = params.get(site.weight)
            if weight is not None and getattr(owner, "weight", None) is not weight:
                reason = "it is not a module's .weight (PEFT adapts modules)"
        if reason:
            notes.append(f"{site.name}: {reason}")
    if notes:
        _warn(
            f"adapter {name!r}: PEFT will not reproduce adaptc's outputs at {len(notes)} site(s) "
            f"({'; '.join(notes[:4])}{'; ...' if len(notes) > 4 else ''}); adaptc loads the checkpoint exactly"
        )


def _config_dict(config: LoraConfig) -> dict[str, Any]:
    data = config.to_dict()
    for key in ("targets", "exclude", "layers_pattern", "layers"):
        if isinstance(data.get(key), (tuple, set, frozenset)):
            data[key] = list(data[key])
    return data


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: safetensors itself has no checksum."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- reading -----------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """One adapter's files, read and checked as files (not yet against a model)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    config_path: Path
    weights_path: Path


def locate(directory: str | os.PathLike, adapter_name: str) -> Path:
    """The folder holding ``adapter_name``: ``directory/<name>`` when saved there, else ``directory``."""
    if not isinstance(directory, (str, os.PathLike)):
        raise InputError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a folder; give the folder that holds {CONFIG_NAME}")
    if adapter_name != DEFAULT_ADAPTER and (root / adapter_name / CONFIG_NAME).is_file():
        return root / adapter_name
    if (root / CONFIG_NAME).is_file():
        return root
    inside = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
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
    if "adaptc_sha256" in metadata and metadata["adaptc_sha256"] != _digest(tensors):
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
            _warn(
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


# --- loading into a model ----------------------------------------------------------------------

@dataclass
class _SitePlan:
    site: Any
    rank: int  # adaptc's rank
    scaling: float
    tensors: dict[str, torch.Tensor]  # adaptc's layout


def plan_load(am: Any, ckpt: Checkpoint) -> tuple[LoraConfig, dict[str, _SitePlan]]:
    """Check ``ckpt`` against ``am``'s sites and return the LoraConfig to add plus the tensors by site.

    Reads only; every mismatch raises CheckpointError naming the key, the shapes or the file.
    """
    file_lora = read_file_lora(ckpt.config, str(ckpt.config_path))
    by_module = _group_keys(ckpt)
    sites = _match_sites(am, by_module, ckpt)
    plans: dict[str, _SitePlan] = {}
    missing: list[str] = []
    extra: list[str] = []
    for module, params in by_module.items():
        site = sites[module]
        rank = file_lora.rank(module)
        scaling = file_lora.scaling(module, rank)  # PEFT's alpha / r with the stated r, whatever the tensors hold
        rank = _stored_rank(site, rank, params, ckpt.config, file_lora.use_dora)
        if site.kind == "embedding" and file_lora.use_dora:
            raise CheckpointError(f"{ckpt.weights_path}: DoRA on the embedding {module}; adaptc has DoRA on linear and conv only")
        groups = conv_groups(site)
        if rank % groups:
            raise CheckpointError(f"{ckpt.config_path}: r={rank} for {module} is not a multiple of its groups={groups}")
        expected = peft_shapes(site, rank, file_lora.use_dora)
        missing += [key_for(module, p) for p in expected if p not in params]
        extra += [key_for(module, p) for p in params if p not in expected]
        for param, shape in expected.items():
            if param in params and tuple(params[param].shape) != shape:
                raise CheckpointError(
                    f"{ckpt.weights_path}: {key_for(module, param)} has shape {list(params[param].shape)}, but "
                    f"{module} ({site.kind}, weight {site.shapes()}) with r={rank} needs {list(shape)}"
                )
        # A rank above site.max_rank() is loaded as it is: PEFT allows it (the update is rank-deficient).
        if not missing and not extra:
            tensors = from_peft(site, params, key_for(module, "lora_A"))
            plans[module] = _SitePlan(site, rank // groups, scaling, tensors)
    if missing or extra:
        detail = "; ".join(f"{what}: {_few(keys)}" for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
        raise CheckpointError(f"{ckpt.weights_path} does not match its config {ckpt.config_path.name} ({detail})")
    return _config_for(am, ckpt, file_lora, plans), plans


def _stored_rank(site: Any, rank: int, params: dict[str, torch.Tensor], config: dict, use_dora: bool) -> int:
    """The rank of the tensors stored for ``site``: the stated ``rank``, except after PEFT's PiSSA-like inits.

    Where r is above the rank of a linear weight, PEFT's SVD / QR inits (pissa, olora) give A and
    B only ``site.max_rank()`` rows / columns and leave r, and the scale alpha / r, as stated.
    """
    if site.kind != "linear" or rank <= site.max_rank() or residual_init(config) is None:
        return rank
    short = peft_shapes(site, site.max_rank(), use_dora)
    if all(param in params and tuple(params[param].shape) == shape for param, shape in short.items()):
        return site.max_rank()
    return rank


def _group_keys(ckpt: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    not_lora = [key for key in ckpt.tensors if parse_key(key) is None]
    if not_lora:
        raise CheckpointError(
            f"{ckpt.weights_path}: {_few(not_lora)} are not LoRA parameters (PEFT's keys are "
            "base_model.model.<module>.lora_A.weight / lora_B.weight / lora_embedding_A / lora_embedding_B / "
            "lora_magnitude_vector); base-model weights and modules_to_save are not adapter state adaptc loads"
        )
    if not ckpt.tensors:
        raise CheckpointError(f"{ckpt.weights_path} holds no tensors")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in ckpt.tensors.items():
        module, param = parse_key(key)
        by_module.setdefault(module, {})[param] = tensor
    return by_module


def _match_sites(am: Any, by_module: dict[str, dict], ckpt: Checkpoint) -> dict[str, Any]:
    import difflib

    found: dict[str, Any] = {}
    for module, params in by_module.items():
        candidates = [s for s in am.all_sites if s.name == module]
        if len(candidates) > 1:  # one name used as two kinds: the keys say which
            is_embedding = any(p.startswith("lora_embedding") for p in params)
            candidates = [s for s in candidates if (s.kind == "embedding") == is_embedding]
        if candidates:
            found[module] = candidates[0]
    unknown = [m for m in by_module if m not in found]
    if unknown:
        names = [s.name for s in am.all_sites]
        close = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
        hint = f" The closest site names to {unknown[0]!r}: {', '.join(close)}." if close else ""
        raise CheckpointError(
            f"{ckpt.weights_path}: {len(unknown)} of the {len(by_module)} adapted modules are not sites of this "
            f"{type(am.base_model).__name__} ({_few(unknown)}); is the adapter for another model?{hint} "
            "`adaptc inspect` lists the sites."
        )
    return found


def _config_for(am: Any, ckpt: Checkpoint, file_lora: FileLora, plans: dict[str, _SitePlan]) -> LoraConfig:
    """The config the checkpoint states, when it selects exactly these sites with these ranks and scales.

    Otherwise (PEFT matched modules by another rule than adaptc's, or layer indices count
    differently) an explicit config: these sites by exact name, each with its rank and alpha.
    """
    stated = _stated_config(ckpt.config, file_lora)
    if stated is not None and _selects_exactly(am, stated, plans):
        return stated
    dropout = stated.dropout if stated is not None else 0.0
    rank = {exact_pattern(name): plan.rank for name, plan in plans.items()}
    alpha = {
        exact_pattern(name): plan.scaling * (math.sqrt(plan.rank) if file_lora.rslora else plan.rank)
        for name, plan in plans.items()
    }
    return LoraConfig.from_options(
        r=file_lora.r, alpha=file_lora.alpha, dropout=dropout, targets="|".join(rank), rslora=file_lora.rslora,
        use_dora=file_lora.use_dora, rank_pattern=rank, alpha_pattern=alpha,
    )


def _stated_config(config: dict[str, Any], file_lora: FileLora) -> LoraConfig | None:
    own = config.get("adaptc")
    if isinstance(own, dict) and isinstance(own.get("config"), dict):
        options = {k: v for k, v in own["config"].items() if k != "method"}
    else:
        options = {
            "r": file_lora.r, "alpha": file_lora.alpha, "dropout": config.get("lora_dropout", 0.0),
            "targets": config.get("target_modules"), "exclude": config.get("exclude_modules"),
            "layers": config.get("layers_to_transform"), "layers_pattern": config.get("layers_pattern"),
            "rslora": file_lora.rslora, "use_dora": file_lora.use_dora,
            "rank_pattern": file_lora.rank_pattern, "alpha_pattern": file_lora.alpha_pattern,
            "init": "gaussian" if config.get("init_lora_weights") == "gaussian" else "default",
        }
    if options.get("init") == "pissa":
        options["init"] = "default"  # the weights come from the file; PiSSA would change W again
    try:
        return LoraConfig.from_options(**options)
    except (AdaptcError, TypeError):
        return None


def _selects_exactly(am: Any, config: LoraConfig, plans: dict[str, _SitePlan]) -> bool:
    from adaptc.passes.selection import select

    try:
        chosen = select(am.all_sites, config.targets, config.exclude, config.layers, config.layers_pattern)
    except AdaptcError:
        return False
    if sorted(s.name for s in chosen) != sorted(plans) or config.use_dora != _uses_dora(plans):
        return False
    for site in chosen:
        plan = plans[site.name]
        r, alpha = config.rank_for(site.name), config.alpha_for(site.name)
        scaling = alpha / math.sqrt(r) if config.rslora else alpha / r
        if site.kind != plan.site.kind or r != plan.rank or not math.isclose(scaling, plan.scaling, rel_tol=1e-6):
            return False
    return True


def _uses_dora(plans: dict[str, _SitePlan]) -> bool:
    return any("lora_magnitude_vector" in plan.tensors for plan in plans.values())


def _warn(message: str) -> None:
    """A UserWarning attributed to the caller's line outside adaptc (Python 3.11 lacks skip_file_prefixes)."""
    frame, level, package = sys._getframe(1), 2, os.path.dirname(__file__) + os.sep  # 2: _warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _few(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def load_into(am: Any, directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Read, check, then add the adapter to ``am`` (it becomes the active one) and fill in its tensors."""
    _check_new_name(am.adapters, adapter_name)
    _load_checkpoint(am, read_checkpoint(directory, adapter_name), adapter_name)


def _load_checkpoint(am: Any, ckpt: Checkpoint, adapter_name: str) -> None:
    from adaptc.passes.lora import RankDeficientWarning
    from adaptc.passes.sites import site_key

    from . import prompt_checkpoint

    if prompt_checkpoint.is_prompt_checkpoint(ckpt.config):
        prompt_checkpoint.load(am, ckpt, adapter_name)
        return
    config, plans = plan_load(am, ckpt)
    differ = [f"{n}: {r}" for n, p in plans.items() if (r := peft_difference(p.site, config.use_dora))]
    if differ and "adaptc" not in ckpt.config:  # a PEFT-trained adapter
        _warn(
            f"{ckpt.weights_path}: adaptc computes these sites as documented, PEFT differently, so outputs differ "
            f"from PEFT's there: {'; '.join(differ[:4])}"
        )
    init = residual_init(ckpt.config)
    if init:
        _warn(
            f"{ckpt.config_path}: init_lora_weights={init!r} subtracted the adapter's initial value from the base "
            "weights when it was trained; it reproduces the trained model only on that changed base model"
        )
    # From here the model changes; everything that can be wrong with the checkpoint was checked above.
    with warnings.catch_warnings():
        # A rank above what a weight allows is a choice made when the adapter was trained: load it quietly.
        warnings.simplefilter("ignore", RankDeficientWarning)
        am.add_adapter(adapter_name, config)
    layers = am.adapters[adapter_name]
    if set(layers) != {site_key(name) for name in plans}:  # cannot happen if plan_load and select agree
        am.delete_adapter(adapter_name)
        raise CheckpointError(f"internal error: {config} did not select the checkpoint's sites; nothing was loaded")
    with torch.no_grad():
        for name, plan in plans.items():
            layer = layers[site_key(name)]
            for param, tensor in plan.tensors.items():
                target = getattr(layer, param)
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def _check_new_name(existing: Any, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"adapter name must be an identifier such as 'default' or 'task_a', got {name!r}")
    if name in existing:
        raise ConfigError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name")


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    example_inputs: Any,
    adapter_name: str = DEFAULT_ADAPTER,
) -> Any:
    """Capture ``model`` and load a saved LoRA adapter (written by adaptc or PEFT) into it.

    Returns an AdaptedModel whose active adapter is ``adapter_name``. ``directory`` is the
    folder given to ``save_adapter`` / ``save_pretrained``; an adapter saved there under a
    name other than ``default`` is found in its subfolder. The files are read and checked
    before the (slow) capture, and against the model's sites before the model is touched.
    """
    from adaptc.passes.sites import find_sites

    from .capture import capture
    from .inputs import check_has_tensor, normalize_inputs
    from .model import AdaptedModel

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel):
        raise InputError("model is already an AdaptedModel; use am.load_adapter(directory, adapter_name) to add one")
    _check_new_name((), adapter_name)
    ckpt = read_checkpoint(directory, adapter_name)  # a bad file fails before the (slow) capture
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    graph = capture(model, inputs)
    am = AdaptedModel(model, graph, find_sites(graph, model))
    _load_checkpoint(am, ckpt, adapter_name)
    return am


__all__ = ["Checkpoint", "load_adapter", "load_into", "plan_load", "read_checkpoint", "save_adapter"]
