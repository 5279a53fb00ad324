"""PEFT's checkpoint format for the methods that store named tensors per module (LoHa, LoKr, VeRA).

PEFT writes ``base_model.model.<module>.<param>`` for each adapted module (``hada_w1_a``,
``lokr_w1``, ``vera_lambda_b``, ...), plus shared tensors under their own keys (VeRA's
``base_model.vera_A``), and its config's fields under its option names. Saving writes exactly
that, with ``target_modules`` as the list of adapted modules (PEFT would resolve a selector over
its own candidates). Loading checks the keys, the modules and every shape against the model
before it adds the adapter, so a checkpoint that does not fit changes nothing.

A method using this module provides ``shapes(site, config)``, ``peft_fields(config, sites)``,
``param_prefix``, ``supports(site)`` and, for shared tensors, ``shared_keys``,
``shared_tensors(am, name)``, ``check_shared(...)`` and ``load_shared(...)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import torch

from adaptc.checkpoint_files import Checkpoint
from adaptc.errors import AdaptcError, CheckpointError
from adaptc.passes.sites import site_key
from adaptc.peft_format import PREFIX, exact_pattern
from adaptc.tables import few
from adaptc.warn import warn_user


def key_for(site_name: str, param: str) -> str:
    return f"{PREFIX}{site_name}.{param}"


# --- saving ------------------------------------------------------------------------------------

def save(method: Any, am: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config fields and tensors of adapter ``name``."""
    config, sites = am.adapter_configs()[name], am.adapter_sites(name)
    tensors: dict[str, torch.Tensor] = {}
    for site in sites:
        layer = am.adapters[name][site_key(site.name)]
        for param, value in layer.named_parameters(recurse=False):
            tensors[key_for(site.name, param)] = value.detach().cpu().contiguous().clone()
    if hasattr(method, "shared_tensors"):  # VeRA's projections, under their own keys
        tensors |= {k: v.detach().cpu().contiguous().clone() for k, v in method.shared_tensors(am, name).items()}
    _warn_peft_differences(method, am, name, sites)
    return method.peft_fields(config, sites), tensors


def _warn_peft_differences(method: Any, am: Any, name: str, sites: list) -> None:
    """PEFT wraps modules of a few types; say at save time which sites PEFT cannot reproduce."""
    params = dict(am.base_model.named_parameters(remove_duplicate=False))
    notes = []
    for site in sites:
        try:
            owner = am.base_model.get_submodule(site.name)
        except AttributeError:
            owner = None
        if owner is None or getattr(owner, "weight", None) is not params.get(site.weight):
            notes.append(f"{site.name}: it is not a module's .weight (PEFT adapts modules)")
        elif not any(cls.__name__ in method.peft_module_types for cls in type(owner).__mro__):  # PEFT: isinstance
            notes.append(f"{site.name}: PEFT's {method.checkpoint_type} takes {', '.join(method.peft_module_types)} "
                         f"modules, not {type(owner).__name__}")
    if notes:
        warn_user(
            f"adapter {name!r}: PEFT cannot load this {method.checkpoint_type} adapter at {len(notes)} site(s) "
            f"({'; '.join(notes[:4])}{'; ...' if len(notes) > 4 else ''}); adaptc loads it exactly"
        )


# --- loading -----------------------------------------------------------------------------------

def load(method: Any, am: Any, ckpt: Checkpoint, adapter_name: str) -> None:
    """Check ``ckpt`` against ``am`` completely, then add it as ``adapter_name`` and fill in its tensors."""
    by_module, shared = _group_keys(method, ckpt)
    sites = _match_sites(method, am, by_module, ckpt)
    config = _config_for(method, am, ckpt, sites)
    missing, extra = [], []
    for module, params in by_module.items():
        expected = method.shapes(sites[module], config)
        missing += [key_for(module, p) for p in expected if p not in params]
        extra += [key_for(module, p) for p in params if p not in expected]
        for param, shape in expected.items():
            if param in params and tuple(params[param].shape) != tuple(shape):
                raise CheckpointError(
                    f"{ckpt.weights_path}: {key_for(module, param)} has shape {list(params[param].shape)}, but "
                    f"{module} ({sites[module].kind}, weight {sites[module].shapes()}) with this config needs {list(shape)}"
                )
    if missing or extra:
        detail = "; ".join(f"{what}: {few(keys)}" for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
        raise CheckpointError(f"{ckpt.weights_path} does not match its config {ckpt.config_path.name} ({detail})")
    if hasattr(method, "check_shared"):
        method.check_shared(config, shared, list(sites.values()), ckpt)
    # From here the model changes; everything that can be wrong with the checkpoint was checked above.
    am.add_adapter(adapter_name, config)
    layers = am.adapters[adapter_name]
    if set(layers) != {site_key(m) for m in by_module}:  # cannot happen if _config_for and select agree
        am.delete_adapter(adapter_name)
        raise CheckpointError("internal error: the loaded config did not select the checkpoint's modules; nothing was loaded")
    with torch.no_grad():
        for module, params in by_module.items():
            layer = layers[site_key(module)]
            for param, tensor in params.items():
                target = getattr(layer, param)
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))
    if hasattr(method, "load_shared"):
        method.load_shared(am, adapter_name, shared)


