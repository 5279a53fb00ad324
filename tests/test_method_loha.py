"""LoHa: the update against a hand computation, merge, options, targets, dropouts, training, the CLI;
PEFT parity both ways, ONNX export (integration).

Independent references: the unadapted model (a fresh adapter is the identity), the model with the
hand-computed ``W + dW`` written into its weights, and PEFT 0.21 itself. The helpers here are shared
with tests/test_method_lokr.py and tests/test_method_vera.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from model_zoo import tiny_bert, tiny_llama
from torch import nn

import adaptc
from adaptc.cli import main

TINY = "examples/tiny_gpt2.py"


class ConvNet(nn.Module):
    """A Conv1d (k=3), a 3x3 Conv2d, a 1x1 Conv2d, a grouped 3x3 Conv2d and a Linear, by module call."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 12, 1)
        self.g = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(x)).unflatten(2, (4, -1))  # length 16 -> a 4x4 map, 20 -> 4x5
        h = self.g(torch.relu(self.pw(torch.relu(self.c2(h)))))
        return self.fc(h.mean((2, 3)))


CONV_TARGETS = ["c1", "c2", "pw", "g", "fc"]


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval(), (torch.randn(2, 4, 16),)


def llama():
    torch.manual_seed(0)
    model = tiny_llama(max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model.eval(), {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}


def bert():
    from transformers import BertModel

    torch.manual_seed(0)
    model = tiny_bert(BertModel, num_attention_heads=2, max_position_embeddings=32)
    return model.eval(), {"input_ids": torch.randint(0, 64, (2, 8))}


def output(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@torch.no_grad()
def randomize(am, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in am.adapters.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def with_weights_added(model, deltas):
    """A copy of ``model`` with ``deltas`` (by site name, stored weight layout) added to its weights."""
    ref = copy.deepcopy(model)
    for name, delta in deltas.items():
        ref.get_submodule(name).weight.add_(delta)
    return ref


def peft_to_adaptc(build, peft_config, tmp_path):
    """A PEFT adapter (random: init_weights=False) saved by PEFT and loaded by adaptc: (adaptc's, PEFT's) outputs."""
    peft = pytest.importorskip("peft")
    base, inputs = build()
    pristine = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft_config).eval()
    with torch.no_grad():
        expected = output(peft_model, inputs)
    assert not torch.allclose(expected, output(pristine, inputs))  # the adapter does something
    peft_model.save_pretrained(tmp_path)
    am = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs).eval()
    with torch.no_grad():
        return output(am, inputs), expected


def adaptc_to_peft(build, method, options, tmp_path):
    """An adaptc adapter (randomised) saved by adaptc and loaded by PEFT: (PEFT's, adaptc's) outputs."""
    peft = pytest.importorskip("peft")
    base, inputs = build()
    pristine = copy.deepcopy(base)
    am = adaptc.inject(base, method, example_inputs=inputs, **options).eval()
    randomize(am, std=0.2)
    with torch.no_grad():
        expected = output(am, inputs)
    am.save_adapter(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert len(peft.get_peft_model_state_dict(peft_model)) >= sum(1 for _ in am.adapters.parameters())
    with torch.no_grad():
        return output(peft_model, inputs), expected


def onnx_parity(am, path, other_inputs):
    """export_onnx (its own gate), then our own ORT session at another batch size and length: max |diff|."""
    import numpy as np
    import onnxruntime as ort

    report = adaptc.export_onnx(am, path, latency_runs=1)
    assert report.parity_max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = list(other_inputs.values()) if isinstance(other_inputs, dict) else list(other_inputs)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: v.numpy() for n, v in zip(names, values)})[0]
    with torch.no_grad():
        want = output(am, other_inputs).numpy()
    return float(np.abs(got - want).max())


# --- unit ----------------------------------------------------------------------------------------------

def _hand_delta(layer, cp):
    if cp:
        def rebuild(t, wa, wb):  # sum_ij t[i, j, k, l] wa[i, p] wb[j, r]
            return torch.einsum("ijkl,ip,jr->prkl", t, wa, wb)
        delta = rebuild(layer.hada_t1, layer.hada_w1_a, layer.hada_w1_b) * rebuild(
            layer.hada_t2, layer.hada_w2_a, layer.hada_w2_b)
    else:
        delta = (layer.hada_w1_a @ layer.hada_w1_b) * (layer.hada_w2_a @ layer.hada_w2_b)
    return delta * layer.alpha / layer.r


