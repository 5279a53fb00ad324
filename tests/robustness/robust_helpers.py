"""Helpers shared by the robustness tests: a tiny model (the tiny_classifier example, loaded through the shared
zoo, tests/model_zoo.py), an adapter of it on disk, and before/after snapshots.

A snapshot is everything an entry point could change: every tensor of the model's state dict (and
whether it requires grad, the module tree, each module's train/eval mode), and every file under a folder, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import torch
from model_zoo import EXAMPLES, load_example
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
TINY = EXAMPLES / "tiny_classifier.py"

M = load_example("tiny_classifier", "tiny_classifier_for_robustness", register=True)


def model_snapshot(module: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "modules": [n for n, _ in module.named_modules()],
        "training": [m.training for _, m in module.named_modules()],  # train/eval mode: dropout follows it
    }


def assert_model_unchanged(module: nn.Module, before: dict) -> None:
    after = model_snapshot(module)
    assert after["modules"] == before["modules"], "the module tree changed"
    assert after["grad"] == before["grad"], "requires_grad changed"
    assert after["training"] == before["training"], "the train/eval mode changed"
    assert after["state"].keys() == before["state"].keys(), "state dict keys changed"
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}
