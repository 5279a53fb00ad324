"""One generation step at a time through an exported decoder session: the inputs of a step, the
presents fed back as the next step's past, and a greedy loop.

The export's parity check and quantization report (targets/onnx_decoder.py) and adaptc.ort's session
engine run these, so that all three feed the graph alike: positions count the attended tokens
before each one (as transformers' generate does with left padding), the prompt's step has past
length 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort


def empty_past(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Past length 0 for every cache input: the prompt's step."""
    feeds = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            shape = [batch if i == 0 else 0 if i == 2 else d for i, d in enumerate(value.shape)]
            feeds[value.name] = np.zeros(shape, np.float32)
    return feeds


def step_feeds(names: set[str], ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One step's inputs: ``ids`` are the new tokens, ``mask`` covers past and new ones (1 = attend).
    Positions count the attended tokens before each one, as transformers' generate does with padding."""
    feeds = {"input_ids": ids.astype(np.int64), **past}
    if "attention_mask" in names:
        feeds["attention_mask"] = mask.astype(np.int64)
    if "position_ids" in names:
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        feeds["position_ids"] = positions[:, -ids.shape[1]:].astype(np.int64)
    return feeds


def presents_as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name.replace("present.", "past_key_values.", 1): value
            for name, value in outputs.items() if name.startswith("present.")}


def greedy(session: ort.InferenceSession, prompt: np.ndarray, new_tokens: int,
           adapters: Sequence[ort.LoraAdapter] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy decoding of ``new_tokens`` with the cache; the sequences and each step's last logits."""
    names = {v.name for v in session.get_inputs()}
    outs = [o.name for o in session.get_outputs()]
    options = ort.RunOptions()
    for adapter in adapters:
        options.add_active_adapter(adapter)
    past = empty_past(session, prompt.shape[0])
    sequences, new, steps = prompt.astype(np.int64), prompt.astype(np.int64), []
    for _ in range(new_tokens):
        mask = np.ones(sequences.shape, np.int64)
        result = dict(zip(outs, session.run(None, step_feeds(names, new, mask, past), options)))
        last = result["logits"][:, -1]
        steps.append(last)
        new = last.argmax(-1)[:, None].astype(np.int64)
        sequences = np.concatenate([sequences, new], axis=1)
        past = presents_as_past(result)
    return sequences, steps
