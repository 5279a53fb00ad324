"""Prompt methods: training step time of adaptc against PEFT on the text models both support.

    .venv/bin/python bench/bench_prompt.py --layers 4 --hidden 256 --seq 128        # RESULTS.md
    .venv/bin/python bench/bench_prompt.py --layers 2 --hidden 64 --seq 16 --rounds 2   # a quick look

Prompt tuning (20 virtual tokens), P-tuning (MLP encoder) and prefix tuning (20 tokens) on a
GPT-2 and a Llama decoder (BERT's prefix tuning fails in PEFT 0.21 under transformers 5, see
tests/test_prompt_methods.py), one AdamW step per variant in turn, medians over the rounds,
and the floor (frozen forward + backward to the input embeddings). Results go to
bench/RESULTS-prompt.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_train import build, cpu_name, interleaved_medians, make_floor, make_step, write_results  # noqa: E402

TOKENS = 20
METHODS = {
    "prompt tuning": ("prompt", {"num_virtual_tokens": TOKENS}),
    "P-tuning": ("ptuning", {"num_virtual_tokens": TOKENS, "encoder_hidden_size": 128}),
    "prefix tuning": ("prefix", {"num_virtual_tokens": TOKENS}),
}


def peft_model(method: str, model: torch.nn.Module) -> torch.nn.Module:
    import peft

    task = peft.TaskType.CAUSAL_LM
    if method == "prompt":
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=TOKENS)
    elif method == "ptuning":
        config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=TOKENS, encoder_hidden_size=128)
    else:
        config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def variants(family: str, args: argparse.Namespace, batch: dict) -> dict[str, Callable[[], None]]:
    import adaptc

    base = build(family, args)
    steps = {"floor": make_floor(copy.deepcopy(base).train(), family, batch)}
    for label, (method, options) in METHODS.items():
        theirs = peft_model(method, copy.deepcopy(base)).train()
        steps[f"PEFT | {label}"] = make_step(theirs, family, batch)
        ours = adaptc.inject(copy.deepcopy(base).train(), method, example_inputs=batch, **options).train()
        steps[f"adaptc | {label}"] = make_step(ours, family, batch)
    return steps


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
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-prompt.md")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    lines = ["| model | method | PEFT ms / step | adaptc ms / step | adaptc / PEFT | adaptc x floor |", "|---|---|---|---|---|---|"]
    for family in args.models.split(","):
        print(f"{family}: building and warming up ...", file=sys.stderr)
        medians = interleaved_medians(variants(family, args, batch), args.rounds)
        floor = medians["floor"]
        lines.append(f"| {family} | floor | | {floor:.0f} | | 1.00 |")
        for label in METHODS:
            theirs, ours = medians[f"PEFT | {label}"], medians[f"adaptc | {label}"]
            lines.append(f"| {family} | {label} | {theirs:.0f} | {ours:.0f} | {ours / theirs:.2f} | {ours / floor:.2f} |")
    text = "\n".join(lines)
    print(text)
    header = (
        f"# Prompt methods: adaptc vs PEFT, training step\n\n`python bench/bench_prompt.py {' '.join(sys.argv[1:])}`\n\n"
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}, {TOKENS} virtual tokens, AdamW, "
        f"{args.threads} threads, medians of {args.rounds} interleaved rounds. torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {cpu_name()}.\n\n"
    )
    write_results(args.out, header, text)


if __name__ == "__main__":
    main()
