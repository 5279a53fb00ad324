"""A LoRA rank above what a site's weight allows (r > min(in, out)): valid, as in PEFT.

The update B A then has rank min(in, out) at most (rank-deficient), but PEFT creates, trains,
saves and loads such adapters, so adaptc does too: ``inject`` warns once naming the sites,
``load_adapter`` loads PEFT's checkpoint as PEFT computes it, and the CLI's default r=8 works
on a model with a 6-feature input. Refused only where the rank truly cannot work: PiSSA (the
top-r singular directions of a weight with fewer) and an absurd rank.
"""

import copy
import json
import warnings

import pytest
import torch
from adaptc.passes.lora import RankDeficientWarning
from torch import nn

import adaptc
from adaptc.cli import main

peft = pytest.importorskip("peft")

# PEFT reads adaptc's extra config field with "Unexpected keyword arguments ['adaptc'] ... ignored".
pytestmark = pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")


class Small(nn.Module):
    """A 6-feature input projection (rank <= 6) and a 3-class head (rank <= 3)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


class Kinds(nn.Module):
    """An embedding (rank <= 4), a 3-tap conv (rank <= 6) and the linear inp (rank <= 6)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.inp = nn.Linear(6, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.inp(h)))


X = (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),)
IDS = (torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1)),)
MODELS = {
    "linear": (Small, X, dict(r=8, lora_alpha=16, target_modules=["inp", "out"])),
    "embedding-conv-linear": (Kinds, IDS, dict(r=8, lora_alpha=8, target_modules=["emb", "conv", "inp"])),
}


def fresh(build):
    torch.manual_seed(0)
    return build().eval()


