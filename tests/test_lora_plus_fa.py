"""LoRA+ (B's learning rate ratio x lr) and LoRA-FA (A frozen: fewer saved activations) in adaptc.train,
the CLI and the HF Trainer; their options are validated before training starts."""

from __future__ import annotations

import pytest
import torch
from model_zoo import tiny_llama

import adaptc
from adaptc.errors import ConfigError
from adaptc.train import TrainConfig, freeze_lora_a, parameter_groups

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def llama():
    model = tiny_llama(max_position_embeddings=32, seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "use_cache": False}


def batches(inputs):
    return [{**inputs, "labels": inputs["input_ids"]}]


def lora(**options):
    model, inputs = llama()
    return adaptc.inject(model, "lora", example_inputs=inputs, r=4, targets="all-linear", **options), inputs


@pytest.mark.parametrize("options, message", [
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
    ({"loraplus_lr_ratio": -2.0}, "loraplus_lr_ratio"),
    ({"loraplus_lr_ratio": float("nan")}, "loraplus_lr_ratio"),
    ({"loraplus_lr_ratio": 4, "loraplus_lr_embedding": 0}, "loraplus_lr_embedding"),
    ({"lora_fa": "yes"}, "lora_fa"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(steps=1, **options).validate()


def test_options_need_lora_adapters():
    model, inputs = llama()
    am = adaptc.inject(model, "oft", example_inputs=inputs, oft_block_size=8)
    before = [p.clone() for p in am.adapters.parameters()]
    with pytest.raises(ConfigError, match="not LoRA adapters"):
        adaptc.train(am, batches(inputs), steps=1, lora_fa=True, progress=False)
    with pytest.raises(ConfigError, match="LoRA's B"):
        adaptc.train(am, batches(inputs), steps=1, loraplus_lr_ratio=16, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, am.adapters.parameters()))  # nothing trained
    assert all(p.requires_grad for p in am.adapters.parameters())


def test_loraplus_groups_and_step_sizes():
    am, inputs = lora()
    params = [p for p in am.parameters() if p.requires_grad]
    groups = parameter_groups(am, params, 1e-3, 0.0, loraplus_lr_ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    layers = list(am.adapters["default"].values())
    assert {id(p) for p in groups[1]["params"]} == {id(layer.lora_B) for layer in layers}
    assert {id(p) for p in groups[0]["params"]} == {id(layer.lora_A) for layer in layers}
    # One AdamW step from B = 0 moves every B entry with a gradient by lr x ratio (Adam's first step is
    # lr x sign(grad)); A gets no gradient while B = 0 and stays.
    b_before = [layer.lora_B.detach().clone() for layer in layers]
    adaptc.train(am, batches(inputs), steps=1, lr=1e-3, warmup=0, max_grad_norm=None, loraplus_lr_ratio=16,
                 progress=False)
    moved = torch.cat([(layer.lora_B - b).abs().flatten() for layer, b in zip(layers, b_before)])
    torch.testing.assert_close(moved.max(), torch.tensor(16e-3), rtol=1e-3, atol=0)


def _saved_bytes(am, inputs) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one training forward."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    am.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = am(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return sum(storages.values())


def test_lora_fa_freezes_a_and_saves_fewer_activations():
    am, inputs = lora()
    plain = _saved_bytes(am, inputs)
    layers = list(am.adapters["default"].values())
    a_before = [layer.lora_A.detach().clone() for layer in layers]
    b_before = [layer.lora_B.detach().clone() for layer in layers]
    params = freeze_lora_a(am)
    try:
        fa = _saved_bytes(am, inputs)
    finally:
        for p in params:
            p.requires_grad_(True)
    assert fa < plain, (fa, plain)
    # The inputs of the 7 projections per layer's A (q/k/v share one, gate/up share one): at least one
    # [2, 16, 32] float input per block is no longer kept.
    assert plain - fa >= 2 * 16 * 32 * 4 * 2
    adaptc.train(am, batches(inputs), steps=2, lr=1e-2, lora_fa=True, progress=False)
    assert all(torch.equal(layer.lora_A, a) for layer, a in zip(layers, a_before))
    assert any(not torch.equal(layer.lora_B, b) for layer, b in zip(layers, b_before))
    assert all(layer.lora_A.requires_grad for layer in layers)  # frozen for the run only


def test_cli_takes_the_options(tmp_path, capsys):
    from model_zoo import EXAMPLES

    from adaptc.cli import main

    model_file = str(EXAMPLES / "tiny_classifier.py")
    out = str(tmp_path / "a")
    assert main(["inject", model_file, "--method", "lora", "--r", "2", "--targets", ".*", "-o", out]) == 0
    rc = main(["train", model_file, "--adapter", out, "--steps", "1", "--no-progress", "--loraplus-lr-ratio", "0"])
    assert rc != 0 and "loraplus_lr_ratio" in capsys.readouterr().err
    assert main(["train", model_file, "--adapter", out, "--steps", "2", "--no-progress", "--loraplus-lr-ratio", "8",
                 "--lora-fa"]) == 0


@pytest.mark.integration
def test_hf_trainer_takes_the_options(tmp_path):
    from transformers import TrainingArguments

    from adaptc.hf import AdapterTrainer

    am, inputs = lora()
    rows = [{"input_ids": row, "labels": row} for row in inputs["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        AdapterTrainer(model=am, args=args, train_dataset=rows, loraplus_lr_ratio=-1)
    layers = list(am.adapters["default"].values())
    a_before = [layer.lora_A.detach().clone() for layer in layers]
    trainer = AdapterTrainer(model=am, args=args, train_dataset=rows, loraplus_lr_ratio=16, lora_fa=True)
    trainer.train()
    assert sorted(g["initial_lr"] if "initial_lr" in g else g["lr"] for g in trainer.optimizer.param_groups) == [16e-3]
    assert all(torch.equal(layer.lora_A, a) for layer, a in zip(layers, a_before))