@pytest.mark.parametrize("effective", [False, True])
def test_loha_update_is_the_hand_computed_hadamard_product_and_merges(effective):
    model, inputs = conv_net()
    before = output(model, inputs).detach()
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=CONV_TARGETS, r=2, alpha=3,
                       use_effective_conv2d=effective).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(am, inputs), before, atol=0, rtol=0)  # hada_w2_b starts at 0
    layers = am.adapters["default"]
    # PEFT's rule: the CP form only on convolutions with a kernel above 1
    assert {k for k, v in layers.items() if hasattr(v, "hada_t1")} == ({"c1", "c2", "g"} if effective else set())
    if effective:
        assert tuple(layers["c1"].hada_t1.shape) == (2, 2, 3, 1)
    randomize(am)
    with torch.no_grad():
        adapted = output(am, inputs)
        deltas = {k: _hand_delta(v, effective and hasattr(v, "hada_t1")).reshape(model.get_submodule(k).weight.shape)
                  for k, v in layers.items()}
        reference = output(with_weights_added(model, deltas), inputs)
    assert (adapted - before).abs().max() > 1e-2
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=0)
    merged = am.merge()
    with torch.no_grad():
        torch.testing.assert_close(output(merged, inputs), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(rank_dropout=1.5), "rank_dropout must be a probability"),
    (dict(module_dropout="x"), "module_dropout must be a probability"),
    (dict(dropout=0.1), "'dropout' (a LoRA option)"),
    (dict(layers_pattern="layers"), "layers_pattern is given without layers_to_transform"),
    (dict(target_modules="("), "not a valid regular expression"),
    (dict(use_effective_conv2d=1), "use_effective_conv2d must be True or False"),
    (dict(rank_pattern={"fc": 0}), "rank_pattern['fc'] must be a positive integer"),
])
def test_loha_options_are_checked_before_the_model_is_touched(options, message):
    model, inputs = conv_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(adaptc.ConfigError) as info:
        adaptc.inject(model, "loha", example_inputs=inputs, **options)
    assert message in str(info.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_loha_refuses_an_embedding_with_a_target_error():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, ids):
            return self.head(self.fc(self.emb(ids)))

    ids = torch.randint(0, 10, (2, 3))
    with pytest.raises(adaptc.TargetError, match=r"LoHa adapts linear ops .* also selected emb \(embedding"):
        adaptc.inject(Emb(), "loha", example_inputs=(ids,), target_modules=["emb", "fc"])
    am = adaptc.inject(Emb(), "loha", example_inputs=(ids,), target_modules="all")  # the category: embeddings (and the head) left out
    assert [s.name for s in am.sites] == ["fc"]


def test_loha_module_and_rank_dropout_apply_in_training_only():
    model, inputs = conv_net()
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=["fc"], r=2, module_dropout=0.999999)
    randomize(am)
    base = output(model, inputs).detach()
    am.train()
    with torch.no_grad():
        torch.testing.assert_close(output(am, inputs), base, atol=0, rtol=0)  # the whole update skipped
        am.eval()
        assert (output(am, inputs) - base).abs().max() > 1e-3

    model, inputs = conv_net()
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=["fc"], r=2, rank_dropout=0.5)
    randomize(am)
    with torch.no_grad():
        am.eval()
        full = output(am, inputs)
        am.train()
        torch.manual_seed(3)
        dropped = output(am, inputs)
    assert not torch.allclose(full, dropped)


