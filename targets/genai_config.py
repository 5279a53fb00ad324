"""``genai_config.json``: what onnxruntime-genai needs to run an exported decoder folder.

onnxruntime-genai feeds the decoder's inputs by the names given here (``past_key_values.%d.key``
...), allocates the key/value cache from ``num_key_value_heads`` x ``head_size``, and lets the
cache grow step by step (``past_present_share_buffer: false``: the graph concatenates past and new
keys itself). The model ``type`` only selects onnxruntime-genai's plain decoder-only runner: every
architecture is written as ``llama``, since the graph, not the runner, holds what differs between
architectures (onnxruntime-genai's ``gpt2`` runner, for one, expects a packed cache layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

CONFIG_FILE = "genai_config.json"
RUNNER_TYPE = "llama"
DEFAULT_CONTEXT = 2048  # when the config names no maximum position


def context_length(config: Any, window: int | None) -> int:
    """The longest sequence the folder serves: the model's positions, and below a sliding window, whose
    cache keeps only its last ``window - 1`` tokens (the graph would then drop keys ORT's mask counts)."""
    positions = getattr(config, "max_position_embeddings", None)
    length = positions if isinstance(positions, int) and positions > 0 else DEFAULT_CONTEXT
    return min(length, window - 1) if window else length


def _tokens(base: nn.Module, name: str) -> list[int]:
    """The token ids of that name that transformers' generate uses (its generation config, else the model's
    config) and that lie in the vocabulary (onnxruntime-genai refuses others; they are never generated)."""
    config = base.config
    value = getattr(getattr(base, "generation_config", None), name, None)
    value = getattr(config, name, None) if value is None else value
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and 0 <= v < config.vocab_size]


def build(base: nn.Module, layout: Any, filename: str) -> dict[str, Any]:
    """The config for a decoder folder (``layout``: targets.onnx_decoder.Layout, read from the model's cache)."""
    config = base.config
    length = context_length(config, layout.window)
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    for name in ("attention_mask", "position_ids"):
        if name in layout.keywords:
            inputs[name] = name
    eos = _tokens(base, "eos_token_id")
    pad = (_tokens(base, "pad_token_id") or eos or [0])[0]  # rows that ended are padded with it
    eos = eos or [pad]  # onnxruntime-genai needs an EOS in the vocabulary (missing_eos says so)
    model: dict[str, Any] = {
        "context_length": length,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename,
            "head_size": layout.head_size,
            "hidden_size": int(getattr(config, "hidden_size", layout.kv_heads * layout.head_size)),
            "inputs": inputs,
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": int(getattr(config, "num_attention_heads", layout.kv_heads)),
            "num_hidden_layers": layout.layers,
            "num_key_value_heads": layout.kv_heads,
        },
        "type": RUNNER_TYPE,
        "vocab_size": int(config.vocab_size),
    }
    # onnxruntime-genai stops a row at EOS and pads it with pad_token_id
    bos = _tokens(base, "bos_token_id")
    if bos:
        model["bos_token_id"] = bos[0]
    model["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    model["pad_token_id"] = pad
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_k": 1, "top_p": 1.0,
    }
    return {"model": model, "search": search}


def missing_eos(base: nn.Module) -> str | None:
    """What the folder stops at though the model has no EOS token in its vocabulary (None: it has one)."""
    if _tokens(base, "eos_token_id"):
        return None
    pad = (_tokens(base, "pad_token_id") or [0])[0]
    return (f"{type(base).__name__} names no EOS token inside its vocabulary; onnxruntime-genai needs one, so "
            f"{CONFIG_FILE} names token {pad} (its pad token, else 0) and generation stops there")


def write(folder: Path, base: nn.Module, layout: Any, filename: str) -> Path | None:
    """Write the config; None (no file) when keys and values differ in head size, which it cannot state."""
    if layout.head_size != layout.value_head_size:
        return None
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(build(base, layout, filename), indent=2) + "\n")
    return path


def save_tokenizer(tokenizer: Any, folder: Path) -> list[str]:
    """The tokenizer's files (tokenizer.json ... as transformers saves them); the names written."""
    before = {p.name for p in folder.iterdir()}
    tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in before)
