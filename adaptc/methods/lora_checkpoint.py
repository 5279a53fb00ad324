"""LoRA adapters in PEFT's format: saving (PEFT's keys and config fields) and loading (checked against
the model's sites, PEFT's rank and alpha rules) — the LoRA method's save and load."""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from adaptc.checkpoint_files import Checkpoint
from adaptc.config import LoraConfig
from adaptc.errors import AdaptcError, CheckpointError
from adaptc.passes import experts
from adaptc.passes.lora import RankDeficientWarning, lora_shapes
from adaptc.passes.selection import select
from adaptc.passes.sites import site_key
from adaptc.peft_format import (
    PREFIX,
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
from adaptc.tables import few
from adaptc.warn import warn_user


def save(am: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config fields and tensors (PEFT's keys and layouts) of LoRA adapter ``name``."""
    config = am.adapter_configs()[name]
    sites = am.adapter_sites(name)
    tensors: dict[str, torch.Tensor] = {}
    peft_rank: dict[str, int] = {}
    peft_alpha: dict[str, float] = {}
    expert_sites = [site for site in sites if site.kind == experts.KIND]
    for site_name, path in expert_paths(am.base_model, [s.name for s in expert_sites]).items():
        layer = am.adapters[name][site_key(site_name)]
        for param in ("lora_A", "lora_B"):  # PEFT's layout already (passes/experts.py)
            tensors[f"{PREFIX}{path}.{param}.weight"] = getattr(layer, param).detach().cpu().contiguous().clone()
    sites = [site for site in sites if site.kind != experts.KIND]
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
    if expert_sites:  # PEFT's target_parameters: the 3-D weights by full name
        # (target_modules stays a list, [] if empty: PEFT fills a null one with its defaults for the model type)
        fields["target_parameters"] = [site.name for site in expert_sites]
    if any(site.kind == experts.KIND for site in am.all_sites):
        _warn_peft_renames(name, sites)
    return fields, tensors


# Module names PEFT 0.21 reads as transformers 4's per-expert modules in a mixture-of-experts model and
# rewrites into target_parameters on load (its checkpoint conversion for Mixtral, Qwen-MoE, DeepSeek-V3).
_PEFT_EXPERT_NAMES = ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "gate")


def _warn_peft_renames(name: str, sites: list) -> None:
    renamed = [site.name for site in sites if site.name.rpartition(".")[2] in _PEFT_EXPERT_NAMES]
    if renamed:
        warn_user(
            f"adapter {name!r}: PEFT will not load the LoRA of {few(renamed)} as saved: in a mixture-of-experts "
            "model it reads target_modules named like transformers 4's expert modules (gate_proj, up_proj, "
            "down_proj, w1-w3, gate) as the experts' fused weights. adaptc loads the checkpoint exactly"
        )


def expert_paths(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """PEFT's module path of the LoRA of each expert weight in ``names`` (full parameter names).

    PEFT wraps the module that owns the weights once per adapted parameter, in the order the module
    registers them, each wrapper around the last: the first parameter's LoRA ends up innermost,
    ``<owner>.base_layer.lora_A`` with two adapted, the last one's ``<owner>.lora_A``.
    """
    adapted: dict[str, set[str]] = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        adapted.setdefault(owner, set()).add(attr)
    paths = {}
    for owner, attrs in adapted.items():
        module = model.get_submodule(owner)
        ordered = [attr for attr, _ in module.named_parameters(recurse=False) if attr in attrs]
        for i, attr in enumerate(ordered):
            paths[f"{owner}.{attr}"] = owner + ".base_layer" * (len(ordered) - 1 - i)
    return paths


def _expert_modules(am: Any, by_module: dict[str, dict], config: dict) -> dict[str, dict]:
    """``by_module`` with PEFT's module paths of expert-weight LoRAs (``experts.base_layer``...) renamed to the
    expert weights they adapt, found with PEFT's own rule from the file's ``target_parameters``."""
    targets = config.get("target_parameters") or []
    if not targets:
        return by_module
    # A 2-D target (PEFT rewrites a router ``gate`` into ``gate.weight``) keeps its module's key: a linear site.
    expert_names = {site.name for site in am.all_sites if site.kind == experts.KIND}
    names = []
    for name, _ in am.base_model.named_parameters(remove_duplicate=False):
        if name in expert_names and (name in targets or any(name.endswith("." + t) for t in targets)):
            names.append(name)
    paths = {path: name for name, path in expert_paths(am.base_model, names).items()}
    return {paths.get(module, module): params for module, params in by_module.items()}


def _warn_peft_differences(am: Any, name: str, config: LoraConfig, sites: list) -> None:
    """adaptc reloads every adapter it saves; PEFT cannot reproduce a few sites. Say which, at save time."""
    params = dict(am.base_model.named_parameters(remove_duplicate=False))
    notes = []
    for site in sites:  # (expert weights are PEFT's target_parameters, not modules: not here)
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
        warn_user(
            f"adapter {name!r}: PEFT will not reproduce adaptc's outputs at {len(notes)} site(s) "
            f"({'; '.join(notes[:4])}{'; ...' if len(notes) > 4 else ''}); adaptc loads the checkpoint exactly"
        )


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
    by_module = _expert_modules(am, _group_keys(ckpt), ckpt.config)
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
        if site.kind == experts.KIND and file_lora.use_dora:
            raise CheckpointError(f"{ckpt.config_path}: DoRA on the expert weight {module}; PEFT and adaptc have "
                                  "plain LoRA on mixture-of-experts weights only")
        groups = conv_groups(site)
        if rank % groups:
            raise CheckpointError(f"{ckpt.config_path}: r={rank} for {module} is not a multiple of its groups={groups}")
        expected = lora_shapes(site, rank) if site.kind == experts.KIND else peft_shapes(site, rank, file_lora.use_dora)
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
        detail = "; ".join(f"{what}: {few(keys)}" for what, keys in (("missing", missing), ("unexpected", extra)) if keys)
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
            f"{ckpt.weights_path}: {few(not_lora)} are not LoRA parameters (PEFT's keys are "
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
            f"{type(am.base_model).__name__} ({few(unknown)}); is the adapter for another model?{hint} "
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
            "target_parameters": config.get("target_parameters") or None,
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


def load(am: Any, ckpt: Checkpoint, adapter_name: str) -> None:
    """Check ``ckpt`` against ``am``'s sites, then add it as LoRA adapter ``adapter_name`` and fill it in."""
    config, plans = plan_load(am, ckpt)
    differ = [f"{n}: {r}" for n, p in plans.items() if (r := peft_difference(p.site, config.use_dora))]
    if differ and "adaptc" not in ckpt.config:  # a PEFT-trained adapter
        warn_user(
            f"{ckpt.weights_path}: adaptc computes these sites as documented, PEFT differently, so outputs differ "
            f"from PEFT's there: {'; '.join(differ[:4])}"
        )
    init = residual_init(ckpt.config)
    if init:
        warn_user(
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
    copy_tensors(layers, plans)


@torch.no_grad()
def copy_tensors(layers: Any, plans: dict[str, _SitePlan]) -> None:
    """Write each plan's tensors into its site's layer (in the layer's dtype and device)."""
    for name, plan in plans.items():
        layer = layers[site_key(name)]
        for param, tensor in plan.tensors.items():
            target = getattr(layer, param)
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
