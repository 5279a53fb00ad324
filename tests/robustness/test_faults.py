"""Faults: a process killed while writing, and NaN during training.

- Training killed (SIGKILL, a real separate process) while it writes a checkpoint: ``resume=True``
  continues from the last complete checkpoint and ends with the very adapter an uninterrupted run
  ends with. A half-written temporary checkpoint folder left behind is ignored.
- Export killed (SIGKILL) while it works: the file at the target path is the one that was there
  before, byte for byte (or, with none before, there is none).
- A NaN gradient with a finite loss stops training with TrainingError even when gradient clipping
  is off, and nothing NaN is saved; through the CLI it is one line and a non-zero status.
(tests/test_train.py covers a NaN loss, an interrupted run resumed in-process, and resume's options;
tests/test_atomic.py a killed single-file write.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from robust_helpers import EXAMPLES, ROOT, M
from safetensors.torch import load_file

import adaptc
from adaptc.cli import main

OPTIONS = dict(steps=40, lr=1e-2, eval_every=1, batch_accum=1, seed=3)

TRAINER = f"""
import sys
sys.path.insert(0, {str(EXAMPLES)!r})
import adaptc
import tiny_classifier as M
am = adaptc.load_adapter(M.build_model(), sys.argv[1], example_inputs=M.example_inputs())
adaptc.train(am, M.train_batches, loss=M.loss, output_dir=sys.argv[2], progress=False, **{OPTIONS!r})
"""


def _temp_checkpoints(root: Path) -> list[str]:
    try:
        return [n for n in os.listdir(root) if n.startswith(".last.") and n.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _kill_during_a_checkpoint_write(script: Path, init: Path, out: Path) -> bool:
    """Run the trainer and SIGKILL it the moment a temporary checkpoint folder exists (a write in progress).
    Returns whether the kill left that write unfinished (its temporary folder still there)."""
    proc = subprocess.Popen([sys.executable, str(script), str(init), str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "last").is_dir() and _temp_checkpoints(out):  # past the first checkpoint, inside a later one
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("the trainer finished (or hung) before a checkpoint write could be interrupted")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return bool(_temp_checkpoints(out))


@pytest.mark.integration
def test_training_killed_mid_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    from adaptc.train_state import checkpoint_dir, load_state

    init = tmp_path / "init"
    adaptc.inject(M.build_model(), "lora", example_inputs=M.example_inputs(), r=4, targets=".*").save_adapter(init)
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    reference = tmp_path / "reference"  # uninterrupted
    adaptc.train(adaptc.load_adapter(M.build_model(), init, example_inputs=M.example_inputs()), M.train_batches,
                 loss=M.loss, output_dir=reference, progress=False, **OPTIONS)

    for attempt in range(5):  # the kill must land inside a write; a signal can arrive just after one
        out = tmp_path / f"killed{attempt}"
        if _kill_during_a_checkpoint_write(script, init, out):
            break
    else:
        pytest.fail("no kill landed inside a checkpoint write in 5 attempts")

    complete = checkpoint_dir(out, "last")
    assert complete is not None, sorted(os.listdir(out))
    step = load_state(complete)["step"]
    assert 1 <= step < OPTIONS["steps"]
    am = adaptc.load_adapter(M.build_model(), complete, example_inputs=M.example_inputs())  # whole, loadable
    result = adaptc.train(am, M.train_batches, loss=M.loss, output_dir=out, progress=False, resume=True, **OPTIONS)
    assert result.start_step == step and result.steps == OPTIONS["steps"]

    expected = load_file(reference / "last" / "adapter_model.safetensors")
    got = load_file(out / "last" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_partial_temporary_checkpoint_is_ignored_on_resume(tmp_path):
    """What a crash in the middle of save_checkpoint leaves: a complete last/ and a half-written temporary folder."""
    init = tmp_path / "init"
    adaptc.inject(M.build_model(), "lora", example_inputs=M.example_inputs(), r=4, targets=".*").save_adapter(init)
    out = tmp_path / "run"
    short = {**OPTIONS, "steps": 6}
    adaptc.train(adaptc.load_adapter(M.build_model(), init, example_inputs=M.example_inputs()), M.train_batches,
                 loss=M.loss, output_dir=out, progress=False, **{**short, "steps": 3, "eval_every": 3})
    partial = out / ".last.x1y2z3.tmp"
    partial.mkdir()
    whole = (out / "last" / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(whole[: len(whole) // 3])
    (partial / "trainer_state.pt").write_bytes(b"\x80\x04 truncated")

    am = adaptc.load_adapter(M.build_model(), init, example_inputs=M.example_inputs())
    with pytest.raises(adaptc.ConfigError, match="steps"):  # resuming with other options is refused first
        adaptc.train(am, M.train_batches, loss=M.loss, output_dir=out, progress=False, resume=True, **short)
    result = adaptc.train(am, M.train_batches, loss=M.loss, output_dir=out, progress=False, resume=True,
                          **{**short, "steps": 3, "eval_every": 3})
    assert result.start_step == 3 and result.steps == 3  # resumed from last/, found nothing left to do


EXPORTER = f"""
import sys
sys.path.insert(0, {str(EXAMPLES)!r})
import adaptc
import tiny_classifier as M
am = adaptc.inject(M.build_model(), "lora", example_inputs=M.example_inputs(), r=4, targets=".*")
adaptc.export_onnx(am, sys.argv[1])
"""


@pytest.mark.integration
def test_export_killed_midway_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the model exported yesterday")
    script = tmp_path / "exporter.py"
    script.write_text(EXPORTER)
    proc = subprocess.Popen([sys.executable, str(script), str(target)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            work = [p for p in tmp_path.iterdir() if p.name.startswith(".model.adaptc-")]
            if work and any(work[0].rglob("*.onnx")):  # the exporter has written an ONNX file of its own
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail("the export finished (or hung) before it could be killed midway")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the model exported yesterday"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["exporter.py", "model.onnx"]


# --- NaN ------------------------------------------------------------------------------------------

def _nan_gradient_loss(output, batch):
    """Finite loss, NaN gradient: d/dx sqrt(x) at 0 is inf, times 0 is NaN."""
    return M.loss(output, batch) + (output[:1, :1] * 0).sum().sqrt()


def test_a_nan_gradient_stops_training_even_without_clipping(tmp_path):
    am = adaptc.inject(M.build_model(), "lora", example_inputs=M.example_inputs(), r=4, targets=".*")
    before = [p.detach().clone() for p in am.adapter_parameters()]
    with pytest.raises(adaptc.TrainingError, match=r"the gradient norm is nan at step 1 .*no NaN reached the weights"):
        adaptc.train(am, M.train_batches, loss=_nan_gradient_loss, steps=4, max_grad_norm=None, progress=False,
                     output_dir=tmp_path / "run")
    assert all(torch.equal(p, b) for p, b in zip(am.adapter_parameters(), before))
    assert not (tmp_path / "run" / "last").exists()  # no checkpoint: none was complete before the NaN


NAN_MODEL = f"""
import sys
sys.path.insert(0, {str(EXAMPLES)!r})
from tiny_classifier import build_model, example_inputs, train_batches, loss as _loss

def loss(output, batch):
    value = _loss(output, batch)
    return value * float("nan") if value.item() < 1.2 else value   # goes NaN once training works
"""


def test_cli_nan_is_one_line_and_saves_no_nan(capsys, tmp_path):
    model = tmp_path / "nan_model.py"
    model.write_text(NAN_MODEL)
    out = tmp_path / "out"
    assert main(["inject", str(model), "--r", "4", "--targets", ".*", "-o", str(out)]) == 0
    capsys.readouterr()
    rc = main(["train", str(model), "--adapter", str(out), "--steps", "60", "--lr", "1e-2", "--eval-every", "1",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("adaptc: error: the loss is nan at step"), err
    last = out / "last" / "adapter_model.safetensors"
    assert last.is_file()  # steps before the NaN were checkpointed
    assert all(torch.isfinite(t).all() for t in load_file(last).values())
