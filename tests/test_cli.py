"""The `adaptc` command line: inspect / inject on a real model file, and its one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from model_zoo import load_example
from transformers.pytorch_utils import Conv1D

from adaptc.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny_gpt2.py")
SUMMARY = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)")


def _tiny_model():
    """The example's model, loaded the plain Python way (not through the CLI under test)."""
    return load_example("tiny_gpt2", "tiny_gpt2_for_test").build_model()


def _table_rows(out: str) -> dict[str, str]:
    """First column -> whole line, for the rows under the table's dashed rule."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"}) + 1
    rows = {}
    for line in lines[start:]:
        if line.startswith(("total:", "trainable params:")):
            break
        rows[line.split()[0]] = line
    return rows


def _expected_lora(model, names: set[str], r: int) -> tuple[int, int]:
    """(trainable, all) counted by hand: r*(in+out) per adapted Conv1D ([in, out] weights), plus the base."""
    modules = dict(model.named_modules())
    trainable = sum(r * (modules[n].weight.shape[0] + modules[n].weight.shape[1]) for n in names)
    base = sum(p.numel() for p in model.parameters())
    return trainable, base + trainable


def _assert_summary(out: str, trainable: int, total: int) -> None:
    found = SUMMARY.search(out)
    assert found, out
    assert int(found.group(1).replace(",", "")) == trainable
    assert int(found.group(2).replace(",", "")) == total
    assert found.group(3) == f"{100 * trainable / total:.4f}"


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("adaptc: error: "), err
    assert "Traceback" not in err


# --- inspect / inject -------------------------------------------------------------------------

def test_inspect_lists_every_site_of_the_tiny_gpt2(capsys):
    model = _tiny_model()
    conv1d = {name for name, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d) == 8  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)

    assert main(["inspect", TINY]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert set(rows) == conv1d | {"transformer.wte", "transformer.wpe", "lm_head"}
    assert "head" in rows["lm_head"].split()
    assert not any("head" in rows[n].split() for n in conv1d)
    # rank-8 column: r*(in+out) for c_attn's [64, 192] weight, and the layer index.
    c_attn = rows["transformer.h.1.attn.c_attn"].split()
    assert c_attn[1:5] == ["linear", "aten.addmm", "64x192", "64->192"]
    assert c_attn[5] == "1" and c_attn[-1] == f"{8 * (64 + 192):,}"
    assert re.search(r"^total: 11 sites", out, re.M)


def test_inject_reports_matched_sites_and_trainable_share(capsys):
    model = _tiny_model()
    conv1d = {name for name, m in model.named_modules() if isinstance(m, Conv1D)}

    assert main(["inject", TINY, "--method", "lora"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert set(rows) == conv1d  # all-linear: every projection, not the tied output head
    for name in conv1d:
        w = dict(model.named_modules())[name].weight
        assert rows[name].split()[-1] == f"{8 * (w.shape[0] + w.shape[1]):,}"
    _assert_summary(out, *_expected_lora(model, conv1d, r=8))


def test_inject_options_reach_the_config(capsys):
    model = _tiny_model()
    args = ["inject", TINY, "--r", "4", "--alpha", "16", "--target", "c_attn", "c_fc", "--exclude", "h.0.mlp.c_fc",
            "--layers", "0", "--init", "gaussian"]
    assert main(args) == 0
    out = capsys.readouterr().out
    chosen = {"transformer.h.0.attn.c_attn"}
    assert set(_table_rows(out)) == chosen
    assert "r=4 alpha=16" in out and "init=gaussian" in out
    _assert_summary(out, *_expected_lora(model, chosen, r=4))


def test_help_has_an_example(capsys):
    for command in ("inspect", "inject"):
        assert main([command, "--help"]) == 0
        assert f"adaptc {command} examples/tiny_gpt2.py" in capsys.readouterr().out


# --- errors -----------------------------------------------------------------------------------

@pytest.fixture
def bad_files(tmp_path):
    raises_at_import = tmp_path / "import_fails.py"
    raises_at_import.write_text("import torch\nRATIO = 1 / 0\n")
    raises_in_build = tmp_path / "build_fails.py"
    raises_in_build.write_text(
        "def build_model():\n    raise ValueError('checkpoint missing')\n\n"
        "def example_inputs():\n    return {}\n"
    )
    no_build = tmp_path / "no_build.py"
    no_build.write_text("x = 1\n")
    return {"import": str(raises_at_import), "build": str(raises_in_build), "none": str(no_build)}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["inspect", "{missing}"], "not found"),
        (["inspect", "{import}"], "import_fails.py raised ZeroDivisionError (line 2)"),
        (["inject", "{build}"], "build_model() in {build} raised ValueError (line 2): checkpoint missing"),
        (["inject", "{none}"], "defines no build_model()"),
        (["inject", TINY, "--method", "adapterfusion"], "unknown method 'adapterfusion'"),
        (["inject", TINY, "--targets", "nothing_.*"], "matched no site"),
        (["inject", TINY, "--r", "0"], "r must be a positive integer"),
        (["inject", TINY, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
    ids=["missing-file", "raises-at-import", "raises-in-build", "no-build-model", "unknown-method",
         "targets-match-nothing", "bad-rank", "bad-flag"],
)
def test_errors_are_one_line(capsys, tmp_path, bad_files, args, expected):
    names = {**bad_files, "missing": str(tmp_path / "missing.py")}
    rc = main([a.format(**names) for a in args])
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err)
    assert expected.format(**names) in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(capsys, bad_files, where):
    args = ["inject", bad_files["build"]]
    rc = main(["--debug", *args] if where == "before" else [*args, "--debug"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback (most recent call last)" in err
    assert "raise ValueError('checkpoint missing')" in err  # the model file's own line


@pytest.mark.integration
def test_module_entry_point_in_a_real_process():
    # A separate process sees everything written to stderr, loggers and warnings included.
    proc = subprocess.run(
        [sys.executable, "-m", "adaptc.cli", "inject", TINY, "--method", "lora", "--targets", "nothing_.*"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    _assert_one_line_error(proc.returncode, proc.stderr)
    assert proc.returncode == 2
    assert "matched no site" in proc.stderr and "transformer.h.0.attn.c_attn" in proc.stderr


# --- export -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_export_writes_a_parity_checked_model(capsys, tmp_path):
    import numpy as np
    import onnxruntime as ort
    import torch

    out = tmp_path / "tiny.onnx"
    assert main(["export", TINY, "-o", str(out), "--r", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "parity" in printed and "ONNX Runtime" in printed
    # Independent check: the file against the example's own model (a fresh adapter has B = 0: the base model).
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 9))
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(input_ids=ids, use_cache=False).logits.numpy(), atol=1e-4, rtol=0)


def test_export_errors_are_one_line(capsys, tmp_path):
    rc = main(["export", TINY, "-o", str(tmp_path / "missing" / "m.onnx")])
    _assert_one_line_error(rc, capsys.readouterr().err)
    rc = main(["export", TINY, "-o", str(tmp_path / "m.onnx"), "--no-merge", "--quantize", "int8"])
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err)
    assert "merged export" in err
    assert list(tmp_path.iterdir()) == []


def test_inject_output_saves_an_adapter_that_loads(capsys, tmp_path):

    import torch
    from safetensors.torch import load_file

    import adaptc

    out_dir = tmp_path / "adapter"
    assert main(["inject", TINY, "--r", "4", "--target", "c_attn", "--init", "gaussian", "-o", str(out_dir)]) == 0
    assert f"adapter saved to {out_dir}" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(out_dir / "adapter_model.safetensors")

    module = load_example("tiny_gpt2", "tiny_gpt2_for_output_test")
    model = module.build_model()
    am = adaptc.load_adapter(model, out_dir, example_inputs=module.example_inputs())
    c_attn = {name for name, m in model.named_modules() if name.endswith("c_attn")}
    assert {s.name for s in am.sites} == c_attn
    for name in c_attn:  # gaussian init: A is random, so equality shows the saved tensors were loaded
        layer = am.adapters["default"][name.replace(".", "__")]
        assert layer.r == 4
        torch.testing.assert_close(layer.lora_A.detach(), saved[f"base_model.model.{name}.lora_A.weight"])
        torch.testing.assert_close(layer.lora_B.detach(), saved[f"base_model.model.{name}.lora_B.weight"])


@pytest.mark.integration  # by time (make test-unit under 2 minutes): three prompt methods end to end
def test_prompt_methods_from_the_command_line(capsys, tmp_path):
    assert main(["inspect", TINY, "--method", "prefix"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn" in out and "transformer.h.1.attn" in out
    assert main(["inject", TINY, "--method", "prompt", "--opt", "num_virtual_tokens=8", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "transformer.wte" in out and "trainable params: 512 " in out  # 8 tokens x hidden 64
    import torch

    import adaptc

    am = adaptc.load_adapter(_tiny_model(), tmp_path, example_inputs={"input_ids": torch.randint(0, 128, (2, 16))})
    assert am.adapter_config.method == "prompt" and am.adapter_config.num_virtual_tokens == 8