@torch.no_grad()
def randomize(named_params):
    for name, p in named_params:
        if "lora_" in name:
            p.normal_(std=0.2)


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_adapter_with_rank_above_the_weight_loads_as_peft_computes_it(name, tmp_path):
    build, inputs, options = MODELS[name]
    base = fresh(build)
    pristine = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**options)).eval()
    randomize(peft_model.named_parameters())
    assert peft_model.base_model.model.inp.lora_B["default"].weight.abs().min() > 0
    with torch.no_grad():
        expected = peft_model(*inputs)
    peft_model.save_pretrained(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)  # loading a trained adapter stays quiet
        am = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    assert am.adapters["default"]["inp"].r == 8
    with torch.no_grad():
        torch.testing.assert_close(am(*inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_adaptc_adapter_with_rank_above_the_weight_loads_into_peft(name, tmp_path):
    build, inputs, options = MODELS[name]
    base = fresh(build)
    pristine = copy.deepcopy(base)
    with pytest.warns(RankDeficientWarning):
        am = adaptc.inject(base, "lora", example_inputs=inputs, **options)
    randomize(am.adapters.named_parameters())
    with torch.no_grad():
        expected = am(*inputs)
    am.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8

    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert tuple(peft_model.base_model.model.inp.lora_A["default"].weight.shape) == (8, 6)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(*inputs), expected, atol=1e-5, rtol=0)


def test_inject_warns_once_naming_the_site_trains_and_merges():
    model = fresh(Small)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        am = adaptc.inject(model, "lora", example_inputs=X, r=8)  # all-linear: inp (out is the head)
    deficient = [w for w in caught if issubclass(w.category, RankDeficientWarning)]
    assert len(deficient) == 1, [str(w.message) for w in caught]
    assert "inp (r=8" in str(deficient[0].message) and "rank-deficient" in str(deficient[0].message)
    assert deficient[0].filename == __file__  # attributed to the caller's line
    layer = am.adapters["default"]["inp"]
    assert tuple(layer.lora_A.shape) == (8, 6) and tuple(layer.lora_B.shape) == (32, 8)

    am.train()
    optimizer = torch.optim.SGD(am.adapter_parameters(), lr=0.1)
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(am(*X), target)
        loss.backward()
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        optimizer.step()
    assert all(not torch.equal(p, start[n]) for n, p in layer.named_parameters())  # both A and B trained

    am.eval()
    with torch.no_grad():
        unmerged = am(*X)
        merged = am.merge()
        torch.testing.assert_close(merged(*X), unmerged, atol=1e-5, rtol=1e-5)


def test_rank_above_the_weight_on_conv_and_embedding_merges_and_round_trips(tmp_path):
    base = fresh(Kinds)
    pristine = copy.deepcopy(base)
    with pytest.warns(RankDeficientWarning, match=r"emb \(r=8.*conv \(r=8.*inp \(r=8"):
        am = adaptc.inject(base, "lora", example_inputs=IDS, targets=["emb", "conv", "inp"], r=8)
    randomize(am.adapters.named_parameters())
    am.eval()
    am.save_adapter(tmp_path)
    with torch.no_grad():
        expected = am(*IDS)
        again = adaptc.load_adapter(pristine, tmp_path, example_inputs=IDS)
        torch.testing.assert_close(again(*IDS), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(am.merge()(*IDS), expected, atol=1e-5, rtol=1e-5)


def test_pissa_needs_a_rank_the_weight_has():
    """PiSSA moves the top-r singular directions into A and B; a 32x6 weight has 6."""
    model = fresh(Small)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(adaptc.ConfigError, match=r"r=8 is larger than inp allows with init='pissa'.*has 6"):
        adaptc.inject(model, "lora", example_inputs=X, r=8, init="pissa")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    adaptc.inject(model, "lora", example_inputs=X, r=6, init="pissa")  # the weight's rank is fine


def test_peft_pissa_adapter_with_rank_above_the_weight_loads(tmp_path):
    """PEFT's PiSSA keeps r=8 in the config but stores A, B of rank 6 at a 32x6 weight (scale alpha / 8)."""
    base = fresh(Small)
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["inp"], init_lora_weights="pissa")
    ).eval()
    assert tuple(peft_model.base_model.model.inp.lora_A["default"].weight.shape) == (6, 6)
    randomize(peft_model.named_parameters())
    with torch.no_grad():
        expected = peft_model(*X)
    peft_model.save_pretrained(tmp_path)
    residual_base = fresh(Small)  # the base PEFT's PiSSA left: the adapter reproduces the model on it
    with torch.no_grad():
        residual_base.inp.weight.copy_(peft_model.base_model.model.inp.base_layer.weight)
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'"):
        am = adaptc.load_adapter(residual_base, tmp_path, example_inputs=X)
    with torch.no_grad():
        torch.testing.assert_close(am(*X), expected, atol=1e-5, rtol=0)


def test_weighted_cat_may_exceed_the_weights_rank():
    """cat's rank is the sum of the sources' (4 + 4 at a rank-6 weight): exact, as in PEFT."""
    model = fresh(Small)
    am = adaptc.inject(model, "lora", example_inputs=X, targets=["inp"], r=4)
    am.add_adapter("b", "lora", targets=["inp"], r=4, alpha=2)
    randomize(am.adapters.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)
        am.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination="cat")
    want = 0.7 * am.adapters["default"]["inp"].delta_weight() - 0.4 * am.adapters["b"]["inp"].delta_weight()
    torch.testing.assert_close(am.adapters["mix"]["inp"].delta_weight(), want, atol=1e-5, rtol=1e-5)


def test_cli_default_rank_works_on_a_6_feature_model(capsys, tmp_path):
    model_file = tmp_path / "six.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build_model():\n"
        "    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))\n\n"
        "def example_inputs():\n"
        "    return (torch.randn(4, 6),)\n"
    )
    assert main(["inspect", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "max r" not in out and "- (" not in out
    assert "304 (rank 6)" in out  # 8 * (6 + 32) parameters; the update has rank 6 at most
    assert "note: r=8 is above the rank of the weight at 2 site(s) (0, 4)" in out

    with pytest.warns(RankDeficientWarning, match=r"\b0 \(r=8"):
        assert main(["inject", str(model_file), "-o", str(tmp_path / "adapter")]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    assert "3 sites matched" not in captured.out and "2 sites matched" in captured.out  # 0 and 2; 4 is the head
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
