"""The smallest complete model file for `adaptc train`: an MLP classifier on synthetic clusters.

    adaptc inject examples/tiny_classifier.py --method lora --r 4 -o out/
    adaptc train  examples/tiny_classifier.py --adapter out/ --steps 40 --lr 1e-2
    adaptc export examples/tiny_classifier.py --adapter out/best -o tiny.onnx

The model returns logits (no ``.loss``), so the file defines ``loss(output, batch)``; ``label`` is
not an argument of ``forward``, so the training loop leaves it in the batch for ``loss`` and
``metric``. Runs in seconds; the tests use it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FEATURES, CLASSES, BATCH = 16, 4, 32


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 64)
        self.fc2 = nn.Linear(64, 64)
        self.drop = nn.Dropout(0.1)  # so that training mode differs from eval (and resume must restore the RNG)
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.gelu(self.fc2(F.gelu(self.fc1(x))))))


def build_model() -> nn.Module:
    torch.manual_seed(0)  # the same "pretrained" weights every run
    return MLP().eval()


def example_inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(BATCH, FEATURES)}


def _data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Four Gaussian clusters around fixed centres: learnable, not trivially separable by the random head.
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(123)) * 1.5
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    return centres[labels] + torch.randn(n, FEATURES, generator=gen), labels


def train_batches() -> list[dict[str, torch.Tensor]]:
    x, y = _data(1, 8 * BATCH)
    order = torch.randperm(len(y))  # drawn from torch's RNG, which adaptc train seeds per epoch
    x, y = x[order], y[order]
    return [{"x": x[i:i + BATCH], "label": y[i:i + BATCH]} for i in range(0, len(y), BATCH)]


def eval_batches() -> list[dict[str, torch.Tensor]]:
    x, y = _data(2, 4 * BATCH)
    return [{"x": x[i:i + BATCH], "label": y[i:i + BATCH]} for i in range(0, len(y), BATCH)]


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output, batch["label"])


def metric(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Accuracy (adaptc averages it over the batches, weighted by batch size)."""
    return (output.argmax(-1) == batch["label"]).float().mean().item()
