"""Activation checkpointing: what a LoRA training step keeps for the backward, plain / full / selective.

    .venv/bin/python bench/bench_checkpointing.py                        # 4 layers, hidden 256, batch 8 x 128
    .venv/bin/python bench/bench_checkpointing.py --time --rounds 5      # and step times (interleaved medians)

For each model (GPT-2, Llama, BERT from transformers configs, a timm ViT: bench_lora_train.py's builders)
one AdaptedModel with all-linear LoRA r=16 runs a step without checkpointing and with each policy.
"saved" is what autograd keeps for the backward, by storage, weights and buffers excluded (counted with
``torch.autograd.graph.saved_tensors_hooks`` over the forward: block inputs, the kept matmul and
attention outputs of the selective policy, and everything outside the blocks); a memory measure,
identical from run to run. ``--time`` adds the median step time (forward, backward, AdamW) of each
variant over interleaved rounds, as a multiple of the plain step: that one depends on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_train import ALL, build, loss_of, make_batch  # noqa: E402

import adaptc  # noqa: E402

VARIANTS = {"plain": None, "full": {"policy": "full"}, "selective": {"policy": "selective"}}


def adapted(family: str, args: argparse.Namespace) -> tuple[adaptc.AdaptedModel, dict]:
    model, batch = build(family, args), make_batch(family, args)
    example = {"x": batch["x"]} if family == "vit" else batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        am = adaptc.inject(model, "lora", example_inputs=example, targets=ALL[family], r=16, alpha=32,
                           dropout=args.dropout)
    am.train()
    return am, batch


def use(am: adaptc.AdaptedModel, variant: str) -> None:
    if VARIANTS[variant] is None:
        am.gradient_checkpointing_disable()
    else:
        am.gradient_checkpointing_enable(VARIANTS[variant])


def saved_mib(am: adaptc.AdaptedModel, family: str, batch: dict) -> float:
    weights = {t.untyped_storage().data_ptr() for t in [*am.parameters(), *am.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(am, family, batch)
    loss.backward()
    am.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def step_seconds(am: adaptc.AdaptedModel, family: str, batch: dict, optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    loss = loss_of(am, family, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--image", type=int, default=112, help="ViT image side (patch 16)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    parser.add_argument("--models", default="gpt2,llama,bert,vit")
    parser.add_argument("--time", action="store_true", help="also time the steps (interleaved rounds)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = "| model | saved: plain | full | selective |" + (" step time: full | selective |" if args.time else "")
    print(f"torch {torch.__version__}, {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq} "
          f"(ViT: {args.image} px), all-linear LoRA r=16, dropout {args.dropout}")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for family in args.models.split(","):
        am, batch = adapted(family, args)
        mib = {}
        for variant in VARIANTS:
            use(am, variant)
            saved_mib(am, family, batch)  # capture and warm up
            mib[variant] = saved_mib(am, family, batch)
        row = (f"| {family} | {mib['plain']:.1f} MiB | {mib['full']:.1f} ({mib['full'] / mib['plain']:.2f}) | "
               f"{mib['selective']:.1f} ({mib['selective'] / mib['plain']:.2f}) |")
        if args.time:
            optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-4)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    use(am, variant)
                    times[variant].append(step_seconds(am, family, batch, optimizer))
            plain = statistics.median(times["plain"])
            row += "".join(f" {statistics.median(times[v]) / plain:.2f}x |" for v in ("full", "selective"))
        print(row, flush=True)


if __name__ == "__main__":
    main()
