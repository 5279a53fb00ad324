"""VeRA: shared frozen projections (PEFT's generator, sized to the largest layer, one module for all
layers), the update against a hand computation, merge, save_projection both ways, options, targets;
PEFT parity both ways on GPT-2 (Conv1D), Llama and BERT, ONNX export (integration).

Independent references: the unadapted model, the model with the hand-computed ``W + dW`` in its
weights, PEFT's projections drawn by PEFT itself, and PEFT 0.21's outputs.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
import torch
from model_zoo import tiny_gpt2
from test_method_loha import (
    adaptc_to_peft,
    bert,
    conv_net,
    llama,
    onnx_parity,
    output,
    peft_to_adaptc,
    randomize,
    with_weights_added,
)
from torch import nn

import adaptc
from adaptc.methods import make_config


def gpt2():
    torch.manual_seed(0)
    model = tiny_gpt2(n_positions=32, n_head=2, bos_token_id=0, eos_token_id=0)
    return model.eval(), {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}


def test_vera_projections_are_shared_frozen_and_sized_to_the_largest_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3))
    am = adaptc.inject(model, "vera", example_inputs=(torch.randn(2, 6),), target_modules=["0", "2"], r=5)
    first, second = am.adapters["default"]["0"], am.adapters["default"]["2"]
    assert first.projections is second.projections  # one module: the same storage for every layer
    assert tuple(first.projections.vera_A.shape) == (5, 10) and tuple(first.projections.vera_B.shape) == (10, 5)
    assert {n for n, p in am.named_parameters() if p.requires_grad} == {
        "adapters.default.0.vera_lambda_b", "adapters.default.0.vera_lambda_d",
        "adapters.default.2.vera_lambda_b", "adapters.default.2.vera_lambda_d"}
    assert torch.count_nonzero(first.vera_lambda_b) == 0 and torch.all(first.vera_lambda_d == 0.1)  # PEFT's init


def test_vera_update_is_the_hand_computed_scaled_projection_and_merges():
    model, inputs = llama()
    before = output(model, inputs).detach()
    targets = ["q_proj", "k_proj", "down_proj", "up_proj"]
    am = adaptc.inject(model, "vera", example_inputs=inputs, target_modules=targets, r=8).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(am, inputs), before, atol=0, rtol=0)  # lambda_b starts at 0
    layers = am.adapters["default"]
    shared = next(iter(layers.values())).projections
    sizes = [(s.in_features, s.out_features) for s in am.sites]
    assert tuple(shared.vera_A.shape) == (8, max(i for i, _ in sizes))
    assert tuple(shared.vera_B.shape) == (max(o for _, o in sizes), 8)
    randomize(am)
    with torch.no_grad():
        adapted = output(am, inputs)
        deltas = {}
        for site in am.sites:
            layer = layers[site.name.replace(".", "__")]
            a = shared.vera_A[:, : site.in_features]
            b = shared.vera_B[: site.out_features]
            deltas[site.name] = torch.diag(layer.vera_lambda_b) @ b @ torch.diag(layer.vera_lambda_d) @ a
        reference = output(with_weights_added(model, deltas), inputs)
    assert (adapted - before).abs().max() > 1e-2
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=0)
    merged = am.merge()
    with torch.no_grad():
        torch.testing.assert_close(output(merged, inputs), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_checkpoint_holds_the_projections_as_peft_does(save_projection, tmp_path):
    model, inputs = gpt2()
    pristine = copy.deepcopy(model)
    am = adaptc.inject(model, "vera", example_inputs=inputs, target_modules=["c_attn", "c_fc"], r=4,
                       save_projection=save_projection, projection_prng_key=3)
    randomize(am)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        am.save_adapter(tmp_path)  # GPT-2's Conv1D is a module PEFT's VeRA takes: no warning
    keys = set(safetensors.torch.load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    assert "base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["projection_prng_key"], config["fan_in_fan_out"]) == ("VERA", 3, True)
    again = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)  # without them: drawn from the key
    with torch.no_grad():
        torch.testing.assert_close(output(again, inputs), output(am, inputs), atol=0, rtol=0)


def test_vera_refuses_a_convolution_and_the_options_of_other_methods():
    model, inputs = conv_net()
    with pytest.raises(adaptc.TargetError, match=r"VeRA adapts linear ops .* also selected c2 \(conv\)"):
        adaptc.inject(model, "vera", example_inputs=inputs, target_modules=["c2", "fc"])
    for options, message in [
        (dict(alpha=3), "unknown VeRA option 'alpha'"),
        (dict(r=-1), "r must be a positive integer"),
        (dict(projection_prng_key=-1), "projection_prng_key must be an integer"),
        (dict(vera_dropout=1), "vera_dropout must be a probability"),
        (dict(save_projection="no"), "save_projection must be True or False"),
        (dict(d_initial=float("inf")), "d_initial must be a finite number"),
    ]:
        with pytest.raises(adaptc.ConfigError, match=message):
            make_config("vera", options)


# --- integration: PEFT, ONNX ------------------------------------------------------------------------------

PEFT_CASES = {
    "gpt2-conv1d": (gpt2, dict(r=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "llama-linear": (llama, dict(r=6, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                 projection_prng_key=11)),
    "bert-regex-no-projection": (bert, dict(r=4, target_modules=r".*(query|value|dense)", save_projection=False)),
}


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notes on fan_in_fan_out and save_projection
@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_peft_vera_loads_into_adaptc(name, tmp_path):
    peft = pytest.importorskip("peft")
    build, options = PEFT_CASES[name]
    got, expected = peft_to_adaptc(build, peft.VeraConfig(**options, init_weights=False), tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_adaptc_vera_loads_into_peft(name, tmp_path):
    build, options = PEFT_CASES[name]
    got, expected = adaptc_to_peft(build, "vera", options, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vera_projections_are_peft_s_for_the_same_key():
    peft = pytest.importorskip("peft")
    model, inputs = llama()
    pristine = copy.deepcopy(model)
    pm = peft.get_peft_model(model, peft.VeraConfig(r=5, target_modules=["q_proj", "up_proj"], projection_prng_key=9))
    am = adaptc.inject(pristine, "vera", example_inputs=inputs, r=5, target_modules=["q_proj", "up_proj"],
                       projection_prng_key=9)
    shared = next(iter(am.adapters["default"].values())).projections
    torch.testing.assert_close(shared.vera_A, pm.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(shared.vera_B, pm.base_model.vera_B["default"], atol=0, rtol=0)


@pytest.mark.integration
def test_vera_exports_to_onnx_with_parity(tmp_path):
    model, inputs = gpt2()
    am = adaptc.inject(model, "vera", example_inputs={"input_ids": inputs["input_ids"]}, r=8).eval()
    randomize(am, std=0.5)
    assert onnx_parity(am, tmp_path / "m.onnx", {"input_ids": torch.randint(0, 64, (3, 5))}) <= 1e-4
