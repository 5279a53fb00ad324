"""Prompt-method adapters in PEFT's format.

PEFT keeps one tensor, ``prompt_embeddings``: the virtual tokens [V, hidden] for prompt tuning
and P-tuning (the encoder's *output*: PEFT folds the encoder at save), and for prefix tuning
every layer's keys and values as [V, layers * 2 * heads * head_dim] (per layer: keys, then
values). adaptc writes the same tensor, so PEFT loads adaptc's files, plus its own
``adaptc.encoder.*`` tensors (the P-tuning encoder, the prefix projection), which PEFT ignores,
so that training can resume. A PEFT P-tuning file has no encoder: adaptc loads it as the
constant virtual tokens it is (as a prompt-tuning adapter) and says so.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from adaptc.config import PrefixConfig, PromptConfig, PTuningConfig
from adaptc.errors import CheckpointError
from adaptc.passes.sites import site_key

PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}
METHOD_OF = {v: k for k, v in PEFT_TYPES.items()}
TABLE = "prompt_embeddings"
ENCODER = "adaptc.encoder."


def _task_type(model: Any) -> str | None:
    """PEFT's task_type for its loader (metadata only: PEFT picks its wrapper class by it)."""
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


def is_prompt_checkpoint(config: dict[str, Any]) -> bool:
    return config.get("peft_type") in METHOD_OF


def _prefix_table(am: Any, name: str) -> torch.Tensor:
    layers = am.adapters[name]
    rows = []
    for site in am.adapter_sites(name):
        key, value = layers[site_key(site.name)].prefix()
        tokens = key.shape[1]
        rows += [key.transpose(0, 1).reshape(tokens, -1), value.transpose(0, 1).reshape(tokens, -1)]
    return torch.cat(rows, dim=1)


def save(am: Any, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config fields and tensors of prompt-method adapter ``name``."""
    config = am.adapter_configs()[name]
    layers = am.adapters[name]
    sites = am.adapter_sites(name)
    with torch.no_grad():
        if config.method == "prefix":
            table = _prefix_table(am, name)
            encoder = layers["prefix_encoder"] if "prefix_encoder" in layers else None
            first = sites[0]
            token_dim = first.source_kv_heads * first.head_dim
            fields = {"num_attention_heads": first.source_kv_heads, "num_layers": len(sites),
                      "prefix_projection": encoder is not None,
                      "encoder_hidden_size": config.encoder_hidden_size or first.heads * first.head_dim}
        else:
            adapter = layers["prompt"]
            table = adapter.prompt()
            encoder = adapter if config.method == "ptuning" and not adapter.folded else None
            token_dim = adapter.entry.hidden
            fields = {"num_attention_heads": None, "num_layers": None}
            if config.method == "ptuning":
                fields.update(encoder_reparameterization_type=config.encoder.upper(),
                              encoder_hidden_size=config.encoder_hidden_size or token_dim,
                              encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout)
            else:
                fields.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None)
        tensors = {TABLE: table.detach().cpu().contiguous().clone()}
        if encoder is not None:
            for pname, param in encoder.state_dict().items():
                tensors[ENCODER + pname] = param.detach().cpu().contiguous().clone()
    fields.update(
        peft_type=PEFT_TYPES[config.method], task_type=_task_type(am.base_model),
        num_virtual_tokens=config.num_virtual_tokens, token_dim=token_dim, num_transformer_submodules=1,
        inference_mode=True, revision=None, modules_to_save=None,
    )
    return fields, tensors


def _config_from_file(config: dict[str, Any], has_encoder: bool, path: str) -> Any:
    method = METHOD_OF[config["peft_type"]]
    tokens = config.get("num_virtual_tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        raise CheckpointError(f"{path}: num_virtual_tokens must be a positive integer, got {tokens!r}")
    own = (config.get("adaptc") or {}).get("config") or {}
    if method == "prefix":
        return PrefixConfig(num_virtual_tokens=tokens, prefix_projection=bool(config.get("prefix_projection")) and has_encoder,
                            encoder_hidden_size=config.get("encoder_hidden_size"),
                            shift_positions=own.get("shift_positions", True))
    if method == "ptuning" and has_encoder:
        return PTuningConfig(num_virtual_tokens=tokens, encoder=str(config.get("encoder_reparameterization_type", "MLP")).lower(),
                             encoder_hidden_size=config.get("encoder_hidden_size"),
                             encoder_num_layers=config.get("encoder_num_layers", 2),
                             encoder_dropout=config.get("encoder_dropout", 0.0))
    if method == "ptuning":
        warnings.warn(
            f"adaptc: {path} is a P-tuning adapter saved without its prompt encoder (PEFT saves only the encoder's "
            "output); it is loaded as those constant virtual tokens, and further training tunes them directly",
            UserWarning, stacklevel=4,
        )
    return PromptConfig(num_virtual_tokens=tokens)


def load(am: Any, ckpt: Any, adapter_name: str) -> None:
    """Add the checkpoint's prompt-method adapter to ``am`` under ``adapter_name`` and fill it in."""
    table = ckpt.tensors.get(TABLE)
    if table is None or table.dim() != 2:
        raise CheckpointError(f"{ckpt.weights_path} has no 2-d {TABLE!r} tensor; it is not a prompt-method adapter")
    encoder = {k[len(ENCODER):]: v for k, v in ckpt.tensors.items() if k.startswith(ENCODER)}
    config = _config_from_file(ckpt.config, bool(encoder), str(ckpt.config_path))
    if table.shape[0] != config.num_virtual_tokens:
        raise CheckpointError(
            f"{ckpt.weights_path}: {TABLE} has {table.shape[0]} rows but the config says num_virtual_tokens="
            f"{config.num_virtual_tokens}"
        )
    am.add_adapter(adapter_name, config)
    layers = am.adapters[adapter_name]
    try:
        with torch.no_grad():
            if config.method == "prefix":
                if encoder:
                    layers["prefix_encoder"].load_state_dict(encoder, strict=True)
                else:
                    _load_prefix_table(am, adapter_name, table, site_key)
            elif encoder:
                layers["prompt"].load_state_dict(encoder, strict=True)
            else:
                embedding = layers["prompt"].embedding.weight
                if embedding.shape != table.shape:
                    raise CheckpointError(
                        f"{ckpt.weights_path}: {TABLE} is {tuple(table.shape)} but this model's virtual tokens are "
                        f"{tuple(embedding.shape)}: the adapter was trained for another model"
                    )
                embedding.copy_(table.to(embedding.dtype))
    except (CheckpointError, RuntimeError) as exc:
        am.delete_adapter(adapter_name)  # the model is left as it was
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.weights_path} does not fit this model: {exc}") from None


def _load_prefix_table(am: Any, name: str, table: torch.Tensor, site_key) -> None:
    layers = am.adapters[name]
    offset = 0
    for site in am.adapter_sites(name):
        layer = layers[site_key(site.name)]
        for which, dim in (("key", site.head_dim), ("value", site.value_dim)):
            width = site.source_kv_heads * dim
            if offset + width > table.shape[1]:
                raise CheckpointError(
                    f"{TABLE} is {tuple(table.shape)}, too narrow for this model's {len(am.adapter_sites(name))} "
                    "attention layers: the adapter was trained for another model"
                )
            part = table[:, offset: offset + width].reshape(table.shape[0], site.source_kv_heads, dim).transpose(0, 1)
            getattr(layer, which).copy_(part)
            offset += width
    if offset != table.shape[1]:
        raise CheckpointError(f"{TABLE} is {tuple(table.shape)} but this model's prefixes take {offset} columns")
