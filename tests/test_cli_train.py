"""`adaptc train` (inject -> train in a real process -> export -> ORT), inspect --plot, --opt, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_zoo import load_example

import adaptc
from adaptc.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny_classifier.py")
ADAPTC = [sys.executable, "-m", "adaptc.cli"]


def _example():
    return load_example("tiny_classifier", "tiny_classifier_for_cli")


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc != 0
    # A progress bar that was drawn before the error is erased with carriage returns: keep what a terminal shows.
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("adaptc: error: "), err


@pytest.mark.integration
def test_inject_train_export_end_to_end(capsys, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "out"
    assert main(["inject", TINY, "--method", "lora", "--r", "4", "--targets", ".*", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 sites matched" in printed and "trainable params: 1,104" in printed

    # train in a real process, as a user runs it: the progress bar, the exit status, the files.
    proc = subprocess.run([*ADAPTC, "train", TINY, "--adapter", str(out), "--steps", "16", "--lr", "1e-2",
                           "--eval-every", "8"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "16/16" in proc.stderr and "samples_s=" in proc.stderr and "loss=" in proc.stderr  # the progress bar
    log = json.loads((out / "train_log.json").read_text())
    losses = [r["loss"] for r in log["steps"]]
    assert len(losses) == 16 and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    before, after = log["evals"][0]["metric"], log["evals"][-1]["metric"]
    assert after > before + 0.3, (before, after)
    assert f"eval metric {before:.4f} (step 0) -> {after:.4f} (step 16)" in proc.stdout
    assert (out / "loss.png").is_file() and (out / "best" / "adapter_model.safetensors").is_file()

    onnx_path = tmp_path / "tiny.onnx"
    assert main(["export", TINY, "--adapter", str(out / "best"), "-o", str(onnx_path)]) == 0
    assert "parity" in capsys.readouterr().out

    # Independent check: ONNX Runtime on the evaluation set against the trained adapter loaded in PyTorch,
    # and the accuracy the log recorded for the best checkpoint.
    m = _example()
    am = adaptc.load_adapter(m.build_model(), out / "best", example_inputs=m.example_inputs()).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = total = 0
    for batch in m.eval_batches():
        (logits,) = session.run(None, {name: batch["x"].numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, am(x=batch["x"]).numpy(), atol=1e-4, rtol=0)
        correct += int((logits.argmax(-1) == batch["label"].numpy()).sum())
        total += len(batch["label"])
    assert correct / total == pytest.approx(log["best"]["metric"])


def test_inspect_plot_draws_a_png(capsys, tmp_path):
    png = tmp_path / "sites.png"
    assert main(["inspect", TINY, "--plot", str(png)]) == 0
    assert f"plot written to {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_opt_passes_method_options_through(capsys, tmp_path):
    assert main(["inject", TINY, "--opt", "r=2", "--opt", "targets='fc1'", "--opt", "alpha=4"]) == 0
    out = capsys.readouterr().out
    assert "r=2 alpha=4" in out and "targets='fc1'" in out and "1 site matched" in out
    assert "trainable params: 160 " in out  # 2 * (16 + 64) by hand


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    # Shared by the bad-input cases, none of which writes anything (that is part of what they check).
    tmp_path = tmp_path_factory.mktemp("files")
    out = tmp_path / "out"
    assert main(["inject", TINY, "--r", "2", "-o", str(out)]) == 0
    no_batches = tmp_path / "no_batches.py"
    no_batches.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\n"
                          "from tiny_classifier import build_model, example_inputs\n")
    failing = tmp_path / "failing_batches.py"
    failing.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\n"
                       "from tiny_classifier import build_model, example_inputs, loss\n\n"
                       "def train_batches():\n    yield from []\n    raise RuntimeError('data shard missing')\n")
    no_build = tmp_path / "no_build.py"
    no_build.write_text("x = 1\n")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    return {"out": str(out), "no_batches": str(no_batches), "failing": str(failing), "no_build": str(no_build),
            "missing": str(tmp_path / "missing.py"), "empty": str(empty), "tiny": TINY}


@pytest.mark.parametrize("args, expected", [
    (["train", "{missing}", "--adapter", "{out}", "--steps", "2"], "model file '{missing}' not found"),
    (["train", "{no_build}", "--adapter", "{out}", "--steps", "2"], "defines no build_model()"),
    (["train", "{no_batches}", "--adapter", "{out}", "--steps", "2"], "defines no train_batches()"),
    (["train", "{failing}", "--adapter", "{out}", "--steps", "2"],
     "train_batches() in {failing} raised RuntimeError (line 7): data shard missing"),
    (["train", "{tiny}", "--adapter", "{empty}", "--steps", "2"], "holds no adapter_config.json; create one with `adaptc inject"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "0"], "steps must be a positive integer"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "2", "--lr", "-1"], "lr must be a positive number"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "2", "--batch-accum", "0"], "batch_accum must be a positive"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "2", "--epochs", "1"], "not allowed with argument"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "two"], "invalid int value: 'two'"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "2", "--resume"], "nothing to resume"),
    (["train", "{tiny}", "--adapter", "{out}", "--steps", "2", "--device", "nodevice"], "--device 'nodevice' is not usable"),
    (["inject", "{tiny}", "--opt", "r"], "expected KEY=VALUE"),
    (["inject", "{tiny}", "--opt", "r=0"], "r must be a positive integer"),
    (["inject", "{tiny}", "--opt", "rank=4"], "unknown LoRA option 'rank'"),
    (["inject", "{tiny}", "--r", "4", "--opt", "r=2"], "option 'r' given twice"),
    (["inspect", "{tiny}", "--plot", "sites.txt"], "should end in .png"),
], ids=["missing-file", "no-build-model", "no-train-batches", "batches-raise", "no-adapter", "zero-steps",
        "negative-lr", "zero-accum", "steps-and-epochs", "steps-not-int", "resume-nothing", "bad-device",
        "opt-format", "opt-bad-value", "opt-unknown", "opt-twice", "plot-suffix"])
def test_bad_input_is_one_line_and_nonzero(capsys, files, args, expected):
    saved = sorted(p.name for p in Path(files["out"]).iterdir())
    rc = main([a.format(**files) for a in args])
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err)
    assert expected.format(**files) in err
    assert sorted(p.name for p in Path(files["out"]).iterdir()) == saved  # nothing was written


def test_every_command_has_help_with_examples(capsys):
    assert main(["--help"]) == 0
    assert "adaptc train" in capsys.readouterr().out
    for command in ("inspect", "inject", "train", "export"):
        assert main([command, "--help"]) == 0
        assert re.search(rf"adaptc {command} +examples/", capsys.readouterr().out), command


def test_train_resumes_from_last_in_the_cli(capsys, files, tmp_path):
    # A second invocation with --resume and more... the same options continues where the first stopped:
    # here the first run finished, so the resumed one has nothing left and keeps the weights.
    out = str(tmp_path / "out")
    shutil.copytree(files["out"], out)
    assert main(["train", TINY, "--adapter", out, "--steps", "4", "--no-progress"]) == 0
    before = (Path(out) / "last" / "adapter_model.safetensors").read_bytes()
    shutil.copy(Path(out) / "train_log.json", tmp_path / "log.json")
    assert main(["train", TINY, "--adapter", out, "--steps", "4", "--no-progress", "--resume"]) == 0
    assert "trained steps 4->4" in capsys.readouterr().out
    assert (Path(out) / "last" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.integration
def test_train_nproc_2_equals_one_process_accumulating_2(tmp_path):
    """`--nproc 2`: torchrun, DDP over gloo, each rank every 2nd batch. Averaged over the two ranks,
    the gradient is one process's gradient accumulated over the same two batches, so the adapters
    must agree (an independent reference: the single-process run)."""
    from safetensors.torch import load_file

    # The tiny classifier without its dropout: the ranks' masks would differ from one process's.
    model_file = tmp_path / "no_dropout.py"
    model_file.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny_base', {TINY!r})\n"
        "base = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(base)\n"
        "example_inputs, train_batches, loss = base.example_inputs, base.train_batches, base.loss\n"
        "def build_model():\n"
        "    model = base.build_model()\n"
        "    model.drop.p = 0.0\n"
        "    return model\n"
    )
    model = str(model_file)
    for name in ("one", "two"):
        assert main(["inject", model, "--method", "lora", "--r", "4", "--targets", ".*", "-o", str(tmp_path / name)]) == 0
    common = ["--steps", "4", "--lr", "1e-2", "--no-progress", "--eval-every", "4"]
    one = subprocess.run([*ADAPTC, "train", model, "--adapter", str(tmp_path / "one"), "--batch-accum", "2", *common],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*ADAPTC, "train", model, "--adapter", str(tmp_path / "two"), "--nproc", "2", *common],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert "on 2 processes" in two.stdout and two.stdout.count("trained steps 0->4") == 1  # rank 0 reports
    a = load_file(tmp_path / "one" / "last" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 6
    initial = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for key in a:
        assert not torch.equal(b[key], initial[key]), key  # trained
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    log_one = json.loads((tmp_path / "one" / "train_log.json").read_text())
    log_two = json.loads((tmp_path / "two" / "train_log.json").read_text())
    for x, y in zip(log_one["steps"], log_two["steps"]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)  # the logged loss is the mean over ranks
