"""Audio: LoRA and prefix tuning on a small wav2vec2 (transformers), sounds generated here, ONNX Runtime at the end.

No audio model or data set can be downloaded here, so everything is made in this file, reproducibly:

- **The sounds**: 6 classes of 0.25 s clips at 8 kHz (a steady tone, a rising chirp, a falling chirp, a
  tremolo tone, a coloured-noise burst, a click train), each with a random pitch, onset, length, level
  and background noise drawn from a seeded generator: the same clips on every run and machine.
- **The base model**: a 2-layer wav2vec2 (``Wav2Vec2ForSequenceClassification`` from a small config,
  hidden 64) trained from random init on *clean* clips for 150 steps (cached in
  ``out/cache/``). A randomly initialised wav2vec2 learns slowly, so this "pretrained" base is
  weak: 38.8% on clean clips (measured; the run prints it). Made honestly, not a good model.
- **The new domain**: the same six classes through a pipeline with a sample-rate mismatch, so every
  pitch is 2.5x higher. The frozen base is at chance there (18.3% measured, chance is 17%), so the
  adapters mostly learn the shifted task on top of the frozen features. LoRA and
  prefix tuning, each on its own fresh copy of the base, adapt it with the base weights frozen, for
  60 steps each. Measured: LoRA 18.3% -> 50.4%, prefix tuning 18.3% -> 38.3% on 240 held-out
  clips (with a 300-step base: 82% clean, 46.2% shifted, LoRA -> 60.8%, prefix -> 50.4%: a better
  base, a smaller rise). The figures stay modest because the base is weak and the steps few (the 3-minute budget);
  prefix tuning (8 learned keys/values per attention, 2k parameters) moves less than LoRA (every
  linear layer, 16k) in the same steps, the expected order.

    python examples/audio_sounds.py            # both methods: accuracy before/after, ONNX export, ORT check
    python examples/audio_sounds.py --quick    # tiny settings: checks the pipeline, not the figures
    adaptc inject examples/audio_sounds.py --method lora --r 8 -o out/ && adaptc train examples/audio_sounds.py --adapter out/ --steps 60 --lr 5e-3
"""

from __future__ import annotations

import io
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
SR, N = 8000, 2000  # 0.25 s at 8 kHz
CLASSES = ("tone", "rising chirp", "falling chirp", "tremolo", "noise burst", "click train")
SHIFT = 2.5  # the new domain: every pitch 2.5x higher
BATCH = 32
PRETRAIN_STEPS = 150  # measured: 300 steps give a better base (82% clean, 46% shifted) but a smaller rise (LoRA -> 61%, prefix -> 50%)
SIZES = {"pretrain": 600, "train": 480, "eval": 240}


# --- the sounds ---------------------------------------------------------------------------------

def _clip(label: int, g: torch.Generator, shift: float) -> torch.Tensor:
    t = torch.arange(N) / SR

    def u(a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=g).item()

    f0 = u(200, 700) * shift
    if label in (0, 1, 2):
        if label == 0:
            phase = 2 * math.pi * f0 * t
        else:  # linear chirp over the clip, up or down by a factor 2-3
            f1 = f0 * u(2.0, 3.0)
            a, b = (f0, f1) if label == 1 else (f1, f0)
            phase = 2 * math.pi * (a * t + (b - a) * t**2 / (2 * t[-1].item()))
        x = torch.sin(phase + u(0, 2 * math.pi))
    elif label == 3:
        x = torch.sin(2 * math.pi * f0 * t) * (0.5 + 0.5 * torch.sin(2 * math.pi * u(6, 14) * t))
    elif label == 4:  # noise low-passed by a moving average; higher pitch = a shorter window
        k = max(int(u(2, 6) / shift), 1)
        x = F.avg_pool1d(torch.randn(1, 1, N, generator=g), 2 * k + 1, 1, k)[0, 0] * 2
    else:
        x = torch.zeros(N)
        period = int(SR / u(15, 40) / shift * 2)
        x[int(u(0, period)) :: period] = 1.0
        x = F.conv1d(x[None, None], torch.hann_window(9)[None, None], padding=4)[0, 0]
    envelope = torch.zeros(N)
    envelope[int(u(0, 0.2) * N) : int(u(0.8, 1.0) * N)] = 1.0
    x = x * envelope * u(0.3, 1.0) + 0.05 * torch.randn(N, generator=g)
    return x / (x.std() + 1e-5)


def sounds(n: int, seed: int, shift: float = SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clips [n, N] and labels, balanced over the classes; the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % len(CLASSES))[torch.randperm(n, generator=g)]
    return torch.stack([_clip(int(c), g, shift) for c in labels]), labels


# --- the base model -------------------------------------------------------------------------------

def _create() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),  # 80x down: 25 frames per clip
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=len(CLASSES),
        classifier_proj_size=32, mask_time_prob=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
    )
    return Wav2Vec2ForSequenceClassification(config)


