"""Vision: LoRA on a timm ViT and a timm ResNet-18, scikit-learn's handwritten digits.

No pretrained vision weights can be downloaded here, so the example makes its own "pretrained"
model the honest way: the whole network is first trained on digits 0-4 only (a few seconds; the
weights are cached in ``out/cache/`` so every command sees the same base model). LoRA then teaches
the frozen model all ten digits. The figure printed is the accuracy on held-out images of all ten
digits before (the base model has never seen 5-9) and after LoRA.

    python examples/vision_digits.py vit        # or resnet; each ends with ONNX export + ORT inference
    ADAPTC_VISION_MODEL=resnet adaptc inject examples/vision_digits.py --method lora --r 8 --targets '.*' -o out/
    ADAPTC_VISION_MODEL=resnet adaptc train  examples/vision_digits.py --adapter out/ --steps 80 --lr 5e-3

The data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images that ship inside scikit-learn),
upsampled to 16x16 for the ViT; 1,200 for training, the rest held out.
"""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "out" / "cache"
N_TRAIN, BATCH = 1200, 64
SIZES = {"vit": 16, "resnet": 8}  # ResNet-18 on the 8x8 originals: its backward is the slow part on CPU


def model_name() -> str:
    name = os.environ.get("ADAPTC_VISION_MODEL", "vit")
    if name not in SIZES:
        raise ValueError(f"ADAPTC_VISION_MODEL must be one of {', '.join(SIZES)}, got {name!r}")
    return name


def _create(name: str) -> nn.Module:
    import timm

    if name == "vit":  # a ViT-Tiny-shaped model, smaller: 4 blocks of width 96 on 4x4 patches of 4 pixels
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
                                 embed_dim=96, depth=4, num_heads=3, num_classes=10)
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return (images[order] - 0.3) / 0.4, labels[order]


def _images(x: torch.Tensor, name: str) -> torch.Tensor:
    return F.interpolate(x, size=SIZES[name], mode="bilinear", align_corners=False)


def _pretrain(name: str) -> nn.Module:
    """Full training on digits 0-4 only: the base model LoRA starts from (about 96% on held-out 0-4 digits)."""
    torch.manual_seed(0)
    model = _create(name)
    x, y = _digits()
    keep = y[:N_TRAIN] < 5
    x, y = _images(x[:N_TRAIN][keep], name), y[:N_TRAIN][keep]
    steps = 200 if name == "vit" else 100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (BATCH,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def build_model() -> nn.Module:
    from adaptc.atomic import atomic_write_bytes

    name = model_name()
    path = CACHE / f"digits_0to4_{name}.pt"
    if path.is_file():
        model = _create(name)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = _pretrain(name)
    CACHE.mkdir(parents=True, exist_ok=True)
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return model


def example_inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(BATCH, 1, SIZES[model_name()], SIZES[model_name()])}


def _batches(x: torch.Tensor, y: torch.Tensor, order: list[int]) -> list[dict[str, torch.Tensor]]:
    name = model_name()
    return [{"x": _images(x[order[i:i + BATCH]], name), "label": y[order[i:i + BATCH]]}
            for i in range(0, len(order) - BATCH + 1, BATCH)]  # whole batches only


def train_batches() -> list[dict[str, torch.Tensor]]:
    x, y = _digits()
    return _batches(x[:N_TRAIN], y[:N_TRAIN], torch.randperm(N_TRAIN).tolist())


def eval_batches() -> list[dict[str, torch.Tensor]]:
    x, y = _digits()
    return _batches(x[N_TRAIN:], y[N_TRAIN:], list(range(len(y) - N_TRAIN)))


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output, batch["label"])


def metric(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Accuracy over all ten digits."""
    return (output.argmax(-1) == batch["label"]).float().mean().item()


def _adapt(base: nn.Module, method: str) -> nn.Module:
    import adaptc

    if method == "lora":
        # '.*': every linear and conv op, the classifier head included (it must learn the five new classes).
        am = adaptc.inject(base, "lora", example_inputs=example_inputs(), r=8, alpha=16, targets=".*")
        print(f"LoRA r=8 on {len(am.sites)} sites; {am.trainable_summary(print_it=False)}")
        return am
    # Prompt tuning: 8 learned tokens inserted after the class token, at the sequence entry adaptc finds in the
    # graph. The frozen head has never predicted 5-9 (training pushed those rows down), so the head gets a
    # rank-8 LoRA beside the prompt, as PEFT trains a classifier head with prompt tuning (modules_to_save).
    am = adaptc.inject(base, "prompt", example_inputs=example_inputs(), num_virtual_tokens=8)
    am.add_adapter("head", "lora", targets=["head"], r=8, alpha=16)
    am.set_adapter(["default", "head"])
    print(f"prompt tuning (8 virtual tokens) + LoRA r=8 on the head; {am.trainable_summary(print_it=False)}")
    return am


def main(name: str = "vit", steps: int = 80, method: str = "lora") -> int:
    from adaptc.targets import ort as rt

    import adaptc

    os.environ["ADAPTC_VISION_MODEL"] = name
    t0 = time.perf_counter()
    base = build_model()
    print(f"base model: timm {name}, trained on digits 0-4 only ({time.perf_counter() - t0:.0f}s)")
    am = _adapt(base, method)
    out = ROOT / "out" / f"vision_{name}_{method}"
    result = adaptc.train(am, train_batches, loss=loss, eval_batches=eval_batches(), metric=metric,
                          steps=steps, lr=5e-3 if method == "lora" else 2e-2, output_dir=out)
    before, after = result.evals[0]["metric"], result.evals[-1]["metric"]
    what = "LoRA" if method == "lora" else "prompt tuning"
    print(f"accuracy on {len(_digits()[1]) - N_TRAIN} held-out digits (0-9): {before:.1%} before -> {after:.1%} after {what}")

    report = adaptc.export_onnx(am, out / f"digits_{name}.onnx")
    print(report.summary())
    session = rt.open_session(Path(report.path))
    correct = total = 0
    for batch in eval_batches():
        (logits,) = session.run(None, {session.get_inputs()[0].name: batch["x"].numpy()})
        correct += int((logits.argmax(-1) == batch["label"].numpy()).sum())
        total += len(batch["label"])
    print(f"ONNX Runtime accuracy: {correct / total:.1%}; done in {time.perf_counter() - t0:.0f}s")
    return 0 if after > before else 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="LoRA / prompt tuning on digits (see the docstring)")
    parser.add_argument("models", nargs="*", choices=[*SIZES, []], default=["vit", "resnet"])
    parser.add_argument("--method", choices=["lora", "prompt"], default="lora", help="prompt: ViT only")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    if args.method == "prompt" and "resnet" in args.models:
        parser.error("--method prompt needs attention: use it with vit (a ResNet has no token sequence)")
    models = args.models or (["vit"] if args.method == "prompt" else list(SIZES))
    raise SystemExit(max(main(n, args.steps, args.method) for n in models))
