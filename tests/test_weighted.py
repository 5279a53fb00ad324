"""add_weighted_adapter: against PEFT's implementation and against the weighted sum of deltas."""

import copy

import pytest
import torch
from model_zoo import tiny_gpt2
from torch import nn

import adaptc

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """Embedding, linear and 3x3 conv sites in one small model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 32)
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.fc2 = nn.Linear(8 * 16, 5)

    def forward(self, ids):
        h = torch.relu(self.fc1(self.emb(ids))).mean(1)
        h = torch.relu(self.conv(h.view(-1, 2, 4, 4)))
        return self.fc2(h.flatten(1))


IDS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))
# "default" and "b" share fc1 and conv; emb is only in "default", fc2 only in "b".
CONFIGS = {
    "default": dict(r=2, lora_alpha=4, target_modules=["emb", "fc1", "conv"]),
    "b": dict(r=2, lora_alpha=3, target_modules=["fc1", "conv", "fc2"]),
}
WEIGHTS = [0.7, -0.4]


def build_pair():
    """The same two randomised adapters in adaptc and in PEFT."""
    base = Net()
    am = None
    for name, cfg in CONFIGS.items():
        if am is None:
            am = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=IDS, **cfg)
        else:
            am.add_adapter(name, "lora", **cfg)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.normal_(std=0.3)
    pm = None
    for name, cfg in CONFIGS.items():
        pcfg = peft.LoraConfig(**cfg)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), pcfg, adapter_name=name)
        else:
            pm.add_adapter(name, pcfg)
    with torch.no_grad():
        for name in CONFIGS:
            for site in am.adapter_sites(name):
                copy_layer(am.adapters[name][site.name.replace(".", "__")], pm.base_model.model.get_submodule(site.name), name)
    return am.eval(), pm.eval()


def copy_layer(layer, peft_layer, name):
    if layer.kind == "embedding":
        peft_layer.lora_embedding_A[name].copy_(layer.lora_embedding_A)
        peft_layer.lora_embedding_B[name].copy_(layer.lora_embedding_B)
    else:
        peft_layer.lora_A[name].weight.copy_(layer.lora_A)
        peft_layer.lora_B[name].weight.copy_(layer.lora_B)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_matches_peft(combination):
    am, pm = build_pair()
    pm.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination_type=combination)
    am.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination=combination)
    assert am.active_adapters == ["b"]  # added, not activated (as PEFT)
    pm.set_adapter("mix")
    am.set_adapter("mix")
    with torch.no_grad():
        expected, got = pm(IDS), am(IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert {s.name for s in am.adapter_sites("mix")} == {"emb", "fc1", "conv", "fc2"}


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_exact_combinations_equal_weighted_delta_sum(combination):
    am, _ = build_pair()
    am.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination=combination, svd_rank=4)
    for site in ["emb", "fc1", "conv", "fc2"]:
        want = sum(
            w * am.adapters[a][site].delta_weight() for a, w in zip(["default", "b"], WEIGHTS) if site in am.adapters[a]
        )
        got = am.adapters["mix"][site].delta_weight()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_svd_matches_weighted_sum():
    model = tiny_gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    ids = torch.randint(0, 50, (2, 5))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids, "use_cache": False}, targets=["c_attn"], r=2)
    am.add_adapter("b", "lora", targets=["c_attn"], r=3, alpha=5)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.normal_(std=0.3)
    am.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination="svd", svd_rank=5)
    key = "transformer__h__0__attn__c_attn"
    want = am.adapters["default"][key].delta_weight() + 0.5 * am.adapters["b"][key].delta_weight()
    torch.testing.assert_close(am.adapters["mix"][key].delta_weight(), want, atol=1e-5, rtol=1e-5)


def test_bad_requests_change_nothing():
    am, _ = build_pair()
    am.add_adapter("r3", "lora", targets=["fc1"], r=3)
    am.add_adapter("dora", "lora", targets=["fc1"], r=2, use_dora=True)
    before = list(am.adapters)
    with pytest.raises(adaptc.ConfigError, match="same|one rank"):
        am.add_weighted_adapter(["default", "r3"], [1, 1], "x", combination="linear")
    with pytest.raises(adaptc.ConfigError, match="DoRA"):
        am.add_weighted_adapter(["default", "dora"], [1, 1], "x", combination="cat")
    with pytest.raises(adaptc.ConfigError, match="unknown adapter"):
        am.add_weighted_adapter(["default", "nope"], [1, 1], "x")
    with pytest.raises(adaptc.ConfigError, match="combination"):
        am.add_weighted_adapter(["default", "b"], [1, 1], "x", combination="ties")
    with pytest.raises(adaptc.ConfigError, match="one weight per adapter"):
        am.add_weighted_adapter(["default", "b"], [1], "x")
    assert list(am.adapters) == before


def test_weighted_adapter_saves_and_loads_in_adaptc_and_peft(tmp_path):
    am, pm = build_pair()
    am.add_weighted_adapter(["default", "b"], WEIGHTS, "mix", combination="cat")
    am.save_adapter(tmp_path, "mix")  # a non-default adapter goes in a subfolder, as in PEFT
    am.set_adapter("mix")
    with torch.no_grad():
        expected = am(IDS)
    am.load_adapter(tmp_path / "mix", "mix_again")
    pm.load_adapter(str(tmp_path / "mix"), adapter_name="mix_from_adaptc")
    pm.set_adapter("mix_from_adaptc")
    with torch.no_grad():
        torch.testing.assert_close(am(IDS), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pm(IDS), expected, atol=1e-5, rtol=1e-5)