def _pretrain(steps: int) -> nn.Module:
    """Full training on clean clips (original pitch): the frozen base the adapters start from."""
    torch.manual_seed(0)
    model = _create()
    x, y = sounds(SIZES["pretrain"], seed=1, shift=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (BATCH,))
        loss = F.cross_entropy(model(input_values=x[idx]).logits, y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def build_model(pretrain_steps: int = PRETRAIN_STEPS) -> nn.Module:
    from adaptc.atomic import atomic_write_bytes

    path = ROOT / "out" / "cache" / f"audio_sounds_base_{pretrain_steps}.pt"
    if path.is_file():
        model = _create()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = _pretrain(pretrain_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return model


def example_inputs() -> dict[str, torch.Tensor]:
    return {"input_values": torch.zeros(BATCH, N)}


def _batches(x: torch.Tensor, y: torch.Tensor, order: list[int]) -> list[dict[str, torch.Tensor]]:
    return [{"input_values": x[order[i:i + BATCH]], "label": y[order[i:i + BATCH]]} for i in range(0, len(order), BATCH)]


def train_batches(n: int = SIZES["train"]) -> list[dict[str, torch.Tensor]]:
    x, y = sounds(n, seed=3)
    return _batches(x, y, torch.randperm(n).tolist())


def eval_batches(n: int = SIZES["eval"]) -> list[dict[str, torch.Tensor]]:
    x, y = sounds(n, seed=2)
    return _batches(x, y, list(range(n)))


def loss(output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output.logits, batch["label"])


def metric(output, batch: dict[str, torch.Tensor]) -> float:
    return (output.logits.argmax(-1) == batch["label"]).float().mean().item()


# --- the run --------------------------------------------------------------------------------------

def _inject(base: nn.Module, method: str):
    import adaptc

    if method == "lora":  # every linear layer but the classifier (the six classes are the base's own)
        return adaptc.inject(base, "lora", example_inputs=example_inputs(), r=8, alpha=16, targets="all-linear")
    return adaptc.inject(base, "prefix", example_inputs=example_inputs(), num_virtual_tokens=8)


def run(method: str, steps: int, pretrain_steps: int, sizes: dict[str, int], out: Path) -> dict[str, float]:
    """One method on a fresh copy of the base: accuracy before/after, export, ONNX Runtime on the eval set."""
    import numpy as np
    from adaptc.targets import ort as rt

    import adaptc

    t0 = time.perf_counter()
    base = build_model(pretrain_steps)
    evals = eval_batches(sizes["eval"])
    before = adaptc.evaluate(base, evals, loss=loss, metric=metric)["metric"]  # the frozen base, no adapter
    x, y = sounds(sizes["eval"], seed=2, shift=1.0)
    clean = adaptc.evaluate(base, _batches(x, y, list(range(len(y)))), metric=metric)["metric"]
    print(f"base model: {clean:.1%} on clean clips (the domain it was trained on), {before:.1%} on pitch-shifted ones")
    am = _inject(base, method)
    print(f"\n== {method}: {am.trainable_summary(print_it=False)}")
    lr = 5e-3 if method == "lora" else 1e-1  # prefix values start at N(0, 1): small steps barely move them
    adaptc.train(am, lambda: train_batches(sizes["train"]), steps=steps, lr=lr, loss=loss, progress=False)
    after = adaptc.evaluate(am, evals, loss=loss, metric=metric)["metric"]
    print(f"{method}: accuracy on {sizes['eval']} held-out pitch-shifted clips: "
          f"{before:.1%} frozen base -> {after:.1%} after {method} ({steps} steps)")

    report = adaptc.export_onnx(am, out / f"audio_{method}.onnx")
    session = rt.open_session(Path(report.path))
    agree = correct = total = 0
    worst = 0.0
    am.eval()
    for batch in evals:
        (logits,) = session.run(None, {session.get_inputs()[0].name: batch["input_values"].numpy()})
        with torch.no_grad():
            reference = am(input_values=batch["input_values"]).logits.numpy()
        worst = max(worst, float(np.abs(logits - reference).max()))
        agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        correct += int((logits.argmax(-1) == batch["label"].numpy()).sum())
        total += len(batch["label"])
    print(f"{method}: ONNX Runtime {correct / total:.1%} accuracy, predictions agree with PyTorch on "
          f"{agree}/{total}, max |ORT - PyTorch| {worst:.2e} (export parity check {report.parity_max_abs_diff:.2e}); "
          f"{time.perf_counter() - t0:.0f}s")
    return {"before": before, "after": after, "ort_accuracy": correct / total, "agree": agree / total,
            "max_diff": worst, "parity": report.parity_max_abs_diff}


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    # One thread: the model is tiny (two threads gain little), and the figures then do not depend on the
    # machine's core count (measured: with 2 threads the base came out different and prefix reached 22.9%, not 38.3%).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = ROOT / "out" / "audio_sounds"
    out.mkdir(parents=True, exist_ok=True)
    pretrain = 8 if quick else PRETRAIN_STEPS
    sizes = {"train": 64, "eval": 48} if quick else SIZES
    steps = {"lora": 2, "prefix": 2} if quick else {"lora": 60, "prefix": 60}
    results = {m: run(m, steps[m], pretrain, sizes, out) for m in ("lora", "prefix")}
    print(f"\ndone in {time.perf_counter() - t0:.0f}s")
    ok = all(r["agree"] == 1.0 and r["parity"] <= 1e-4 for r in results.values())
    return 0 if ok and (quick or all(r["after"] > r["before"] for r in results.values())) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
