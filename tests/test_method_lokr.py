"""LoKr: PEFT's factorization and shape rules, the update against a hand-computed Kronecker product,
merge, the inits, options; PEFT parity both ways, ONNX export (integration).

Independent references: PEFT's documented factorizations, the unadapted model, the model with the
hand-computed ``W + dW`` in its weights, and PEFT 0.21 itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adaptc.passes.lokr import factorization
from test_method_loha import (
    CONV_TARGETS,
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

import adaptc
from adaptc.methods import make_config


@pytest.mark.parametrize("dimension, factor, expected", [
    (256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)), (48, -1, (6, 8)), (12, 5, (3, 4)),
])
def test_factorization_is_peft_s(dimension, factor, expected):
    assert factorization(dimension, factor) == expected  # the examples of PEFT's docstring, and two more


def test_lokr_shapes_follow_decompose_both_and_the_rank():
    model, inputs = conv_net()
    am = adaptc.inject(model, "lokr", example_inputs=inputs, target_modules=["fc", "c2"], r=1, decompose_both=True,
                       use_effective_conv2d=True)
    fc, c2 = am.adapters["default"]["fc"], am.adapters["default"]["c2"]
    # fc: out 5 = 1 x 5, in 12 = 3 x 4; r=1 < max(1, 3) / 2 -> W1 decomposed; r < max(5, 4) / 2 -> W2 too
    assert {n: tuple(p.shape) for n, p in fc.named_parameters()} == {
        "lokr_w1_a": (1, 1), "lokr_w1_b": (1, 3), "lokr_w2_a": (5, 1), "lokr_w2_b": (1, 4)}
    # c2: out 8 = 2 x 4, in 6 = 2 x 3, 3x3 kernel: W1 whole (r >= 2 / 2), W2 in CP form
    assert {n: tuple(p.shape) for n, p in c2.named_parameters()} == {
        "lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 3)}


def _factor(layer, which):
    whole = getattr(layer, f"lokr_{which}", None)
    if whole is not None:
        return whole
    a, b = getattr(layer, f"lokr_{which}_a"), getattr(layer, f"lokr_{which}_b")
    if which == "w2" and hasattr(layer, "lokr_t2"):
        return torch.einsum("ijkl,ip,jr->prkl", layer.lokr_t2, a, b)
    return a @ b


def _hand_delta(layer, weight_shape):
    """Block (i, j) of dW is W1[i, j] * W2: the Kronecker product, written out block by block."""
    w1, w2 = _factor(layer, "w1"), _factor(layer, "w2")
    rows = [torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])]
    return (torch.cat(rows, dim=0) * layer.alpha / layer.r).reshape(weight_shape)


@pytest.mark.parametrize("options", [dict(r=1, decompose_both=True), dict(r=4, use_effective_conv2d=True),
                                     dict(r=1, decompose_factor=2), dict(r=1, decompose_both=True, use_effective_conv2d=True)])
def test_lokr_update_is_the_hand_computed_kronecker_product_and_merges(options):
    model, inputs = conv_net()
    before = output(model, inputs).detach()
    targets = ["c2", "pw", "g", "fc"]  # (the Conv1d's 3-D W2 follows torch.kron's padding: PEFT parity covers it)
    if options.get("use_effective_conv2d") and options["r"] == 1:
        targets.append("c1")  # a 4-D CP W2 on a Conv1d (r=1 < 3/2): the block product below holds
    am = adaptc.inject(model, "lokr", example_inputs=inputs, target_modules=targets, alpha=3, **options).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(am, inputs), before, atol=0, rtol=0)  # W1 starts at 0
    randomize(am)
    layers = am.adapters["default"]
    with torch.no_grad():
        adapted = output(am, inputs)
        deltas = {k: _hand_delta(v, model.get_submodule(k).weight.shape) for k, v in layers.items()}
        reference = output(with_weights_added(model, deltas), inputs)
    assert (adapted - before).abs().max() > 1e-4
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=0)
    merged = am.merge()
    with torch.no_grad():
        torch.testing.assert_close(output(merged, inputs), adapted, atol=1e-5, rtol=0)


def test_lokr_inits_are_peft_s():
    model, inputs = conv_net()
    am = adaptc.inject(model, "lokr", example_inputs=inputs, target_modules=["fc"], r=1, decompose_both=True,
                       init_weights="lycoris")
    fc = am.adapters["default"]["fc"]
    assert torch.count_nonzero(fc.lokr_w2_b) == 0 and torch.count_nonzero(fc.lokr_w1_a) > 0
    am.add_adapter("random", "lokr", target_modules=["fc"], r=1, init_weights=False)
    with torch.no_grad():
        assert (output(am, inputs) - output(model, inputs)).abs().max() > 0


@pytest.mark.parametrize("options, message", [
    (dict(decompose_factor=0), "decompose_factor must be -1"),
    (dict(init_weights="gaussian"), "init_weights must be True, False or 'lycoris'"),
    (dict(decompose_both="yes"), "decompose_both must be True or False"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(init=True), "'init' (a LoRA option)"),
])
def test_lokr_options_are_checked_before_the_model_is_touched(options, message):
    with pytest.raises(adaptc.ConfigError) as info:
        make_config("lokr", options)  # what inject does first, before it captures the model
    assert message in str(info.value)


def test_lokr_save_and_load_round_trip_keeps_its_options(tmp_path):
    model, inputs = conv_net()
    pristine = copy.deepcopy(model)
    am = adaptc.inject(model, "lokr", example_inputs=inputs, target_modules=CONV_TARGETS, r=1, decompose_both=True,
                       decompose_factor=2, rank_dropout_scale=True)
    randomize(am)
    am.save_adapter(tmp_path)
    again = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    config = again.adapter_config
    assert (config.decompose_both, config.decompose_factor, config.rank_dropout_scale) == (True, 2, True)
    with torch.no_grad():
        torch.testing.assert_close(output(again, inputs), output(am, inputs), atol=0, rtol=0)


# --- integration: PEFT, ONNX ------------------------------------------------------------------------------

PEFT_CASES = {
    "llama-linear-decompose-both": (llama, dict(r=2, alpha=6, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                                decompose_both=True, rank_pattern={"up_proj": 8})),
    "bert-linear-factor": (bert, dict(r=2, alpha=4, target_modules=r".*(query|value|dense)", decompose_factor=4)),
    # (PEFT 0.21's torch.kron fails with use_effective_conv2d on a Conv1d, and on a rank-1 W1 with
    # decompose_both: adaptc's hand-computation test covers those)
    "conv-effective": (conv_net, dict(r=1, alpha=3, target_modules=["c2", "pw", "g", "fc"], use_effective_conv2d=True)),
    "conv-decompose-both": (conv_net, dict(r=1, alpha=3, target_modules=CONV_TARGETS, decompose_both=True)),
    "conv-whole": (conv_net, dict(r=4, alpha=2, target_modules=CONV_TARGETS)),
}
# Llama covers nn.Linear in the CI tier; BERT's run repeats it under a regex selector (slow tier).
CASE_IDS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("bert") else n for n in PEFT_CASES]


@pytest.mark.integration
@pytest.mark.parametrize("name", CASE_IDS)
def test_peft_lokr_loads_into_adaptc(name, tmp_path):
    peft = pytest.importorskip("peft")
    build, options = PEFT_CASES[name]
    got, expected = peft_to_adaptc(build, peft.LoKrConfig(**options, init_weights=False), tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize("name", CASE_IDS)
def test_adaptc_lokr_loads_into_peft(name, tmp_path):
    build, options = PEFT_CASES[name]
    got, expected = adaptc_to_peft(build, "lokr", options, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_lokr_exports_to_onnx_with_parity(tmp_path):
    model, inputs = conv_net()  # Conv1d, Conv2d (CP form, 1x1, grouped) and Linear in one export
    am = adaptc.inject(model, "lokr", example_inputs=inputs, target_modules=CONV_TARGETS, r=1, decompose_both=True,
                       use_effective_conv2d=True).eval()
    randomize(am, std=0.3)
    assert onnx_parity(am, tmp_path / "m.onnx", (torch.randn(3, 4, 20),)) <= 1e-4
