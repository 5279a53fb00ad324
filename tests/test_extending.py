"""The user-defined method of docs/extending.md, run exactly as written there, through every entry point.

Independent references: the unadapted model (a fresh method is the identity), a hand computation of
the scaled output, and the eager merged model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from model_zoo import tiny_gpt2
from transformers import GPT2LMHeadModel

import adaptc
from adaptc.methods import base as registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def method():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert len(code.splitlines()) < 80, "the documented method should stay under 80 lines"
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # the exact documented code
    yield namespace
    registry._METHODS.pop("channel_scale", None)


def _gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)


@pytest.mark.integration
def test_the_documented_method_injects_trains_saves_loads_merges_and_exports(method, tmp_path):
    assert "channel_scale" in adaptc.available_methods()
    torch.manual_seed(0)
    model = _gpt2()
    reference = _gpt2()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (4, 10))
    am = adaptc.inject(model, "channel_scale", example_inputs={"input_ids": ids})
    names = {s.name for s in am.sites}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= names and "lm_head" not in names
    with torch.no_grad():  # a fresh method is the identity
        torch.testing.assert_close(am(input_ids=ids).logits, reference(input_ids=ids).logits)

    batches = [{"input_ids": ids, "labels": ids}] * 4
    result = adaptc.train(am, batches, steps=12, lr=5e-2)
    assert result.last_loss < result.first_loss
    scale = am.adapters["default"]["transformer__h__0__mlp__c_fc"].scale
    assert not torch.allclose(scale, torch.ones_like(scale))

    am.eval()
    with torch.no_grad():  # hand computation at one site: (x W) * s + b
        x = torch.randn(3, 32)
        layer = am.adapters["default"]["transformer__h__0__mlp__c_fc"]
        conv = model.transformer.h[0].mlp.c_fc
        torch.testing.assert_close(layer(x, conv(x), conv.weight, conv.bias), (x @ conv.weight) * layer.scale + conv.bias)
        adapted = am(input_ids=ids).logits

    am.save_adapter(tmp_path / "adapter")
    fresh = _gpt2()
    fresh.load_state_dict(reference.state_dict())
    loaded = adaptc.load_adapter(fresh, tmp_path / "adapter", example_inputs={"input_ids": ids})
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapted)

    report = adaptc.export_onnx(loaded, tmp_path / "model.onnx")
    assert max(report.parity.values()) < 1e-4

    merged = loaded.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_the_documented_method_refuses_unmerged_export_and_a_second_registration(method, tmp_path):
    am = adaptc.inject(_gpt2(), "channel_scale", example_inputs={"input_ids": torch.randint(0, 64, (2, 6))},
                       targets=["c_attn"])
    assert [s.name for s in am.sites] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(adaptc.ExportError, match="merge=True"):
        adaptc.export_onnx(am, tmp_path / "model.onnx", merge=False)
    with pytest.raises(adaptc.ConfigError, match="already registered"):
        adaptc.register_method(method["ChannelScaleMethod"])
