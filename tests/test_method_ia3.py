"""IA3: PEFT's default targets, output vs input scaling against a hand-computed reference (hooks on the
base model), merge (weights and biases), training, the CLI, and, as integration tests, two-way PEFT
checkpoint parity and ONNX export parity."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from model_zoo import EmbedConvNet, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import adaptc
from adaptc.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gpt2():
    return tiny_gpt2(seed=0, n_positions=32, n_head=2, bos_token_id=0, eos_token_id=0).eval(), {
        "input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)),
        "use_cache": False,
    }


def randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def hooked_reference(model: nn.Module, am: adaptc.AdaptedModel, inputs: dict) -> torch.Tensor:
    """The base model with PEFT's IA3 arithmetic as module hooks: output * s, or the input * s."""
    handles = []
    for site in am.sites:
        layer = am.adapters["default"][site.name.replace(".", "__")]
        s = layer.ia3_l.detach().flatten()
        module = model.get_submodule(site.name)
        if layer.feedforward:
            handles.append(module.register_forward_pre_hook(lambda m, args, s=s: (args[0] * s,)))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, s=s: out * s))
    try:
        with torch.no_grad():
            return logits(model(**inputs))
    finally:
        for h in handles:
            h.remove()


def test_gpt2_defaults_match_peft_and_hand_reference():
    model, inputs = gpt2()
    am = adaptc.inject(model, "ia3", example_inputs=inputs).eval()
    names = {s.name: am.adapters["default"][s.name.replace(".", "__")].feedforward for s in am.sites}
    assert names == {
        "transformer.h.0.attn.c_attn": False,
        "transformer.h.1.attn.c_attn": False,
        "transformer.h.0.mlp.c_proj": True,
        "transformer.h.1.mlp.c_proj": True,
    }
    with torch.no_grad():
        base = logits(model(**inputs))
        assert torch.equal(logits(am(**inputs)), base)  # vectors start at 1: the base model exactly
    randomize(am, 0)
    with torch.no_grad():
        got = logits(am(**inputs))
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, hooked_reference(model, am, inputs), atol=1e-5, rtol=0)
    with am.disable_adapters(), torch.no_grad():
        assert torch.equal(logits(am(**inputs)), base)


def test_merge_folds_weights_and_biases():
    model, inputs = gpt2()
    with torch.no_grad():  # GPT-2 starts with zero biases: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    am = adaptc.inject(model, "ia3", example_inputs=inputs).eval()
    randomize(am, 1)
    with torch.no_grad():
        expected = logits(am(**inputs))
    bias_before = model.transformer.h[0].attn.c_attn.bias.detach().clone()
    merged = am.merge()
    assert merged is model
    assert not torch.equal(model.transformer.h[0].attn.c_attn.bias, bias_before)  # output scale: bias too
    with torch.no_grad():
        torch.testing.assert_close(logits(merged(**inputs)), expected, atol=1e-5, rtol=0)


