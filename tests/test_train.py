"""adaptc.train: the loss falls, checkpoints load, resume reproduces an uninterrupted run, NaN stops cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_zoo import load_example

import adaptc
from adaptc.errors import ConfigError, InputError, TrainingError
from adaptc.train import TrainConfig, evaluate, train

ROOT = Path(__file__).resolve().parents[1]


M = load_example("tiny_classifier", "tiny_classifier_for_train")


@pytest.fixture
def fresh_adapter(tmp_path):
    """A fresh LoRA adapter saved once, so that several runs start from the very same tensors."""
    am = adaptc.inject(M.build_model(), "lora", example_inputs=M.example_inputs(), r=4, targets=".*")
    am.save_adapter(tmp_path / "init")
    return tmp_path / "init"


def _load(folder):
    return adaptc.load_adapter(M.build_model(), folder, example_inputs=M.example_inputs())


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_training_lowers_the_loss_and_writes_loadable_checkpoints(fresh_adapter, tmp_path):
    am = _load(fresh_adapter)
    base = {k: v.clone() for k, v in am.base_model.state_dict().items()}
    out = tmp_path / "run"
    result = train(am, M.train_batches, loss=M.loss, eval_batches=M.eval_batches(), metric=M.metric,
                   steps=16, lr=1e-2, eval_every=8, progress=False, output_dir=out)

    assert result.steps == 16 and len(result.evals) == 3  # step 0 (before) and every 8 steps
    before, after = result.evals[0], result.evals[-1]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["metric"] > before["metric"] + 0.3
    # The base weights did not move; only adapter parameters trained.
    assert all(torch.equal(v, base[k]) for k, v in am.base_model.state_dict().items())

    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log["steps"]] == list(range(1, 17))
    assert log["best"]["metric"] == max(e["metric"] for e in log["evals"][1:])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # last/ is the trained adapter: loaded into a fresh model it computes what the trained one does.
    reloaded = _load(out / "last")
    am.eval()
    x = M.eval_batches()[0]["x"]
    with torch.no_grad():
        assert torch.allclose(reloaded(x=x), am(x=x), atol=1e-6)
    # best/ is the checkpoint of the best evaluation: re-evaluated, it gives the logged metric.
    best = evaluate(_load(out / "best"), M.eval_batches(), loss=M.loss, metric=M.metric)
    assert best["metric"] == pytest.approx(log["best"]["metric"])


def test_schedule_is_linear_warmup_then_cosine(fresh_adapter):
    am = _load(fresh_adapter)
    result_log = []
    steps, lr, warm = 10, 0.01, 3
    result = train(am, M.train_batches, loss=M.loss, steps=steps, lr=lr, warmup=warm, progress=False)
    assert result.steps == steps
    # The lr logged after step s is the one for the next step; by hand: (s+1)/(warm+1) then half a cosine.
    from adaptc.train import lr_factor

    for s in range(steps):
        expected = (s + 1) / (warm + 1) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
        assert lr_factor(s, warm, steps) == pytest.approx(expected)
        result_log.append(expected)
    assert lr_factor(steps, warm, steps) == 0.0


def _interrupting(batches_fn, after: int):
    """train_batches that raises KeyboardInterrupt when asked for micro-batch number ``after`` (counting from 1)."""
    seen = [0]

    def batches():
        for batch in batches_fn():
            seen[0] += 1
            if seen[0] == after:
                raise KeyboardInterrupt
            yield batch

    return batches


def test_resume_after_an_interruption_gives_the_uninterrupted_result(fresh_adapter, tmp_path):
    # Dropout (RNG), accumulation over 2 micro-batches, 8 batches an epoch: 10 steps cross 2 epoch boundaries.
    options = dict(loss=M.loss, steps=10, lr=1e-2, batch_accum=2, eval_every=3, progress=False)
    full = tmp_path / "full"
    train(_load(fresh_adapter), M.train_batches, output_dir=full, **options)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        # Micro-batch 15 is the 7th of epoch 1, in the middle of step 8's accumulation; step 7 was never checkpointed.
        train(_load(fresh_adapter), _interrupting(M.train_batches, 15), output_dir=part, **options)
    state = torch.load(part / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 7 and state["position"] == [1, 6]
    result = train(_load(fresh_adapter), M.train_batches, output_dir=part, resume=True, **options)
    assert result.start_step == 7 and result.steps == 10

    expected, got = _adapter_tensors(full / "last"), _adapter_tensors(part / "last")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    full_log = json.loads((full / "train_log.json").read_text())
    part_log = json.loads((part / "train_log.json").read_text())
    assert [r["loss"] for r in part_log["steps"]] == [r["loss"] for r in full_log["steps"]]


def test_resume_refuses_other_options(fresh_adapter, tmp_path):
    train(_load(fresh_adapter), M.train_batches, loss=M.loss, steps=2, progress=False, output_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match=r"lr 0\.001 -> 0\.1"):
        train(_load(fresh_adapter), M.train_batches, loss=M.loss, steps=2, lr=0.1, progress=False,
              output_dir=tmp_path / "r", resume=True)


def test_a_nan_loss_stops_before_the_weights_change(fresh_adapter, tmp_path):
    calls = [0]

    def nan_at_5(output, batch):
        calls[0] += 1
        value = M.loss(output, batch)
        return value * float("nan") if calls[0] == 5 else value

    am = _load(fresh_adapter)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"the loss is nan at step 5 .*lower the learning rate") as info:
        train(am, M.train_batches, loss=nan_at_5, steps=10, eval_every=2, progress=False, output_dir=out)
    assert "from step 4" in str(info.value)
    assert all(torch.isfinite(p).all() for p in am.adapter_parameters())
    saved = _adapter_tensors(out / "last")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert json.loads((out / "train_log.json").read_text())["steps"][-1]["step"] == 4


def test_epochs_count_optimizer_steps_and_bf16_trains(fresh_adapter):
    am = _load(fresh_adapter)
    result = train(am, M.train_batches(), loss=M.loss, epochs=2, batch_accum=2, bf16=True, lr=1e-2, progress=False)
    assert result.steps == 8  # 2 epochs x 8 batches / 2 per step
    assert math.isfinite(result.last_loss) and result.last_loss < result.first_loss


@pytest.mark.parametrize("options, match", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": 3, "epochs": 1}, "exactly one of steps"),
    ({"steps": 3, "lr": -1}, "lr must be a positive number"),
    ({"steps": 3, "batch_accum": 0}, "batch_accum must be a positive integer"),
    ({"steps": 3, "lrate": 1}, "unknown training option"),
])
def test_bad_options_are_refused(fresh_adapter, options, match):
    with pytest.raises(ConfigError, match=match):
        train(_load(fresh_adapter), M.train_batches, loss=M.loss, progress=False, **options)


def test_output_without_loss_and_no_loss_function_is_explained(fresh_adapter):
    with pytest.raises(InputError, match=r"has no \.loss; define loss\(output, batch\)"):
        train(_load(fresh_adapter), M.train_batches, steps=1, progress=False)


def test_trainconfig_is_accepted_as_an_object(fresh_adapter):
    result = train(_load(fresh_adapter), M.train_batches, loss=M.loss, config=TrainConfig(steps=2, progress=False))
    assert result.steps == 2
