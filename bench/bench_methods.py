"""Every weight method's training step and checkpoint size: adaptc against PEFT, one run, same weights and batch.

    .venv/bin/python bench/bench_methods.py                       # Llama 4 layers / 256, batch 8 x 128
    .venv/bin/python bench/bench_methods.py --methods lora,ia3 --rounds 3

For each method of ``METHODS`` (options under PEFT's names, the same for both sides) the Llama model
is adapted by adaptc and by PEFT from one set of weights; one round runs one AdamW step of each
variant in turn (interleaved, so machine noise hits all alike) and the table reports medians, adaptc's
as a ratio to PEFT's. "saved KiB" is the size of the adapter's safetensors file as each writes it
(``save_adapter`` / ``save_pretrained``). A method adaptc has no registry entry for, or PEFT has no
config for (bottleneck adapters are AdapterHub's), shows as "-" on that side.
"""

from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_train import build, cpu_name, interleaved_medians, make_batch, make_step, write_results  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# method: (PEFT config class name or None, options given to both adaptc.inject and the PEFT config)
METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "lora": ("LoraConfig", {"r": 16, "lora_alpha": 32, "target_modules": LINEAR}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "total_step": 100, "target_modules": LINEAR}),
    "loha": ("LoHaConfig", {"r": 8, "alpha": 16, "target_modules": LINEAR}),
    "lokr": ("LoKrConfig", {"r": 8, "alpha": 16, "target_modules": LINEAR}),
    "oft": ("OFTConfig", {"r": 0, "oft_block_size": 32, "target_modules": LINEAR}),
    "vera": ("VeraConfig", {"r": 64, "target_modules": LINEAR}),
    "ln_tuning": ("LNTuningConfig", {}),
    "bottleneck": (None, {"placement": "houlsby"}),
}


def adapted(side: str, method: str, base: torch.nn.Module, batch: dict) -> torch.nn.Module | None:
    """A fresh copy of ``base`` with ``method`` injected by adaptc or PEFT; None where that side lacks it."""
    import adaptc

    peft_name, options = METHODS[method]
    model = copy.deepcopy(base).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if side == "PEFT":
            import peft

            if peft_name is None:
                return None
            return peft.get_peft_model(model, getattr(peft, peft_name)(task_type="CAUSAL_LM", **options))
        if method not in adaptc.available_methods():
            return None
        return adaptc.inject(model, method, example_inputs=dict(batch), **options)


def saved_kib(side: str, model: torch.nn.Module) -> float:
    with tempfile.TemporaryDirectory() as folder:
        if side == "PEFT":
            model.save_pretrained(folder)
        else:
            model.save_adapter(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 1024


def measure(args: argparse.Namespace, methods: list[str]) -> list[list[str]]:
    base, batch = build("llama", args), make_batch("llama", args)
    steps: dict[str, Callable[[], None]] = {}
    sizes: dict[str, float] = {}
    for method in methods:
        for side in ("PEFT", "adaptc"):
            model = adapted(side, method, base, batch)
            if model is None:
                continue
            steps[f"{side} | {method}"] = make_step(model, "llama", batch)
            sizes[f"{side} | {method}"] = saved_kib(side, model)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    medians = interleaved_medians(steps, args.rounds, clock)
    rows = []
    for method in methods:
        ms = {side: medians.get(f"{side} | {method}") for side in ("adaptc", "PEFT")}
        kib = {side: sizes.get(f"{side} | {method}") for side in ("adaptc", "PEFT")}
        ratio = f"{ms['adaptc'] / ms['PEFT']:.2f}" if ms["adaptc"] and ms["PEFT"] else "-"
        rows.append([method, *(f"{ms[s]:.0f}" if ms[s] else "-" for s in ("adaptc", "PEFT")), ratio,
                     *(f"{kib[s]:.0f}" if kib[s] is not None else "-" for s in ("adaptc", "PEFT"))])
    return rows


def table(rows: list[list[str]]) -> str:
    lines = ["| method | adaptc ms / step | PEFT ms / step | adaptc / PEFT | adaptc saved KiB | PEFT saved KiB |",
             "|---|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU clock (with --threads 1: robust to a busy machine)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-methods.md")))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures one thread: use it with --threads 1")
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    text = table(measure(args, args.methods.split(",")))
    print(text)
    header = (
        f"# Training step and checkpoint size of every method: adaptc vs PEFT\n\n"
        f"`python bench/bench_methods.py {' '.join(argv)}`\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}, {cpu_name()}. "
        f"Llama {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}, AdamW, "
        f"{args.threads} threads, medians of {args.rounds} interleaved rounds"
        f"{' (thread CPU time)' if args.cpu_time else ''}. torch {torch.__version__}, "
        f"Python {platform.python_version()}.\n\n"
    )
    write_results(args.out, header, text)


if __name__ == "__main__":
    main()
