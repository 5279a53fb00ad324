"""The worked examples, run end to end with tiny settings: they train, export ONNX and ONNX Runtime agrees.

These check that the examples run and that their ONNX models match PyTorch; the before/after figures
of the full runs are in docs/examples.md (a few steps cannot be required to raise an accuracy).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # the worked examples, end to end (they export and run ONNX Runtime)

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_audio_example_lora_and_prefix_export_and_agree_with_ort(tmp_path):
    audio = load("audio_sounds")
    sizes = {"train": 32, "eval": 32}
    for method in ("lora", "prefix"):
        result = audio.run(method, steps=1, pretrain_steps=2, sizes=sizes, out=tmp_path)
        assert result["agree"] == 1.0, method
        assert result["max_diff"] <= 1e-4 and result["parity"] <= 1e-4, method
    assert {p.name for p in tmp_path.glob("*.onnx")} == {"audio_lora.onnx", "audio_prefix.onnx"}


def test_audio_sounds_are_reproducible_and_balanced():
    audio = load("audio_sounds")
    x1, y1 = audio.sounds(12, seed=5)
    x2, y2 = audio.sounds(12, seed=5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (12, audio.N)
    assert torch.bincount(y1, minlength=6).tolist() == [2] * 6
    clean, _ = audio.sounds(12, seed=5, shift=1.0)
    assert not torch.equal(clean, x1)  # the new domain differs from the base's


@pytest.mark.slow
def test_instruct_example_generates_through_ort_like_pytorch(tmp_path):
    """adaptc.generate drives the PyTorch model and the ONNX Runtime session (exported from one prompt) alike."""
    from adaptc.targets import ort as rt

    import adaptc

    llama = load("instruct_llama")
    am = adaptc.inject(llama.build_model(), "lora", example_inputs=llama.example_inputs(), r=4, alpha=8)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    am.eval()
    llama.PAIRS = llama.PAIRS[:2]
    llama.MAX_NEW = 6
    example = {"input_ids": llama.prompt_ids(llama.PAIRS[0][0]), "use_cache": False}
    report = adaptc.export_onnx(am, tmp_path / "llama.onnx", example_inputs=example)
    ort_model = llama.OrtCausalLM(rt.open_session(Path(report.path)))
    assert llama._answers(ort_model) == llama._answers(am)
    ids = llama.prompt_ids(llama.PAIRS[1][0]).repeat(3, 1)  # a batch of 3 from a one-row export
    assert torch.equal(adaptc.generate(ort_model, ids, 4), adaptc.generate(am, ids, 4))


@pytest.mark.slow
def test_vision_prompt_tuning_with_head_lora_exports_and_agrees_with_ort(tmp_path, monkeypatch):
    """The ViT recipe of `vision_digits.py --method prompt` (on an untrained ViT: the cached base takes minutes)."""
    import numpy as np
    from adaptc.targets import ort as rt

    import adaptc

    monkeypatch.setenv("ADAPTC_VISION_MODEL", "vit")
    vision = load("vision_digits")
    torch.manual_seed(0)
    am = vision._adapt(vision._create("vit").eval(), "prompt")
    assert am.active_adapters == ["default", "head"]
    batches = vision.train_batches()[:2]
    result = adaptc.train(am, batches, steps=2, lr=1e-2, loss=vision.loss, progress=False)
    assert result.last_loss == result.last_loss  # trained without NaN
    report = adaptc.export_onnx(am, tmp_path / "vit.onnx")
    session = rt.open_session(Path(report.path))
    x = batches[0]["x"][:5]  # another batch size than the export's
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    am.eval()
    with torch.no_grad():
        expected = am(x).numpy()
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.slow
def test_instruct_ort_example_answers_with_onnx_runtime_like_am_generate(tmp_path):
    """examples/instruct_ort.py: fine-tune, export the adapter unmerged, answer with ORT with and without it."""
    result = load("instruct_ort").run(steps=3, out=tmp_path / "folder", engine="session")
    assert result["same_as_pytorch"]  # ORT + adapter gives am.generate's answers token for token
    assert {p.name for p in (tmp_path / "folder").iterdir()} == {"model.onnx", "genai_config.json",
                                                                  "instruct.onnx_adapter"}