def test_conv_sites_and_grouped_input_scale_merge():
    torch.manual_seed(0)
    model = EmbedConvNet().eval()
    ids = torch.randint(0, 20, (2, 9))
    am = adaptc.inject(
        model,
        "ia3",
        example_inputs=(ids,),
        targets=["conv", "gconv", "fc1", "fc2"],
        feedforward_modules=["gconv", "fc2"],
    ).eval()
    randomize(am, 2)
    shapes = {s.name: tuple(am.adapters["default"][s.name].ia3_l.shape) for s in am.sites}
    assert shapes == {"conv": (1, 8, 1, 1), "gconv": (1, 8, 1, 1), "fc1": (16, 1), "fc2": (1, 16)}
    with torch.no_grad():
        expected = am(ids)
        handles = []
        for name in shapes:
            s = am.adapters["default"][name].ia3_l.detach()
            module = model.get_submodule(name)
            if am.adapters["default"][name].feedforward:
                handles.append(
                    module.register_forward_pre_hook(
                        lambda m, a, s=s: (a[0] * s.reshape((1, -1, 1, 1) if a[0].dim() == 4 else (-1,)),)
                    )
                )
            else:
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, s=s: o * s.reshape((1, -1, 1, 1) if o.dim() == 4 else (-1,))
                    )
                )
        reference = model(ids)
        for h in handles:
            h.remove()
        torch.testing.assert_close(expected, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(am.merge()(ids), expected, atol=1e-5, rtol=0)


def test_options_are_checked_before_the_model_is_touched():
    model, inputs = gpt2()
    with pytest.raises(adaptc.ConfigError, match="unknown ia3 option 'r'"):
        adaptc.inject(model, "ia3", example_inputs=inputs, r=4)
    with pytest.raises(adaptc.ConfigError, match="subset|are not in targets"):
        adaptc.inject(model, "ia3", example_inputs=inputs, targets=["c_attn"], feedforward_modules=["c_fc"])
    with pytest.raises(adaptc.TargetError, match="no default targets.*targets="):
        adaptc.inject(EmbedConvNet(), "ia3", example_inputs=(torch.randint(0, 20, (2, 9)),))
    with pytest.raises(adaptc.TargetError, match="linear and convolution"):
        adaptc.inject(EmbedConvNet(), "ia3", example_inputs=(torch.randint(0, 20, (2, 9)),), targets=["emb"])
    assert not any(isinstance(m, adaptc.AdaptedModel) for m in model.modules())


def test_train_updates_only_the_vectors_and_saves_reload_exactly(tmp_path):
    model = tiny_gpt2(
        seed=0,
        n_positions=32,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    _, inputs = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    am = adaptc.inject(model, "ia3", example_inputs=inputs)
    batch = {**inputs, "labels": inputs["input_ids"]}
    with torch.no_grad():
        start = am.eval()(**batch).loss.item()
    adaptc.train(am.train(), [batch] * 3, steps=3, lr=5e-2, progress=False)
    with torch.no_grad():
        assert am.eval()(**batch).loss.item() < start
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(p, torch.ones_like(p)) for p in am.adapters.parameters())
    am.eval()
    am.save_adapter(tmp_path)
    again = adaptc.load_adapter(model, tmp_path, example_inputs=inputs).eval()
    with torch.no_grad():
        assert torch.equal(logits(again(**inputs)), logits(am(**inputs)))
    assert again.adapter_config.targets == am.adapter_config.targets


def test_cli_inject_and_lora_flags(capsys, tmp_path):
    tiny = str(ROOT / "examples" / "tiny_gpt2.py")
    assert main(["inject", tiny, "--method", "ia3", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ia3:" in out and "input" in out and "output" in out
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (
        main(["inject", tiny, "--method", "ia3", "--r", "4"]) != 0
    )  # a LoRA-only flag: refused, not ignored
    assert "unknown ia3 option 'r'" in capsys.readouterr().err


# --- integration: PEFT itself, ONNX Runtime ---------------------------------------------------------


def _peft_cases():
    def llama():
        return tiny_llama(
            seed=0, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0
        ).eval(), {
            "input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)),
            "use_cache": False,
        }

    def bert():
        from transformers import BertModel

        return tiny_bert(BertModel, seed=0).eval(), {
            "input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        }

    def conv():
        torch.manual_seed(0)
        return EmbedConvNet().eval(), (torch.randint(0, 20, (2, 9)),)

    conv_options = {
        "target_modules": ["conv", "gconv", "fc1", "fc2"],
        "feedforward_modules": ["gconv", "fc2"],
    }
    slow = pytest.mark.slow  # nn.Linear is covered by BERT in CI
    return [
        pytest.param("gpt2", gpt2, {}, id="gpt2"),
        pytest.param("llama", llama, {}, id="llama", marks=slow),
        pytest.param("bert", bert, {}, id="bert"),
        pytest.param("conv", conv, conv_options, id="conv"),
    ]


def _call(module, inputs):
    return logits(module(**inputs) if isinstance(inputs, dict) else module(*inputs))


@pytest.mark.integration
@pytest.mark.parametrize("name,build,options", _peft_cases())
def test_peft_checkpoints_both_ways(tmp_path, name, build, options):
    peft = pytest.importorskip("peft")
    base, inputs = build()
    # adaptc -> PEFT
    am = adaptc.inject(
        copy.deepcopy(base),
        "ia3",
        example_inputs=inputs,
        **{k.replace("target_modules", "targets"): v for k, v in options.items()},
    ).eval()
    randomize(am, 3)
    am.save_adapter(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(_call(theirs, inputs), _call(am, inputs), atol=1e-5, rtol=0)
    # PEFT -> adaptc
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**options)).eval()
    randomize(pm, 4)
    pm.save_pretrained(tmp_path / "peft")
    loaded = adaptc.load_adapter(copy.deepcopy(base), tmp_path / "peft", example_inputs=inputs).eval()
    with torch.no_grad():
        reference = _call(pm, inputs)
        assert (reference - _call(base, inputs)).abs().max() > 1e-3
        torch.testing.assert_close(_call(loaded, inputs), reference, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_onnx_export_parity_at_another_shape(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, inputs = gpt2()
    am = adaptc.inject(model, "ia3", example_inputs=inputs).eval()
    randomize(am, 5)
    report = adaptc.export_onnx(am, tmp_path / "model.onnx", latency_runs=1)
    assert report.parity_max_abs_diff <= 1e-4
    ids = torch.randint(0, 64, (3, 11))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        expected = logits(am(input_ids=ids, use_cache=False)).numpy()
    assert np.abs(got - expected).max() <= 1e-4
