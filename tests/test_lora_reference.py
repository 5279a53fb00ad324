"""LoRA numerics against hand-written references, op kind by op kind.

Each test randomises the adapter (B = 0 would hide mistakes) and compares the adapted
model with a formula written out here from the base weights and the adapter tensors.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import adaptc


def randomize(am, std=0.2):
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.normal_(std=std)


def layer_of(am, name):
    return am.adapters["default"][name.replace(".", "__")]


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_linear_at_init_is_exact_and_random_matches_formula():
    model = TwoLinear().eval()
    x = torch.randn(3, 7, 12)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["fc1", "fc2"], r=4, alpha=8)
    assert torch.equal(am(x), model(x))  # B = 0 at init
    randomize(am)
    a1, b1 = layer_of(am, "fc1").lora_A, layer_of(am, "fc1").lora_B
    a2, b2 = layer_of(am, "fc2").lora_A, layer_of(am, "fc2").lora_B
    scale = 8 / 4
    h = model.fc1(x) + scale * (x @ a1.T) @ b1.T
    h = torch.relu(h)
    expected = model.fc2(h) + scale * (h @ a2.T) @ b2.T
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


def test_all_linear_skips_the_output_head():
    model = TwoLinear().eval()
    am = adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 12),), r=2)
    assert [s.name for s in am.sites] == ["fc1"]


def test_rslora_scale_and_rank_alpha_patterns():
    model = TwoLinear().eval()
    x = torch.randn(4, 12)
    am = adaptc.inject(
        model, "lora", example_inputs=(x,), targets=["fc1", "fc2"], r=4, alpha=8, rslora=True,
        rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 3},
    )
    l1, l2 = layer_of(am, "fc1"), layer_of(am, "fc2")
    assert l1.lora_A.shape == (4, 12) and l2.lora_A.shape == (2, 16)
    assert l1.scaling == pytest.approx(8 / math.sqrt(4)) and l2.scaling == pytest.approx(3 / math.sqrt(2))
    randomize(am)
    h = torch.relu(model.fc1(x) + 4.0 * (x @ l1.lora_A.T) @ l1.lora_B.T)
    expected = model.fc2(h) + (3 / math.sqrt(2)) * (h @ l2.lora_A.T) @ l2.lora_B.T
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


class FunctionalUse(nn.Module):
    """Applies a child's weight functionally, twice, from the parent's forward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 6) * 0.3)  # stored [in, out], used as x @ w

    def forward(self, x):
        y = F.linear(x, self.proj.weight, self.proj.bias)
        y = F.linear(torch.tanh(y), self.proj.weight)
        return torch.tanh(y @ self.w).sum(-1)


def test_functional_and_repeated_weight_uses_are_one_site_adapted_everywhere():
    model = FunctionalUse().eval()
    x = torch.randn(5, 8)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["proj", "w"], r=2, alpha=2)
    sites = {s.name: s for s in am.sites}
    assert sites["proj"].uses == 2 and sites["proj"].kind == "linear"
    assert sites["w"].fan_in_fan_out and (sites["w"].in_features, sites["w"].out_features) == (8, 6)
    randomize(am)
    p, w = layer_of(am, "proj"), layer_of(am, "w")
    delta_p = p.lora_B @ p.lora_A
    y = F.linear(x, model.proj.weight + delta_p, model.proj.bias)
    y = F.linear(torch.tanh(y), model.proj.weight + delta_p)
    expected = torch.tanh(y @ (model.w + (w.lora_B @ w.lora_A).T)).sum(-1)
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


def test_transformers_conv1d_weight_stored_in_out():
    conv1d = Conv1D(10, 6)  # nf=10 outputs, nx=6 inputs, weight [6, 10]
    model = nn.Sequential(conv1d, nn.GELU(), nn.Linear(10, 3)).eval()
    x = torch.randn(2, 4, 6)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["0"], r=3, alpha=6)
    site = am.sites[0]
    assert site.op == "aten.addmm" and site.fan_in_fan_out and (site.in_features, site.out_features) == (6, 10)
    randomize(am)
    layer = layer_of(am, "0")
    h = x @ conv1d.weight + conv1d.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    expected = model[2](model[1](h))
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


