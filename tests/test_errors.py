"""Bad input: each mistake gets a clear error naming the problem, and the model is left untouched."""

import pytest
import torch
from torch import nn

import adaptc


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.q_proj(x) + self.v_proj(x)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value
            return self.fc(x)
        return x


def snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model, snap):
    values, grads, modes = snap
    for n, p in model.named_parameters():
        assert torch.equal(p, values[n]), n
        assert p.requires_grad == grads[n], n
    assert [m.training for m in model.modules()] == modes


X = torch.randn(2, 5, 8)


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"targets": ["q_prj"]}, adaptc.TargetError, ["q_prj", "q_proj", "Closest"]),
        ({"targets": r"layers\.\d+\.k_proj"}, adaptc.TargetError, ["matched no site", "q_proj"]),
        ({"r": 0}, adaptc.ConfigError, ["r must be a positive integer", "0"]),
        ({"r": -3}, adaptc.ConfigError, ["positive integer"]),
        ({"r": 2.5}, adaptc.ConfigError, ["positive integer"]),
        # r above a weight's rank is valid (as in PEFT), but not with PiSSA, nor absurdly large.
        ({"r": 9, "targets": ["q_proj"], "init": "pissa"}, adaptc.ConfigError, ["r=9", "q_proj", "pissa", "has 8"]),
        ({"r": 10**9, "targets": ["q_proj"]}, adaptc.ConfigError, ["r=1000000000", "q_proj", "at most 8"]),
        ({"targets": "(unclosed"}, adaptc.ConfigError, ["not a valid regular expression", "(unclosed"]),
        ({"targets": []}, adaptc.ConfigError, ["empty list"]),
        ({"targets": 3}, adaptc.ConfigError, ["targets must be"]),
        ({"dropout": 1.5}, adaptc.ConfigError, ["dropout", "[0, 1)"]),
        ({"alpha": 0}, adaptc.ConfigError, ["alpha"]),
        ({"init": "orthogonal"}, adaptc.ConfigError, ["init must be one of", "pissa"]),
        ({"rank": 8}, adaptc.ConfigError, ["unknown LoRA option 'rank'", "known options"]),
        ({"rank_pattern": {"q_proj": 0}}, adaptc.ConfigError, ["rank_pattern", "q_proj"]),
        ({"layers": ["0"]}, adaptc.ConfigError, ["layers must be"]),
        ({"layers": [5]}, adaptc.TargetError, ["layers=[5]"]),
    ],
    ids=lambda v: str(v) if not isinstance(v, list) else None,
)
def test_bad_lora_options(options, error, words):
    model = Attention()
    snap = snapshot(model)
    with pytest.raises(error) as info:
        adaptc.inject(model, "lora", example_inputs=(X,), **options)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert_unchanged(model, snap)


def test_unknown_method_lists_the_known_ones():
    model = Attention()
    snap = snapshot(model)
    with pytest.raises(adaptc.ConfigError, match=r"unknown method 'boft'.*known methods: lora"):
        adaptc.inject(model, "boft", example_inputs=(X,))
    assert_unchanged(model, snap)


def test_missing_or_malformed_example_inputs():
    model = Attention()
    snap = snapshot(model)
    with pytest.raises(adaptc.InputError, match="example_inputs is missing"):
        adaptc.inject(model, "lora")
    with pytest.raises(adaptc.InputError, match="must be a dict of keyword inputs"):
        adaptc.inject(model, "lora", example_inputs="tokens")
    with pytest.raises(adaptc.InputError, match="contains no tensor"):
        adaptc.inject(model, "lora", example_inputs={"n": 3})
    with pytest.raises(adaptc.InputError, match="must be a torch.nn.Module"):
        adaptc.inject("not a model", "lora", example_inputs=(X,))
    assert_unchanged(model, snap)


def test_example_input_of_the_wrong_shape_names_the_source_line():
    model = Attention()
    snap = snapshot(model)
    with pytest.raises(adaptc.InputError) as info:
        adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 5, 7),))
    message = str(info.value)
    assert "Tensor(2, 5, 7):float32" in message and "self.q_proj(x)" in message and "test_errors.py" in message
    assert "Pass inputs the model accepts" in message
    with pytest.raises(adaptc.InputError, match="Tensor\\(2, 5, 8\\):int64"):
        adaptc.inject(model, "lora", example_inputs=(torch.ones(2, 5, 8, dtype=torch.long),))
    assert_unchanged(model, snap)


def test_uncapturable_model_names_op_and_source_line():
    model = DataDependent()
    snap = snapshot(model)
    with pytest.raises(adaptc.CaptureError) as info:
        adaptc.inject(model, "lora", example_inputs=(torch.randn(3, 4),))
    message = str(info.value)
    assert "test_errors.py" in message and "if x.sum() > 0:" in message
    assert "tensor value read in Python" in message
    assert "Traceback" not in message and len(message.splitlines()) <= 6
    assert_unchanged(model, snap)


def test_config_object_with_extra_options_is_refused():
    with pytest.raises(adaptc.ConfigError, match="put the options in the config"):
        adaptc.inject(Attention(), adaptc.LoraConfig(r=2), example_inputs=(X,), r=4)


def test_inject_into_an_adapted_model_is_refused():
    am = adaptc.inject(Attention(), "lora", example_inputs=(X,), r=2)
    with pytest.raises(adaptc.InputError, match="already an AdaptedModel"):
        adaptc.inject(am, "lora", example_inputs=(X,))


def test_peft_spellings_are_accepted():
    am = adaptc.inject(
        Attention(), "lora", example_inputs=(X,), target_modules=["q_proj", "v_proj"], lora_alpha=4, lora_dropout=0.1
    )
    assert sorted(s.name for s in am.sites) == ["q_proj", "v_proj"]
    assert am.adapter_config.alpha == 4 and am.adapter_config.dropout == 0.1
