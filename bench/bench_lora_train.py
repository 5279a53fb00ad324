"""LoRA training step time: adaptc against PEFT, full fine-tuning and the frozen floor, in one process.

    .venv/bin/python bench/bench_lora_train.py                       # the issue's sizes (slow on 2 cores)
    .venv/bin/python bench/bench_lora_train.py --layers 2 --hidden 128 --seq 64 --rounds 3   # a quick look

For each model (GPT-2 style, Llama style) every variant is built from the same weights and
batch; one round times one AdamW step of each variant in turn (interleaved, so machine noise
hits all alike), and the table reports medians over the rounds, each as a multiple of the
floor (the frozen model's forward plus the backward to its input embeddings, no weight
gradient) and adaptc's as a ratio to PEFT's. Results go to bench/RESULTS-lora-train.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from adaptc.atomic import atomic_write_bytes

CONFIGS = {
    # name: (targets for adaptc, PEFT's target_modules per model family, r, alpha, dropout)
    "q/v r=8": ({"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}, 8, 16, 0.0),
    "all-linear r=16": ("all-linear", 16, 32, 0.0),
    "all-linear r=16 dropout 0.05": ("all-linear", 16, 32, 0.05),
}


def build(family: str, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.hidden,
                            n_layer=args.layers, n_head=args.heads, tie_word_embeddings=False)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def make_step(model: torch.nn.Module, params: list, batch: dict) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_floor(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        inputs = embed(batch["input_ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=inputs, labels=batch["labels"]).loss
        loss.backward()

    return step


def variants(family: str, args: argparse.Namespace, batch: dict) -> dict[str, Callable[[], None]]:
    import peft

    import adaptc

    base = build(family, args)
    steps = {"floor": make_floor(copy.deepcopy(base), batch)}
    full = copy.deepcopy(base)
    steps["full fine-tuning"] = make_step(full, list(full.parameters()), batch)
    for name, (targets, r, alpha, dropout) in CONFIGS.items():
        ours_targets = targets[family] if isinstance(targets, dict) else targets
        theirs_targets = ours_targets
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                                 target_modules=theirs_targets))
        steps[f"PEFT {name}"] = make_step(theirs, [p for p in theirs.parameters() if p.requires_grad], batch)
        model = copy.deepcopy(base)
        ours = adaptc.inject(model, "lora", example_inputs=batch, targets=ours_targets, r=r, alpha=alpha, dropout=dropout)
        ours.train()
        steps[f"adaptc {name}"] = make_step(ours, [p for p in ours.parameters() if p.requires_grad], batch)
    return steps


def measure(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for step in steps.values():  # warm-up: first-call capture, allocator
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| model | variant | ms / step | x floor | adaptc / PEFT |", "|---|---|---|---|---|"]
    for family, medians in results.items():
        floor = medians["floor"]
        for name, ms in medians.items():
            ratio = ""
            if name.startswith("adaptc "):
                ratio = f"{ms / medians['PEFT ' + name[len('adaptc '):]]:.2f}"
            lines.append(f"| {family} | {name} | {ms:.0f} | {ms / floor:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-lora-train.md")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    for family in args.models.split(","):
        print(f"{family}: building and warming up ...", file=sys.stderr)
        results[family] = measure(variants(family, args, batch), args.rounds)
    text = table(results)
    print(text)
    header = (
        f"# LoRA training step: adaptc vs PEFT\n\n`{' '.join(sys.argv)}`\n\n"
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}, AdamW, {args.threads} threads, "
        f"medians of {args.rounds} interleaved rounds. torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} ({platform.processor() or 'cpu'}).\n\n"
    )
    atomic_write_bytes(Path(args.out), (header + text + "\n").encode())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
