"""targets/rope_angles.py: Llama's rotary embedding fuses into ORT's RotaryEmbedding, and the fused
model still computes what the model in PyTorch does at batch sizes and lengths the export never saw.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from model_zoo import VOCAB, tiny_llama

import adaptc

pytestmark = pytest.mark.integration  # ONNX export and ONNX Runtime sessions


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_rotary_fuses_and_matches_pytorch(tmp_path, kv_heads):
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, intermediate_size=96, num_key_value_heads=kv_heads).eval()
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "use_cache": False}
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=4)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "llama.onnx"
    report = adaptc.export_onnx(am, path)
    assert report.fused_ops.get("RotaryEmbedding") == 2 * 2, report.fused_ops  # q and k, per layer
    # grouped-query too: no GroupQueryAttention, whose positions are not transformers' (targets/no_gqa.py)
    assert report.fused_ops.get("MultiHeadAttention") == 2 and "GroupQueryAttention" not in report.fused_ops

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (3, 13)):
        ids = torch.randint(0, VOCAB, (batch, length))
        (got,) = session.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            expected = am(input_ids=ids, use_cache=False).logits.numpy()
        assert np.abs(got - expected).max() <= 1e-4