def _group_keys(method: Any, ckpt: Checkpoint) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    if not ckpt.tensors:
        raise CheckpointError(f"{ckpt.weights_path} holds no tensors")
    shared_keys = getattr(method, "shared_keys", ())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    other = []
    for key, tensor in ckpt.tensors.items():
        module, _, param = key.rpartition(".")
        if key in shared_keys:
            shared[key] = tensor
        elif key.startswith(PREFIX) and len(module) > len(PREFIX) and param.startswith(method.param_prefix):
            by_module.setdefault(module[len(PREFIX):], {})[param] = tensor
        else:
            other.append(key)
    if other:
        raise CheckpointError(
            f"{ckpt.weights_path}: {few(other)} are not {method.checkpoint_type} parameters (PEFT's keys are "
            f"base_model.model.<module>.{method.param_prefix}...); base-model weights and modules_to_save are not "
            "adapter state adaptc loads"
        )
    if not by_module:
        raise CheckpointError(f"{ckpt.weights_path} holds no per-module {method.checkpoint_type} parameters")
    return by_module, shared


def _match_sites(method: Any, am: Any, by_module: dict, ckpt: Checkpoint) -> dict[str, Any]:
    found = {}
    for module in by_module:
        candidates = [s for s in am.all_sites if s.name == module and method.supports(s)]
        if candidates:
            found[module] = candidates[0]
    unknown = [m for m in by_module if m not in found]
    if unknown:
        names = [s.name for s in am.all_sites if method.supports(s)]
        close = difflib.get_close_matches(unknown[0], names, n=3, cutoff=0.5)
        hint = f" The closest site names to {unknown[0]!r}: {', '.join(close)}." if close else ""
        raise CheckpointError(
            f"{ckpt.weights_path}: {len(unknown)} of the {len(by_module)} adapted modules are not sites "
            f"{method.checkpoint_type} can adapt in this {type(am.base_model).__name__} ({few(unknown)}); is the "
            f"adapter for another model?{hint} `adaptc inspect` lists the sites."
        )
    return found


def _config_for(method: Any, am: Any, ckpt: Checkpoint, sites: dict[str, Any]) -> Any:
    """The checkpoint's config (adaptc's own copy, else PEFT's fields); its selectors replaced by the
    checkpoint's modules by exact name when they would not pick exactly those sites here."""
    own = ckpt.config.get("adaptc")
    if isinstance(own, dict) and isinstance(own.get("config"), dict):
        options = {k: tuple(v) if isinstance(v, list) and k != "target_modules" else v
                   for k, v in own["config"].items() if k != "method"}
    else:
        known = {f.name for f in dataclasses.fields(method.config_class)}
        options = {k: v for k, v in ckpt.config.items() if k in known and v is not None}
        if hasattr(method, "check_peft_fields"):
            method.check_peft_fields(ckpt)
    try:
        config = method.config_class.from_options(**options)
    except (AdaptcError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.config_path}: its {method.checkpoint_type} options are not valid here: {exc}") from None
    try:
        chosen = {s.name for s in config.select(am.all_sites)}
    except AdaptcError:
        chosen = set()
    if chosen != set(sites):
        exact = "|".join(exact_pattern(name) for name in sites)
        config = dataclasses.replace(config, target_modules=exact, exclude_modules=None,
                                     layers_to_transform=None, layers_pattern=None)
        config.validate()
    return config
