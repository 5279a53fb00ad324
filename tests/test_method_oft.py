"""OFT: options, the rotation (orthogonal, PEFT's Cayley / Cayley-Neumann forms), linear / Conv1D / conv sites,
merge, training, ONNX, and two-way checkpoint parity with PEFT 0.21 (the reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import adaptc
from adaptc.errors import ConfigError, TargetError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def gpt2():
    model = tiny_gpt2(n_positions=32, n_head=2, seed=0)
    return model, {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),
                   "use_cache": False}


def llama():
    model = tiny_llama(max_position_embeddings=32, seed=0)
    return model, {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),
                   "use_cache": False}


def bert():
    model = tiny_bert(num_attention_heads=2, max_position_embeddings=32, seed=0)
    return model, {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}


class ConvNet(nn.Module):
    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, kernel, padding=kernel // 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def _randomize(module, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("options, message", [
    ({"r": 4, "oft_block_size": 8}, "either r"),
    ({"r": 0, "oft_block_size": 0}, "either r"),
    ({"oft_block_size": 1}, "rotate"),
    ({"eps": 0}, "eps"),
    ({"module_dropout": 1.0}, "module_dropout"),
    ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"),
    ({"block_size": 8}, "unknown OFT option"),
])
def test_bad_options_are_refused(options, message):
    model, inputs = gpt2()
    with pytest.raises(ConfigError, match=message):
        adaptc.inject(model, "oft", example_inputs=inputs, **options)


def test_embedding_target_is_a_target_error():
    model, inputs = gpt2()
    with pytest.raises(TargetError, match="wte"):
        adaptc.inject(model, "oft", example_inputs=inputs, targets=["wte", "c_fc"], oft_block_size=8)


def test_quantized_weights_are_refused():
    model, inputs = llama()
    with pytest.raises(ConfigError, match="quantized"):
        adaptc.inject(model, "oft", example_inputs=inputs, quantize="nf4", oft_block_size=8)


@pytest.mark.parametrize("neumann", [False, True])
def test_rotation_is_orthogonal_and_block_diagonal(neumann):
    model, inputs = gpt2()
    am = adaptc.inject(model, "oft", example_inputs=inputs, targets=["c_fc"], oft_block_size=8,
                       use_cayley_neumann=neumann)
    layer = am.adapters["default"]["transformer__h__0__mlp__c_fc"]
    with torch.no_grad():
        layer.oft_R.normal_(std=0.05)
        rotation = layer.matrix()
    assert rotation.shape == (32, 32) and layer.blocks == 4
    eye = torch.eye(32)
    # The exact Cayley transform is orthogonal; its 5-term Neumann series only nearly so at small Q.
    torch.testing.assert_close(rotation @ rotation.T, eye, atol=1e-5 if not neumann else 1e-2, rtol=0)
    assert torch.all(rotation[:8, 8:] == 0)  # block-diagonal


@pytest.mark.parametrize("build, options", [
    (gpt2, {"targets": ["c_attn", "c_fc", "c_proj"], "oft_block_size": 8}),  # GPT-2's Conv1D ([in, out] weights)
    (llama, {"targets": "all-linear", "r": 4, "coft": True, "eps": 1e-3, "block_share": True}),
])
def test_starts_as_the_base_model_trains_and_merges(build, options):
    model, inputs = build()
    model.eval()
    with torch.no_grad():
        base = model(**inputs).logits
    am = adaptc.inject(model, "oft", example_inputs=inputs, **options)
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(am(**inputs).logits, base, atol=1e-5, rtol=1e-5)  # R = I at init
    adaptc.train(am, [{**inputs, "labels": inputs["input_ids"]}], steps=2, lr=1e-2, progress=False)
    am.eval()
    with torch.no_grad():
        adapted = am(**inputs).logits
        assert (adapted - base).abs().max() > 1e-4
        torch.testing.assert_close(am.merge()(**inputs).logits, adapted, atol=1e-5, rtol=1e-5)


def test_conv_rotates_the_whole_filter_and_merges():
    torch.manual_seed(0)
    model, x = ConvNet(3).eval(), torch.randn(2, 4, 6, 6)
    am = adaptc.inject(model, "oft", example_inputs=(x,), targets=["conv"], oft_block_size=6).eval()
    layer = am.adapters["default"]["conv"]
    assert (layer.blocks, layer.block_size) == (6, 6)  # 4 channels x 3 x 3 = 36 = 6 x 6
    _randomize(am.adapters)
    with torch.no_grad():
        adapted = am(x)
        rotated = model.conv.weight.reshape(8, -1) @ layer.matrix().T  # by hand: W R^T over the filter
        expected = model.head(torch.conv2d(x, rotated.reshape(8, 4, 3, 3), model.conv.bias, padding=1).relu().mean((2, 3)))
        torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(am.merge()(x), adapted, atol=1e-5, rtol=1e-5)


# --- PEFT is the reference ---------------------------------------------------------------------------

peft = pytest.importorskip("peft")

CASES = {
    "bert-linear": (bert, {"oft_block_size": 8, "target_modules": ["query", "value", "dense"]}),
    "llama-cayley": (llama, {"r": 4, "oft_block_size": 0, "target_modules": "all-linear", "use_cayley_neumann": False}),
    "llama-coft-shared": (llama, {"oft_block_size": 4, "target_modules": ["q_proj", "v_proj"], "coft": True,
                                  "eps": 1e-3, "block_share": True}),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_load_both_ways(case, tmp_path):
    build, options = CASES[case]
    model, inputs = build()
    model.eval()
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(**options))
    _randomize(pm)
    pm.eval()
    with torch.no_grad():
        reference = pm(**inputs).logits
        assert (reference - model(**inputs).logits).abs().max() > 1e-4
    pm.save_pretrained(tmp_path / "peft")
    am = adaptc.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs=inputs).eval()
    with torch.no_grad():
        torch.testing.assert_close(am(**inputs).logits, reference, atol=1e-5, rtol=1e-5)
    am.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_checkpoints_match_peft(kernel, tmp_path):
    """1x1: PEFT's forward. 3x3: PEFT's merged model (PEFT 0.21's unmerged forward folds overlapping
    input patches back by summing, so for kernels above 1x1 it differs from its own merge, even at R = I)."""
    torch.manual_seed(0)
    model, x = ConvNet(kernel).eval(), torch.randn(2, 4, 6, 6)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.OFTConfig(oft_block_size=4, target_modules=["conv"]))
    _randomize(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        reference = pm(x) if kernel == 1 else copy.deepcopy(pm).merge_and_unload()(x)
        assert (reference - model(x)).abs().max() > 1e-4
    am = adaptc.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(am(x), reference, atol=1e-5, rtol=1e-5)
    am.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(x) if kernel == 1 else back.merge_and_unload()(x)
        torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_onnx_export_parity(tmp_path):
    # A small conv + linear model: GPT-2 and the other architectures are the conformance matrix's cells.
    torch.manual_seed(0)
    am = adaptc.inject(ConvNet(3).eval(), "oft", example_inputs=(torch.randn(2, 4, 6, 6),), targets=["conv", "head"],
                       oft_block_size=4).eval()
    _randomize(am.adapters)
    report = adaptc.export_onnx(am, tmp_path / "model.onnx")
    assert max(report.parity.values()) < 1e-4


def test_hf_resume_copies_the_rotations_into_the_existing_adapter(tmp_path):
    from adaptc.hf import load_adapter_weights

    model, inputs = gpt2()
    am = adaptc.inject(model, "oft", example_inputs=inputs, oft_block_size=8)
    _randomize(am.adapters)
    saved = {k: v.clone() for k, v in am.adapters["default"].state_dict().items()}
    am.save_adapter(tmp_path / "ckpt")
    params = list(am.adapters["default"].parameters())  # an optimizer holds these: they must stay the same objects
    _randomize(am.adapters, seed=2)
    load_adapter_weights(am, tmp_path / "ckpt")
    assert list(am.adapters) == ["default"] and am.active_adapters == ["default"]
    assert all(a is b for a, b in zip(params, am.adapters["default"].parameters()))
    for key, value in am.adapters["default"].state_dict().items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)
