"""Bad input on every public entry point: a clear adaptc error naming the problem, and nothing changed.

Each case calls one entry point (inject, load_adapter, merge, export_onnx, train, save_adapter, the
CLI) with one bad argument, and checks three things: the error is an ``adaptc.AdaptcError`` of the
expected class (the CLI: exit status != 0 and one line ``adaptc: error: ...``), its message names
the problem (a regex), and afterwards every tensor of the model and every byte under the working
folder is what it was before. Cases already covered elsewhere (tests/test_errors.py,
test_checkpoint.py, test_cli*.py) are not repeated here unless the before/after check is new.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors.torch
import torch
from robust_helpers import TINY, M, assert_model_unchanged, model_snapshot, tree_snapshot
from torch import nn

import adaptc
from adaptc.cli import main

X = M.example_inputs()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """One adapted model and its saved adapter, shared: no case may change them (that is checked)."""
    root = tmp_path_factory.mktemp("robust")
    torch.manual_seed(0)
    am = adaptc.inject(M.build_model(), "lora", example_inputs=X, r=2, targets=".*")
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.add_(0.05)
    am.save_adapter(root / "adapter")
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))  # another model's adapter
    adaptc.inject(other, "lora", example_inputs=(torch.zeros(2, 16),), r=2, targets=".*").save_adapter(root / "other")
    (root / "existing.onnx").write_bytes(b"an earlier export, to be kept")
    (root / "a_file").write_text("not a folder")
    raises = root / "raises.py"
    raises.write_text("import torch\n\ndef build_model():\n    return torch.nn.Linear(16, 4)\n\n"
                      "def example_inputs():\n    raise RuntimeError('dataset not mounted')\n")
    return SimpleNamespace(root=root, am=am, adapter=root / "adapter", other=root / "other", raises=raises,
                           spoiled=spoil_all(root, root / "adapter"))


def spoil_all(root: Path, adapter: Path) -> dict[str, Path]:
    """Spoiled copies of the saved adapter, made up front (so they are part of every 'before' snapshot)."""
    spoils = {
        "truncated": _truncate,
        "header": _corrupt_header,
        "empty": lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
        "list": lambda f: (f / "adapter_config.json").write_text("[]"),
        "rank": _edit_config(lambda d: d.update(r="eight")),
        "mts": _edit_config(lambda d: d.update(modules_to_save=["head"])),
        "poly": _edit_config(lambda d: d.update(peft_type="POLY")),  # a PEFT method adaptc does not have
        "unknown-field": _edit_config(lambda d: d.update(lora_frobnication=3)),
        "nan": _nan_weights,
    }
    out = {}
    for name, spoil in spoils.items():
        out[name] = root / f"spoiled-{name}"
        shutil.copytree(adapter, out[name])
        spoil(out[name])
    return out


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        edit(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        # adaptc keeps a copy of the config inside the weights file; without it the file's config is used
        tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
        safetensors.torch.save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return spoil


def _truncate(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _corrupt_header(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[9] = ord("#")  # inside the JSON header
    path.write_bytes(bytes(raw))


def _nan_weights(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


@dataclass
class Case:
    id: str
    call: Callable[[Any], Any]
    error: type
    match: str


def _inject(**kwargs: Any) -> Callable[[Any], Any]:
    def run(ctx):
        model = M.build_model()
        before = model_snapshot(model)
        try:
            adaptc.inject(model, **{"method": "lora", "example_inputs": X, **kwargs})
        finally:
            assert_model_unchanged(model, before)  # a user's model is left as it was
    return run


def _load(folder: Any, **kwargs: Any) -> Callable[[Any], Any]:
    def run(ctx):
        where = folder(ctx) if callable(folder) else folder
        model = M.build_model()
        before = model_snapshot(model)
        try:
            adaptc.load_adapter(model, where, **{"example_inputs": X, **kwargs})
        finally:
            assert_model_unchanged(model, before)
    return run


CASES = [
    # inject: types, empty and absurd values, invalid regexes, bad example inputs
    Case("inject-model-not-a-module", lambda c: adaptc.inject("gpt2", "lora", example_inputs=X), adaptc.InputError,
         "model must be a torch.nn.Module, got str"),
    Case("inject-method-type", _inject(method=3.5), adaptc.ConfigError, "method must be a method name"),
    Case("inject-method-empty", _inject(method=""), adaptc.ConfigError, "unknown method ''"),
    Case("inject-rank-absurd", _inject(r=10**9), adaptc.ConfigError, r"r=1000000000 is larger than fc1 allows"),
    Case("inject-rank-float", _inject(r=2.5), adaptc.ConfigError, "r must be a positive integer"),
    Case("inject-alpha-inf", _inject(alpha=float("inf")), adaptc.ConfigError, "alpha must be a positive number, got inf"),
    Case("inject-alpha-pattern-nan", _inject(alpha_pattern={"fc1": float("nan")}), adaptc.ConfigError,
         r"alpha_pattern\['fc1'\] must be a positive number, got nan"),
    Case("inject-dropout-absurd", _inject(dropout=7), adaptc.ConfigError, r"dropout must be in \[0, 1\)"),
    Case("inject-targets-bad-regex", _inject(targets="fc(1"), adaptc.ConfigError,
         "targets='fc\\(1' is not a valid regular expression"),
    Case("inject-exclude-bad-regex", _inject(exclude="[fc"), adaptc.ConfigError, "exclude='\\[fc' is not a valid regular"),
    Case("inject-rank-pattern-bad-regex", _inject(rank_pattern={"fc(": 2}), adaptc.ConfigError,
         "rank_pattern key 'fc\\(' is not a valid regular expression"),
    Case("inject-targets-empty", _inject(targets=""), adaptc.ConfigError, "targets is an empty string"),
    Case("inject-targets-empty-list", _inject(targets=[]), adaptc.ConfigError, "targets is an empty list"),
    Case("inject-targets-none-match", _inject(targets="attn.*"), adaptc.TargetError, "matched no site"),
    Case("inject-layers-type", _inject(layers="first"), adaptc.ConfigError, "layers must be a layer index"),
    Case("inject-unknown-option", _inject(rank=4), adaptc.ConfigError, "unknown LoRA option 'rank'"),
    Case("inject-adapter-name", _inject(adapter_name="my.adapter"), adaptc.ConfigError, "adapter name must be an identifier"),
    Case("inject-prompt-tokens-absurd", _inject(method="prompt", num_virtual_tokens=-3), adaptc.ConfigError,
         "num_virtual_tokens must be a positive integer"),
    Case("inject-prompt-on-mlp", _inject(method="prefix"), adaptc.TargetError, "no attention op.*method='lora'"),
    Case("inject-inputs-shape", _inject(example_inputs={"x": torch.zeros(4, 7)}), adaptc.InputError,
         r"MLP fails when called on the example inputs \(x=Tensor\(4, 7\):float32\)"),
    Case("inject-inputs-dtype", _inject(example_inputs={"x": torch.zeros(4, 16, dtype=torch.int64)}), adaptc.InputError,
         r"x=Tensor\(4, 16\):int64"),
    Case("inject-inputs-name", _inject(example_inputs={"pixels": torch.zeros(4, 16)}), adaptc.InputError,
         "unexpected keyword argument 'pixels'"),
    Case("inject-inputs-none", _inject(example_inputs=None), adaptc.InputError, "example_inputs is missing"),
    Case("inject-inputs-no-tensor", _inject(example_inputs={"x": [1.0, 2.0]}), adaptc.InputError, "contains no tensor"),
    Case("inject-quantize", _inject(quantize="int3"), adaptc.ConfigError, "quantize must be one of nf4, int8"),
    # load_adapter: paths, another model's adapter, truncated / corrupted files, odd configs
    Case("load-path-type", _load(42), adaptc.InputError, "directory must be a path"),
    Case("load-missing", _load(lambda c: c.root / "nowhere"), adaptc.CheckpointError, "nowhere is not a folder"),
    Case("load-a-file", _load(lambda c: c.root / "a_file"), adaptc.CheckpointError, "a_file is not a folder"),
    Case("load-other-model", _load(lambda c: c.other), adaptc.CheckpointError, "is the adapter for another model"),
    Case("load-truncated", _load(lambda c: c.spoiled["truncated"]), adaptc.CheckpointError,
         "is not a complete safetensors file"),
    Case("load-corrupt-header", _load(lambda c: c.spoiled["header"]), adaptc.CheckpointError,
         "is not a complete safetensors file"),
    Case("load-empty-weights", _load(lambda c: c.spoiled["empty"]), adaptc.CheckpointError,
         "is not a complete safetensors file"),
    Case("load-config-not-object", _load(lambda c: c.spoiled["list"]), adaptc.CheckpointError, "must hold a JSON object"),
    Case("load-config-bad-rank", _load(lambda c: c.spoiled["rank"]), adaptc.CheckpointError,
         "r must be a positive number, got 'eight'"),
    Case("load-config-unsupported-field", _load(lambda c: c.spoiled["mts"]), adaptc.CheckpointError, "modules_to_save"),
    Case("load-config-other-peft-type", _load(lambda c: c.spoiled["poly"]), adaptc.CheckpointError, "peft_type is 'POLY'"),
    Case("load-inputs-shape", _load(lambda c: c.adapter, example_inputs={"x": torch.zeros(2, 3)}), adaptc.InputError,
         r"x=Tensor\(2, 3\)"),
    Case("load-into-adapted", lambda c: adaptc.load_adapter(c.am, c.adapter, example_inputs=X), adaptc.InputError,
         "already an AdaptedModel"),
    # save_adapter
    Case("save-path-type", lambda c: c.am.save_adapter(3), adaptc.InputError, "directory must be a folder path"),
    Case("save-onto-a-file", lambda c: c.am.save_adapter(c.root / "a_file"), adaptc.CheckpointError, "not a folder"),
    Case("save-unknown-adapter", lambda c: c.am.save_adapter(c.root / "new", "nope"), adaptc.CheckpointError,
         "unknown adapter"),
    # merge
    Case("merge-flag-type", lambda c: c.am.merge(safe="yes"), adaptc.MergeError, "safe must be True or False"),
    # export_onnx
    Case("export-not-adapted", lambda c: adaptc.export_onnx(M.build_model(), c.root / "m.onnx"), adaptc.InputError,
         "export_onnx takes an AdaptedModel"),
    Case("export-path-type", lambda c: adaptc.export_onnx(c.am, 7), adaptc.InputError, "path must be a file path"),
    Case("export-suffix", lambda c: adaptc.export_onnx(c.am, c.root / "model.pt"), adaptc.ExportError,
         "path must end in .onnx"),
    Case("export-no-folder", lambda c: adaptc.export_onnx(c.am, c.root / "no" / "m.onnx"), adaptc.ExportError,
         "does not exist"),
    Case("export-opset", lambda c: adaptc.export_onnx(c.am, c.root / "existing.onnx", opset=7), adaptc.ExportError,
         "opset must be an integer from 18"),
    Case("export-atol", lambda c: adaptc.export_onnx(c.am, c.root / "existing.onnx", atol="tight"), adaptc.ExportError,
         "atol must be a positive number"),
    Case("export-merge-flag", lambda c: adaptc.export_onnx(c.am, c.root / "existing.onnx", merge="no"),
         adaptc.ExportError, "merge must be True or False"),
    Case("export-latency-runs", lambda c: adaptc.export_onnx(c.am, c.root / "existing.onnx", latency_runs=0),
         adaptc.ExportError, "latency_runs must be a positive integer"),
    Case("export-inputs-shape", lambda c: adaptc.export_onnx(c.am, c.root / "existing.onnx",
                                                             example_inputs={"x": torch.zeros(2, 5)}),
         adaptc.InputError, r"x=Tensor\(2, 5\)"),
    # train
    Case("train-batches-type", lambda c: adaptc.train(c.am, 42, loss=M.loss, steps=1, progress=False),
         adaptc.InputError, "batches must be a list of input dicts"),
    Case("train-batches-empty", lambda c: adaptc.train(c.am, [], loss=M.loss, steps=1, progress=False),
         adaptc.InputError, "no batch"),
    Case("train-batch-shape", lambda c: adaptc.train(
        c.am, [{"x": torch.zeros(4, 5), "label": torch.zeros(4, dtype=torch.long)}], loss=M.loss, steps=1,
        progress=False, output_dir=c.root / "run"), adaptc.InputError, r"x=Tensor\(4, 5\)"),
    Case("train-loss-type", lambda c: adaptc.train(c.am, M.train_batches(), loss="mse", steps=1, progress=False),
         adaptc.InputError, "loss must be a function"),
    Case("train-loss-value", lambda c: adaptc.train(c.am, M.train_batches(), loss=lambda o, b: o, steps=1,
                                                    progress=False, output_dir=c.root / "run"),
         adaptc.InputError, "the loss must be a scalar tensor"),
    Case("train-metric-value", lambda c: adaptc.train(
        c.am, M.train_batches(), loss=M.loss, steps=1, eval_batches=M.eval_batches(), metric=lambda o, b: "good",
        progress=False, output_dir=c.root / "run"), adaptc.InputError, "metric.* must return a number"),
    Case("train-config-type", lambda c: adaptc.train(c.am, M.train_batches(), config={"steps": 1}), adaptc.ConfigError,
         "config must be an adaptc.TrainConfig"),
    Case("train-unknown-option", lambda c: adaptc.train(c.am, M.train_batches(), loss=M.loss, steps=1, learning_rate=1),
         adaptc.ConfigError, r"unknown training option\(s\) \['learning_rate'\]"),
    Case("train-lr-nan", lambda c: adaptc.train(c.am, M.train_batches(), loss=M.loss, steps=1, lr=float("nan")),
         adaptc.ConfigError, "lr must be a positive number"),
    Case("train-output-type", lambda c: adaptc.train(c.am, M.train_batches(), loss=M.loss, steps=1, output_dir=3),
         adaptc.InputError, "output_dir must be a folder path"),
    Case("train-output-file", lambda c: adaptc.train(c.am, M.train_batches(), loss=M.loss, steps=1,
                                                     output_dir=c.root / "a_file", progress=False),
         adaptc.InputError, "is a file; pass a folder"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(case: Case, ctx):
    before_model = model_snapshot(ctx.am)
    before_files = tree_snapshot(ctx.root)
    with pytest.raises(case.error, match=case.match):
        case.call(ctx)
    assert_model_unchanged(ctx.am, before_model)
    assert tree_snapshot(ctx.root) == before_files, "files changed on disk"


# --- the command line --------------------------------------------------------------------------

CLI = [
    ("inject-bad-regex", ["inject", "{tiny}", "--targets", "fc(1"], "is not a valid regular expression"),
    ("inject-bad-rank", ["inject", "{tiny}", "--r", "-2"], "r must be a positive integer"),
    ("inject-prompt-on-mlp", ["inject", "{tiny}", "--method", "prompt"], "no attention op"),
    ("inject-model-raises", ["inject", "{raises}"], "example_inputs() in {raises} raised RuntimeError (line 7): "
                                                    "dataset not mounted"),
    ("export-other-model", ["export", "{tiny}", "--adapter", "{other}", "-o", "{root}/m.onnx"],
     "is the adapter for another model"),
    ("export-truncated", ["export", "{tiny}", "--adapter", "{truncated}", "-o", "{root}/m.onnx"],
     "is not a complete safetensors file"),
    ("export-no-folder", ["export", "{tiny}", "-o", "{root}/no/m.onnx"], "does not exist"),
    ("export-opset", ["export", "{tiny}", "-o", "{root}/m.onnx", "--opset", "3"], "opset must be an integer from 18"),
    ("train-other-model", ["train", "{tiny}", "--adapter", "{other}", "--steps", "1"], "is the adapter for another model"),
    ("train-lr", ["train", "{tiny}", "--adapter", "{adapter}", "--steps", "1", "--lr", "0"], "lr must be a positive"),
]


@pytest.mark.parametrize("args,expected", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_bad_input_is_one_line_and_changes_nothing(capsys, ctx, args, expected):
    names = {"tiny": str(TINY), "raises": str(ctx.raises), "other": str(ctx.other), "adapter": str(ctx.adapter),
             "root": str(ctx.root), "truncated": str(ctx.spoiled["truncated"])}
    before = tree_snapshot(ctx.root)
    rc = main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptc: error: "), err
    assert expected.format(**names) in err, err
    assert tree_snapshot(ctx.root) == before, "files changed on disk"


def test_nan_adapter_file_loads_but_safe_merge_refuses(ctx):
    """A checkpoint holding NaN is a valid file (PEFT writes such files too); merge(safe=True) refuses it and
    leaves the model's weights as they were."""
    folder = ctx.spoiled["nan"]
    model = M.build_model()
    am = adaptc.load_adapter(model, folder, example_inputs=X)
    before = model_snapshot(model)
    with pytest.raises(adaptc.MergeError, match="NaN"):
        am.merge(safe=True)
    assert_model_unchanged(model, before)


def test_unknown_config_field_is_named_in_a_warning(ctx):
    """PEFT ignores fields it does not know (a newer PEFT's) with a warning; adaptc does the same, naming the
    field, rather than refusing adapters saved by a newer PEFT. Fields that change outputs are refused (above)."""
    model = M.build_model()
    with pytest.warns(UserWarning, match="unknown field.*'lora_frobnication'"):
        am = adaptc.load_adapter(model, ctx.spoiled["unknown-field"], example_inputs=X)
    with torch.no_grad():
        torch.testing.assert_close(am(**X), ctx.am(**X), atol=0, rtol=0)