def test_loha_trains_only_its_factors():
    model, inputs = conv_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=CONV_TARGETS, r=2)
    trainable = {id(p) for p in am.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in am.adapters.parameters()}
    target = torch.randn(2, 5)
    result = adaptc.train(am, [{"x": inputs[0]}] * 4, steps=8, lr=1e-2, loss=lambda out, batch: ((out - target) ** 2).mean())
    assert result.last_loss < result.first_loss
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_loha_save_and_load_in_adaptc_round_trip(tmp_path):
    model, inputs = conv_net()
    pristine = copy.deepcopy(model)
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=CONV_TARGETS, r=2, alpha=5,
                       use_effective_conv2d=True, rank_pattern={"fc": 3})
    randomize(am)
    am.save_adapter(tmp_path)
    again = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    assert again.adapter_config.rank_pattern == {"fc": 3} and again.adapter_config.use_effective_conv2d
    with torch.no_grad():
        torch.testing.assert_close(output(again, inputs), output(am, inputs), atol=0, rtol=0)


def test_loha_from_the_cli(capsys, tmp_path):
    with pytest.warns(UserWarning, match="PEFT cannot load this LOHA adapter at 2 site"):  # GPT-2's Conv1D
        assert main(["inject", TINY, "--method", "loha", "--opt", "r=2", "--targets", ".*c_attn", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "loha: " in out and "2 sites matched" in out
    assert (tmp_path / "adapter_config.json").is_file()
    assert main(["inject", TINY, "--method", "loha", "--rslora"]) != 0  # a LoRA-only flag: a clear error
    assert "'rslora' (a LoRA option)" in capsys.readouterr().err


# --- integration: PEFT, ONNX ------------------------------------------------------------------------------

PEFT_CASES = {
    "llama-linear-patterns": (llama, dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                          rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "bert-linear-regex": (bert, dict(r=2, alpha=4, target_modules=r".*(query|value|dense)")),
    "conv-effective": (conv_net, dict(r=2, alpha=3, target_modules=CONV_TARGETS, use_effective_conv2d=True)),
    "conv-flat": (conv_net, dict(r=3, alpha=3, target_modules=CONV_TARGETS)),
}
# Llama covers nn.Linear in the CI tier; BERT's run repeats it under a regex selector (slow tier).
CASE_IDS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("bert") else n for n in PEFT_CASES]


@pytest.mark.integration
@pytest.mark.parametrize("name", CASE_IDS)
def test_peft_loha_loads_into_adaptc(name, tmp_path):
    peft = pytest.importorskip("peft")
    build, options = PEFT_CASES[name]
    got, expected = peft_to_adaptc(build, peft.LoHaConfig(**options, init_weights=False), tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize("name", CASE_IDS)
def test_adaptc_loha_loads_into_peft(name, tmp_path):
    build, options = PEFT_CASES[name]
    got, expected = adaptc_to_peft(build, "loha", options, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_loha_exports_to_onnx_with_parity(tmp_path):
    model, inputs = conv_net()  # Conv1d, Conv2d (CP form, 1x1, grouped) and Linear in one export
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=CONV_TARGETS, r=2,
                       use_effective_conv2d=True).eval()
    randomize(am, std=0.3)
    assert onnx_parity(am, tmp_path / "m.onnx", (torch.randn(3, 4, 20),)) <= 1e-4


def test_loha_parameter_count_matches_the_shapes():
    model, inputs = conv_net()
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=["fc", "c2"], r=2)
    fc, c2 = (next(s for s in am.sites if s.name == n) for n in ("fc", "c2"))
    assert fc.params_added == 2 * (5 * 2 + 2 * 12)
    assert c2.params_added == 2 * (8 * 2 + 2 * 6 * 9)
    assert math.isclose(am.adapters["default"]["fc"].scaling, 8 / 2)


def test_a_loha_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    import json

    model, inputs = conv_net()
    pristine = copy.deepcopy(model)
    am = adaptc.inject(model, "loha", example_inputs=inputs, target_modules=["fc", "c2"], r=2)
    am.save_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["adaptc"]["config"]  # PEFT's fields only (the save id kept: an edit by hand), and r no longer fits
    config["r"] = 3
    config_path.write_text(json.dumps(config))
    state = {k: v.clone() for k, v in pristine.state_dict().items()}
    with pytest.raises(adaptc.CheckpointError, match=r"hada_w1_a has shape \[8, 2\], but c2 .* needs \[8, 3\]"):
        adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    assert all(torch.equal(v, state[k]) for k, v in pristine.state_dict().items())
