"""Bottleneck adapters (Houlsby / Pfeiffer) found at the residual additions of text, vision and audio
transformers, checked against a hand reference (forward hooks on the base model adding the adapter's
output to the projection's), the zero-initialised identity, options, the MergeError, training and
adaptc's own checkpoints, the CLI, and ONNX export with the adapter kept in the graph."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_zoo import (
    EmbedConvNet,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_timm_vit,
    tiny_torchaudio_wav2vec2,
    tiny_vit,
    tiny_wav2vec2,
)
from torch import nn

import adaptc
from adaptc.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


def _ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def gpt2(**config):
    return tiny_gpt2(seed=0, n_positions=32, n_head=2, bos_token_id=0, eos_token_id=0, **config).eval(), {
        "input_ids": _ids(),
        "use_cache": False,
    }


ARCHS = {
    "gpt2": (gpt2, "transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "llama": (
        lambda: (
            tiny_llama(
                seed=0, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0
            ).eval(),
            {"input_ids": _ids(), "use_cache": False},
        ),
        "model.layers.{}.self_attn.o_proj",
        "model.layers.{}.mlp.down_proj",
    ),
    "bert": (
        lambda: (tiny_bert(seed=0).eval(), {"input_ids": _ids()}),
        "bert.encoder.layer.{}.attention.output.dense",
        "bert.encoder.layer.{}.output.dense",
    ),
    "timm-vit": (
        lambda: (tiny_timm_vit(seed=0).eval(), (torch.randn(2, 3, 32, 32),)),
        "blocks.{}.attn.proj",
        "blocks.{}.mlp.fc2",
    ),
    "vit": (
        lambda: (tiny_vit(seed=0).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}),
        "vit.layers.{}.attention.o_proj",
        "vit.layers.{}.mlp.fc2",
    ),
    "wav2vec2": (
        lambda: (tiny_wav2vec2(seed=0).eval(), {"input_values": torch.randn(2, 800)}),
        "wav2vec2.encoder.layers.{}.attention.out_proj",
        "wav2vec2.encoder.layers.{}.feed_forward.output_dense",
    ),
    "torchaudio-wav2vec2": (
        lambda: (tiny_torchaudio_wav2vec2().eval(), (torch.randn(2, 800),)),
        "encoder.transformer.layers.{}.attention.out_proj",
        "encoder.transformer.layers.{}.feed_forward.output_dense",
    ),
}
FAST = ("gpt2", "llama", "bert", "timm-vit")


def call(module, inputs):
    out = module(**inputs) if isinstance(inputs, dict) else module(*inputs)
    if isinstance(out, tuple) and not hasattr(out, "to_tuple"):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def randomize(am: adaptc.AdaptedModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def hooked_reference(model: nn.Module, am: adaptc.AdaptedModel, inputs, activation: str):
    """The base model with each adapter added by hand to its projection's output (eval: dropout is identity)."""
    act = ACTIVATIONS[activation]
    handles = []
    for site in am.sites:
        layer = am.adapters["default"][site.name.replace(".", "__")]
        down, up = layer.down, layer.up

        def hook(module, args, out, down=down, up=up):
            return out + F.linear(act(F.linear(out, down.weight, down.bias)), up.weight, up.bias)

        handles.append(model.get_submodule(site.name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return call(model, inputs)
    finally:
        for h in handles:
            h.remove()


def _check_arch(arch: str) -> None:
    build, attention, feedforward = ARCHS[arch]
    model, inputs = build()
    am = adaptc.inject(
        model, "bottleneck", example_inputs=inputs, placement="houlsby", reduction_factor=4
    ).eval()
    expected = [name.format(i) for i in range(2) for name in (attention, feedforward)]
    assert [s.name for s in am.sites] == expected
    assert [am.adapters["default"][s.name.replace(".", "__")].where for s in am.sites] == [
        "attention",
        "feedforward",
    ] * 2
    with torch.no_grad():
        base = call(model, inputs)
        assert torch.equal(call(am, inputs), base)  # a zero up projection: the base model exactly
    randomize(am, 0)
    with torch.no_grad():
        got = call(am, inputs)
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, hooked_reference(model, am, inputs, "swish"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", FAST)
def test_houlsby_at_every_block_matches_the_hand_reference(arch):
    _check_arch(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in FAST])
def test_houlsby_on_vision_and_audio_transformers(arch):
    _check_arch(arch)


def test_pfeiffer_options():
    model, inputs = gpt2()
    am = adaptc.inject(
        model, "bottleneck", example_inputs=inputs, bottleneck_size=3, non_linearity="tanh", layers=[1]
    )
    assert [s.name for s in am.sites] == [
        "transformer.h.1.mlp.c_proj"
    ]  # pfeiffer: after the feed-forward only
    layer = am.adapters["default"]["transformer__h__1__mlp__c_proj"]
    assert (layer.down.in_features, layer.down.out_features, type(layer.act)) == (32, 3, nn.Tanh)
    assert am.sites[0].params_added == 32 * 3 + 3 + 3 * 32 + 32
    randomize(am.eval(), 1)
    torch.testing.assert_close(
        call(am, inputs), hooked_reference(model, am, inputs, "tanh"), atol=1e-5, rtol=1e-5
    )


def test_options_checked_first_and_a_model_without_residuals():
    model, inputs = gpt2()
    for options, message in [
        ({"r": 4}, "unknown bottleneck option 'r'"),
        ({"placement": "parallel"}, "placement"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"non_linearity": "elu"}, "non_linearity"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
    ]:
        with pytest.raises(adaptc.ConfigError, match=message):
            adaptc.inject(model, "bottleneck", example_inputs=inputs, **options)
    with pytest.raises(adaptc.TargetError, match="no feedforward residual addition"):
        adaptc.inject(EmbedConvNet(), "bottleneck", example_inputs=(torch.randint(0, 20, (2, 9)),))
    assert all(p.requires_grad for p in model.parameters())


def test_merge_is_refused_and_training_saving_loading_work(tmp_path):
    model, inputs = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = adaptc.inject(model, "bottleneck", example_inputs=inputs, placement="houlsby")
    batch = {**inputs, "labels": inputs["input_ids"]}
    with torch.no_grad():
        start = am.eval()(**batch).loss.item()
    adaptc.train(am.train(), [batch] * 3, steps=3, lr=1e-2, progress=False)
    with torch.no_grad():
        assert am.eval()(**batch).loss.item() < start
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(adaptc.MergeError, match="bottleneck.*cannot be merged"):
        am.merge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    am.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    again = adaptc.load_adapter(model, tmp_path, example_inputs=inputs).eval()
    with torch.no_grad():
        assert torch.equal(call(again, inputs), call(am, inputs))
    assert again.adapter_config == am.adapter_config


def test_cli_inject_and_lora_flags(capsys):
    tiny = str(ROOT / "examples" / "tiny_gpt2.py")
    assert main(["inject", tiny, "--method", "bottleneck", "--opt", "placement=houlsby"]) == 0
    out = capsys.readouterr().out
    assert "placement=houlsby" in out and "attention" in out and "feedforward" in out
    assert main(["inject", tiny, "--method", "bottleneck", "--r", "4"]) != 0
    assert "unknown bottleneck option 'r'" in capsys.readouterr().err
    assert main(["inspect", tiny, "--method", "bottleneck"]) == 0
    assert "4 residual additions; houlsby adapts 4, pfeiffer 2" in capsys.readouterr().out


@pytest.mark.integration
def test_onnx_export_keeps_the_adapter(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, inputs = gpt2()
    am = adaptc.inject(model, "bottleneck", example_inputs=inputs, placement="houlsby").eval()
    randomize(am, 2)
    with pytest.raises(adaptc.ExportError, match="merge=True"):  # swappable ORT adapter files: LoRA's only
        adaptc.export_onnx(am, tmp_path / "unmerged.onnx", merge=False)
    report = adaptc.export_onnx(am, tmp_path / "model.onnx", latency_runs=1)
    assert report.parity_max_abs_diff <= 1e-4
    ids = torch.randint(0, 64, (3, 11))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        expected = call(am, {"input_ids": ids, "use_cache": False}).numpy()
        base = call(copy.deepcopy(model), {"input_ids": ids, "use_cache": False}).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - base).max() > 1e-3  # the adapter is in the exported graph