def grouped_conv_delta(a, b, groups, weight_shape):
    """Hand-built conv weight update: for each group g, B_g @ A_g reshaped to the kernel."""
    out_c, in_per_group = weight_shape[0], weight_shape[1]
    r = a.shape[0] // groups
    delta = torch.zeros(weight_shape)
    for g in range(groups):
        a_g = a[g * r:(g + 1) * r].reshape(r, -1)
        b_g = b[g * out_c // groups:(g + 1) * out_c // groups].reshape(out_c // groups, r)
        delta[g * out_c // groups:(g + 1) * out_c // groups] = (b_g @ a_g).reshape(out_c // groups, in_per_group, *weight_shape[2:])
    return delta


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_matches_merged_kernel(groups):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = torch.randn(2, 4, 9, 11)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["0"], r=2, alpha=4)
    assert torch.equal(am(x), model(x))
    randomize(am)
    layer = layer_of(am, "0")
    delta = grouped_conv_delta(layer.lora_A, layer.lora_B, groups, conv.weight.shape) * 2.0
    expected = torch.relu(F.conv2d(x, conv.weight + delta, conv.bias, 2, 1, 1, groups))
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-6, rtol=0)


def test_conv1d_with_padding_same():
    model = nn.Sequential(nn.Conv1d(3, 5, 5, padding="same")).eval()
    x = torch.randn(2, 3, 17)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["0"], r=2, alpha=2)
    randomize(am)
    layer = layer_of(am, "0")
    delta = grouped_conv_delta(layer.lora_A, layer.lora_B, 1, model[0].weight.shape)
    expected = F.conv1d(x, model[0].weight + delta, model[0].bias, padding="same")
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


class EmbedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.out = nn.Linear(6, 2)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_embedding_low_rank_lookup():
    model = EmbedModel().eval()
    ids = torch.randint(0, 20, (3, 5))
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=["emb"], r=3, alpha=3)
    assert torch.equal(am(ids), model(ids))
    randomize(am)
    layer = layer_of(am, "emb")
    looked_up = model.emb.weight[ids] + (layer.lora_embedding_A.T[ids] @ layer.lora_embedding_B.T)
    torch.testing.assert_close(am(ids), model.out(looked_up), atol=1e-5, rtol=0)


def test_dora_linear_matches_formula():
    model = TwoLinear().eval()
    x = torch.randn(4, 12)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["fc1"], r=4, alpha=8, use_dora=True)
    # Magnitude starts at the weight's row norms, so the output is the base output.
    torch.testing.assert_close(am(x), model(x), atol=1e-6, rtol=0)
    randomize(am)
    layer = layer_of(am, "fc1")
    w = model.fc1.weight + 2.0 * layer.lora_B @ layer.lora_A
    direction = w / w.norm(dim=1, keepdim=True)
    h = x @ (layer.lora_magnitude_vector[:, None] * direction).T + model.fc1.bias
    torch.testing.assert_close(am(x), model.fc2(torch.relu(h)), atol=1e-5, rtol=0)


def test_dora_conv_matches_formula():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 3, 6, 6)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["0"], r=2, alpha=2, use_dora=True)
    torch.testing.assert_close(am(x), model(x), atol=1e-5, rtol=0)
    randomize(am)
    layer = layer_of(am, "0")
    w = conv.weight + grouped_conv_delta(layer.lora_A, layer.lora_B, 1, conv.weight.shape)
    norm = w.flatten(1).norm(dim=1)
    w = w * (layer.lora_magnitude_vector / norm)[:, None, None, None]
    torch.testing.assert_close(am(x), F.conv2d(x, w, conv.bias, padding=1), atol=1e-5, rtol=0)


