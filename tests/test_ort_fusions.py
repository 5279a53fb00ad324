"""What ORT's optimized graph of a merged export is made of, beyond the tuned architectures (GPT-2, Llama, BERT).

Op counts do not depend on the machine's load, unlike timings: each case states the fused ops its merged
export must contain, and the ONNX Runtime session must still compute what the model computes in PyTorch
at a batch size and length the export never saw.

- OPT (separate q/k/v projections with biases, a ReLU MLP on flattened tokens): packed ``Attention`` and
  ``FusedGemm`` (MLP up-projection + ReLU) per layer, no attention left as a plain ``Softmax``.
- Grouped-query decoders (fewer key/value heads than query heads; Mistral with its sliding window, Qwen3
  with QK-norm, Phi-3 with fused qkv and gate/up projections): ``RotaryEmbedding`` for q and k and
  ``MultiHeadAttention`` per layer, as Llama with full heads gets, and no ``GroupQueryAttention``
  (targets/no_gqa.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from adaptc.targets.ort import op_counts
from model_zoo import CAUSAL_LMS, VOCAB, tiny_opt

import adaptc

pytestmark = pytest.mark.integration  # ONNX export and ONNX Runtime sessions

LAYERS = 2  # every model here
CASES = {
    "opt": (lambda: tiny_opt(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64),
            {"Attention": LAYERS, "FusedGemm": LAYERS}),
    "mistral": (CAUSAL_LMS["mistral-short-window"], {"RotaryEmbedding": 2 * LAYERS, "MultiHeadAttention": LAYERS}),
    "qwen3": (CAUSAL_LMS["qwen3"], {"RotaryEmbedding": 2 * LAYERS, "MultiHeadAttention": LAYERS}),
    "phi3": (CAUSAL_LMS["phi3"], {"RotaryEmbedding": 2 * LAYERS, "MultiHeadAttention": LAYERS}),
}
SLOW = {"qwen3", "phi3"}  # the CI tier keeps OPT and one grouped-query model


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_merged_export_fuses_and_matches_pytorch(name, tmp_path):
    build, expected = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8)), "use_cache": False}
    am = adaptc.inject(model, "lora", example_inputs=inputs, targets="all-linear", r=4)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # B nonzero: the merged weights differ from the base ones
    path = tmp_path / f"{name}.onnx"
    report = adaptc.export_onnx(am, path, latency_runs=1)

    fused = {op: report.fused_ops.get(op) for op in expected}
    assert fused == expected, report.fused_ops
    assert "GroupQueryAttention" not in report.fused_ops
    assert "Softmax" not in op_counts(path), "an attention was left unfused"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (3, 13)):
        ids = torch.randint(0, VOCAB, (batch, length))
        (got,) = session.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            want = am(input_ids=ids, use_cache=False).logits.numpy()
            base = model(input_ids=ids, use_cache=False).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert np.abs(want - base).max() > 1e-3  # the adapter is in the exported weights
