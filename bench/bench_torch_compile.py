"""torch.compile of a LoRA training step: adaptc against PEFT, each eager and compiled.

    .venv/bin/python bench/bench_torch_compile.py --layers 4 --hidden 256 --heads 4 --seq 128 --batch 8

Same models, weights, batch and AdamW step as bench_lora_train.py (whose helpers this uses), LoRA
all-linear r=16 with dropout 0.05. ``torch.compile(model)`` with the default inductor backend
wraps the adapted model; the first step (compiling forward and backward) is timed on its own, then
the four variants run interleaved and the table reports medians. Under compilation adaptc's LoRA
group nodes stay hand-written autograd Functions (dynamo traces them); the graph-level rewrites
(narrowed rows, fused RMSNorm / GELU) stay, and RoPE and dropout are handed to inductor written out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_train as lora_train  # noqa: E402

CONFIG = "all-linear r=16 dropout 0.05"
VARIANTS = [(impl, compiled) for impl in ("PEFT", "adaptc") for compiled in (False, True)]


def label(impl: str, compiled: bool) -> str:
    return f"{impl} {'compiled' if compiled else 'eager'}"


def measure(family: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    base, batch = lora_train.build(family, args), lora_train.make_batch(family, args)
    steps, first = {}, {}
    for impl, compiled in VARIANTS:
        wrap = torch.compile if compiled else None
        step = lora_train.make_variant(f"{impl} | {CONFIG}", family, base, batch, wrap=wrap)
        start = time.perf_counter()
        step()  # eager: capture (adaptc); compiled: dynamo + inductor, forward and backward
        first[label(impl, compiled)] = time.perf_counter() - start
        steps[label(impl, compiled)] = step
    return lora_train.interleaved_medians(steps, args.rounds), first


def table(results: dict[str, tuple[dict[str, float], dict[str, float]]]) -> str:
    lines = ["| model | variant | ms / step | adaptc / PEFT (same mode) | x PEFT eager | first step s |",
             "|---|---|---|---|---|---|"]
    for family, (medians, first) in results.items():
        peft_eager = medians[label("PEFT", False)]
        for impl, compiled in VARIANTS:
            name = label(impl, compiled)
            ratio = f"{medians[name] / medians[label('PEFT', compiled)]:.2f}" if impl == "adaptc" else ""
            lines.append(f"| {family} | {name} | {medians[name]:.0f} | {ratio} | {medians[name] / peft_eager:.2f} "
                         f"| {first[name]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    args = lora_train.parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = {}
    for family in args.models.split(","):
        print(f"{family}: compiling and timing {len(VARIANTS)} variants ...", file=sys.stderr)
        results[family] = measure(family, args)
    text = table(results)
    print(text)
    header = (
        f"# torch.compile: LoRA training step, adaptc vs PEFT\n\n`python bench/bench_torch_compile.py {' '.join(argv)}`\n\n"
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq} (ViT: {args.image}px), {CONFIG}, "
        f"AdamW, {args.threads} threads, medians of {args.rounds} interleaved rounds after the first (compiling) step. "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, {lora_train.cpu_name()}.\n\n"
    )
    out = args.out if args.out != lora_train.parse([]).out else str(Path(__file__).with_name("RESULTS-torch-compile.md"))
    lora_train.write_results(out, header, text)


if __name__ == "__main__":
    main()