def test_gaussian_and_pissa_inits():
    model = TwoLinear().eval()
    x = torch.randn(6, 12)
    before = model(x).detach()
    weight_before = model.fc1.weight.detach().clone()
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["fc1"], r=4, alpha=4, init="pissa")
    layer = layer_of(am, "fc1")
    # PiSSA moves the top singular directions into A and B: the output is unchanged, the weight is not.
    torch.testing.assert_close(am(x), before, atol=1e-5, rtol=0)
    assert not torch.equal(model.fc1.weight, weight_before)
    top = torch.linalg.svdvals(weight_before)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(layer.scaling * layer.lora_B @ layer.lora_A)[:4], top, atol=1e-4, rtol=1e-4)

    model2 = TwoLinear().eval()
    am2 = adaptc.inject(model2, "lora", example_inputs=(x,), targets=["fc1"], r=4, init="gaussian")
    layer2 = layer_of(am2, "fc1")
    assert torch.count_nonzero(layer2.lora_B) == 0
    assert abs(layer2.lora_A.std().item() - 1 / 4) < 0.1


class DropoutModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.drop(self.fc(x)))


def test_train_eval_switch_dropout_and_batch_norm_like_the_model():
    model = DropoutModel().train()
    x = torch.randn(8, 16)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["fc"], r=2)
    assert am.training
    running_before = model.bn.running_mean.clone()
    a, b = am(x), am(x)
    assert not torch.equal(a, b)  # dropout active
    assert not torch.equal(model.bn.running_mean, running_before)  # batch norm updates the model's buffers
    am.eval()
    assert not model.training
    torch.testing.assert_close(am(x), model(x), atol=0, rtol=0)
    assert torch.equal(am(x), am(x))
    am.train()
    assert not torch.equal(am(x), am(x))


def test_lora_dropout_applies_to_the_adapter_branch_only():
    model = TwoLinear().eval()
    x = torch.randn(4, 12)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["fc1"], r=4, alpha=4, dropout=0.5)
    randomize(am)
    layer = layer_of(am, "fc1")
    am.eval()
    expected = model.fc2(torch.relu(model.fc1(x) + (x @ layer.lora_A.T) @ layer.lora_B.T))
    torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)
    am.train()
    assert not torch.equal(am(x), am(x))


def test_runs_at_new_shapes_without_recapture():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    am = adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 5, 8),), r=2)
    randomize(am)
    for shape in [(3, 9, 8), (1, 1, 8), (7, 2, 8)]:
        x = torch.randn(shape)
        layer = layer_of(am, "0")
        h = model[0](x) + (x @ layer.lora_A.T) @ layer.lora_B.T * (8 / 2)
        torch.testing.assert_close(am(x), model[2](model[1](h)), atol=1e-5, rtol=0)
    assert sum(len(v) for v in am._graphs.values()) == 1
    assert am.graph_module.captured_with == {"eval": "export"}


def test_only_adapter_parameters_train_and_weights_are_shared():
    model = TwoLinear()
    am = adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 12),), targets=["fc1", "fc2"], r=2)
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    assert am.base_model is model
    assert am.base_model.fc1.weight is model.fc1.weight
    summary = am.trainable_summary(print_it=False)
    assert summary.trainable == 2 * (12 + 16) + 2 * (16 + 5)
    assert summary.total == summary.trainable + sum(p.numel() for p in model.parameters())


@torch.fx.wrap
def numpy_gain(x):
    # NumPy cannot run on export's fake tensors; fx keeps this wrapped call as a leaf.
    return torch.from_numpy(np.tanh(x.detach().cpu().numpy())).to(x.dtype)


class NumpyGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * numpy_gain(x)


def test_fx_fallback_when_export_fails():
    model = NumpyGain().eval()
    x = torch.randn(2, 4)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["fc"], r=2)
    assert am.graph_module.captured_with == {"eval": "fx"}
    randomize(am)
    layer = layer_of(am, "fc")
    x2 = torch.randn(5, 4)
    expected = (model.fc(x2) + 4.0 * (x2 @ layer.lora_A.T) @ layer.lora_B.T) * torch.tanh(x2)
    torch.testing.assert_close(am(x2), expected, atol=1e-5, rtol=0)
