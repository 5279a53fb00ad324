"""AdaLoRA: options, the SVD-form layer, the rank allocator in adaptc.train and the HF Trainer, merge, ONNX,
and two-way checkpoint parity with PEFT 0.21 (pruned ranks included; PEFT is the reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from model_zoo import tiny_gpt2
from torch import nn

import adaptc
from adaptc.errors import ConfigError, TargetError
from adaptc.train import hooks_loss, method_hooks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

OPTIONS = {"init_r": 4, "target_r": 2, "total_step": 8, "tinit": 1, "tfinal": 2, "targets": ["c_attn", "c_fc"]}


def gpt2():
    # No dropout: the PEFT comparison trains both models on the same computation.
    model = tiny_gpt2(n_positions=32, n_head=2, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return model, {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),
                   "use_cache": False}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def _randomize(am, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("options, message", [
    ({"total_step": None}, "total_step"),
    ({"total_step": 4, "tinit": 2, "tfinal": 2}, "budgeting phase"),
    ({"init_r": 2, "target_r": 4}, "only lowers"),
    ({"beta1": 1.0}, "beta1"),
    ({"orth_reg_weight": -1}, "orth_reg_weight"),
    ({"deltaT": 0}, "deltaT"),
    ({"rank": 3}, "unknown AdaLoRA option"),
])
def test_bad_options_are_refused_before_the_model_is_touched(options, message):
    model, inputs = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        adaptc.inject(model, "adalora", example_inputs=inputs, **{**OPTIONS, **options})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_embedding_target_is_a_target_error():
    model, inputs = gpt2()
    with pytest.raises(TargetError, match="wte"):
        adaptc.inject(model, "adalora", example_inputs=inputs, **{**OPTIONS, "targets": ["wte", "c_fc"]})


def test_starts_as_the_base_model_and_merges_exactly():
    model, inputs = gpt2()
    model.eval()
    with torch.no_grad():
        base = model(**inputs).logits
    am = adaptc.inject(model, "adalora", example_inputs=inputs, **OPTIONS).eval()
    with torch.no_grad():
        torch.testing.assert_close(am(**inputs).logits, base, atol=0, rtol=0)  # E = 0 at init
        _randomize(am)
        layer = am.adapters["default"]["transformer__h__0__attn__c_attn"]
        x = torch.randn(3, 32)
        conv1d = model.transformer.h[0].attn.c_attn  # by hand: W x + b + B (E * A x) * alpha / (init_r + 1e-5)
        expected = conv1d(x) + (x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T) * 8.0 / (4 + 1e-5)
        torch.testing.assert_close(layer(x, conv1d(x), conv1d.weight, conv1d.bias), expected)
        adapted = am(**inputs).logits
        assert (adapted - base).abs().max() > 1e-3
        merged = am.merge()
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=1e-5)


def test_train_reallocates_ranks_to_the_target_budget(tmp_path):
    model, inputs = gpt2()
    am = adaptc.inject(model, "adalora", example_inputs=inputs, **OPTIONS)
    batches = [{**inputs, "labels": inputs["input_ids"]}]
    adaptc.train(am, batches, steps=8, lr=1e-2, progress=False)
    config = am.adapter_configs()["default"]
    pattern = config.rank_pattern
    assert pattern is not None and len(pattern) == 4  # 2 layers x (c_attn, c_fc)
    assert sum(sum(kept) for kept in pattern.values()) == config.target_r * 4  # the final budget
    for site, kept in pattern.items():
        layer = am.adapters["default"][site.replace(".", "__")]
        dropped = ~torch.tensor(kept)
        assert torch.all(layer.lora_E[dropped] == 0)  # masked triplets contribute nothing
    am.eval()
    with torch.no_grad():
        trained = am(**inputs).logits
    am.save_adapter(tmp_path / "a")
    again = adaptc.load_adapter(gpt2()[0], tmp_path / "a", example_inputs=inputs).eval()
    for site, kept in pattern.items():  # saved with the pruned ranks
        assert again.adapters["default"][site.replace(".", "__")].r == sum(kept)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, trained, atol=1e-5, rtol=1e-5)


def test_hf_resume_refuses_a_pruned_checkpoint_and_keeps_the_adapter(tmp_path):
    from adaptc.errors import CheckpointError
    from adaptc.hf import load_adapter_weights

    model, inputs = gpt2()
    am = adaptc.inject(model, "adalora", example_inputs=inputs, **OPTIONS)
    am.save_adapter(tmp_path / "full")
    load_adapter_weights(am, tmp_path / "full")  # same shapes: copied
    config = am.adapter_configs()["default"]
    config.rank_pattern = {s.name: [True, False, True, False] for s in am.adapter_sites("default")}
    am.save_adapter(tmp_path / "pruned")
    with pytest.raises(CheckpointError, match="pruned"):
        load_adapter_weights(am, tmp_path / "pruned")
    assert list(am.adapters) == ["default"] and am.active_adapters == ["default"]


# --- PEFT is the reference ---------------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft_adalora(model, **extra):
    options = {k: v for k, v in OPTIONS.items() if k != "targets"}
    # CAUSAL_LM: PeftModelForCausalLM runs AdaLoraModel.forward, which adds the orthogonality penalty
    config = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], **options, **extra)
    return peft.get_peft_model(model, config)


@pytest.mark.integration
def test_training_matches_peft_step_for_step(tmp_path):
    """Same start (PEFT's random init, loaded), same loop: the orthogonality penalty, the importance scores, the
    cubic budget and the masks must give PEFT's rank pattern and outputs."""
    model, inputs = gpt2()
    pm = _peft_adalora(copy.deepcopy(model))
    pm.save_pretrained(tmp_path / "init")
    am = adaptc.load_adapter(copy.deepcopy(model), tmp_path / "init", example_inputs=inputs)
    hooks = method_hooks(am, OPTIONS["total_step"])
    assert len(hooks) == 1
    labels = inputs["input_ids"]
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    opt_a = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    am.train()
    for step in range(OPTIONS["total_step"]):
        pm(**inputs, labels=labels).loss.backward()  # PEFT adds the penalty inside forward
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        loss = hooks_loss(hooks, am(**inputs, labels=labels).loss)
        loss.backward()
        opt_a.step()
        hooks[0].after_step(step)
        opt_a.zero_grad()
    stated = pm.peft_config["default"].rank_pattern  # keys "<module>.lora_E.default"
    peft_pattern = {k.removesuffix(".lora_E.default"): v for k, v in stated.items()}
    assert am.adapter_configs()["default"].rank_pattern == peft_pattern
    pm.eval()
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(am(**inputs).logits, pm(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_pruned_checkpoints_load_both_ways(tmp_path):
    model, inputs = gpt2()
    pm = _peft_adalora(copy.deepcopy(model))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    for step in range(OPTIONS["total_step"]):
        pm(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    with torch.no_grad():
        reference = pm(**inputs).logits
        assert (reference - model.eval()(**inputs).logits).abs().max() > 1e-3
    am = adaptc.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_inputs=inputs).eval()
    ranks = {layer.r for layer in am.adapters["default"].values()}
    assert ranks != {OPTIONS["init_r"]}  # the pruned ranks, not init_r
    with torch.no_grad():
        torch.testing.assert_close(am(**inputs).logits, reference, atol=1e-5, rtol=1e-5)
    am.save_adapter(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_conv_checkpoints_load_both_ways(tmp_path):
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 3, 8, 8)
    am = adaptc.inject(copy.deepcopy(model), "adalora", example_inputs=(x,), targets=["conv", "head"], init_r=3,
                       target_r=2, total_step=10).eval()
    _randomize(am)
    with torch.no_grad():
        ours = am(x)
    am.save_adapter(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(am.merge()(x), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_onnx_export_parity(tmp_path):
    # A small conv + linear model: GPT-2 and the other architectures are the conformance matrix's cells.
    torch.manual_seed(0)
    am = adaptc.inject(ConvNet().eval(), "adalora", example_inputs=(torch.randn(2, 3, 8, 8),), targets=["conv", "head"],
                       init_r=3, target_r=2, total_step=10).eval()
    _randomize(am)
    report = adaptc.export_onnx(am, tmp_path / "model.onnx")
    assert max(report.parity.values()) < 1e-4


@pytest.mark.integration
def test_hf_trainer_runs_the_allocator(tmp_path):
    from transformers import TrainingArguments

    from adaptc.hf import AdapterTrainer

    model, inputs = gpt2()
    am = adaptc.inject(model, "adalora", example_inputs=inputs, **OPTIONS)
    rows = [{"input_ids": row, "labels": row} for row in inputs["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    AdapterTrainer(model=am, args=args, train_dataset=rows).train()
    pattern = am.adapter_configs()["default"].rank_pattern
    assert pattern is not None and sum(sum(kept) for kept in pattern.values()) == OPTIONS["target_r"] * 4
