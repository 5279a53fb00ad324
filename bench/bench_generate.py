"""Generation with LoRA: adaptc's ``am.generate`` against PEFT's ``generate`` and the merged model, in one process.

    .venv/bin/python bench/bench_generate.py                   # prompt 128, 128 new tokens, batch 1 and 8
    .venv/bin/python bench/bench_generate.py --quick           # smoke run: prompt 16, 16 new tokens, 1 round

Per model (a Llama and a GPT-2 built from transformers configs, 4 layers, hidden 256) one LoRA
adapter (all-linear, r=16, lora_B drawn at random so the update is not zero) is injected by adaptc,
saved in PEFT's format and loaded by PEFT into a fresh copy of the same base weights, so both run
the same weights; PEFT's ``merge_and_unload`` of another copy gives the merged model. Variants:

- adaptc unmerged: ``am.generate`` (transformers' generate through adaptc's captured graphs, with
  transformers' key/value cache);
- PEFT unmerged: ``PeftModel.generate``;
- merged: transformers' ``generate`` on the model with the update folded into its weights (the floor).

Then a mixed batch: 8 rows over 4 LoRA adapters (2 rows each), ``generate(adapter_names=[...])``
in adaptc and in PEFT.

Greedy, ``min_new_tokens = max_new_tokens`` (no early stop), no padding. Time: wall time of one
``generate`` call divided by the new tokens (the prefill included), median over the rounds; one
round calls every variant of a model once in turn (interleaved, so machine noise hits all alike).
Before the rounds each variant is called once: that first call (for adaptc: capturing the prefill and
one-token graphs) is reported on its own in "first call s". "tokens = PEFT" compares the generated
tokens with PEFT's. Targets (the issue): adaptc unmerged <= 0.9x PEFT unmerged and <= 1.15x merged;
mixed batch <= 0.7x PEFT.

OMP_WAIT_POLICY defaults to PASSIVE here: on a machine whose cores other jobs share, libgomp's spinning
threads made every variant up to 10x slower (a step waits for a thread whose core is taken).

Results go to bench/RESULTS-generate.md (``--quick``: bench/quick-generate.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_train import cpu_name, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_PEFT, TARGET_MERGED, TARGET_MIXED = 0.9, 1.15, 0.7
VARIANTS = ("adaptc unmerged", "PEFT unmerged", "merged")
LOAD: list[float] = []  # the 1-minute load average after each round: other jobs on the cores skew wall times


# --- models and adapters ---------------------------------------------------------------------------

def build(family: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, tie_word_embeddings=False,
                             max_position_embeddings=max(2048, args.prompt + args.new_tokens),
                             bos_token_id=0, eos_token_id=1, pad_token_id=0)
        return LlamaForCausalLM(config).eval()
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.prompt + args.new_tokens),
                            n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=1, pad_token_id=0)
        return GPT2LMHeadModel(config).eval()
    raise SystemExit(f"unknown model {family!r}: llama or gpt2")


def randomize_lora_b(am: torch.nn.Module) -> None:
    """lora_B starts at zero (the update would be nothing): draw it, seeded by the parameter's name."""
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def prompt_of(batch: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mixed_names(args: argparse.Namespace) -> list[str]:
    """``args.mixed_rows`` rows over ``args.mixed_adapters`` adapters, interleaved: a0, a1, a2, a3, a0, ..."""
    return [f"a{row % args.mixed_adapters}" for row in range(args.mixed_rows)]


def variants(family: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    """Every variant of one model as a call returning the generated ids; and notes (set-up times)."""
    import peft

    import adaptc

    base = build(family, args)
    notes: dict[str, str] = {}
    generation = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "pad_token_id": 0}
    example = {"input_ids": prompt_of(1, args)["input_ids"]}

    start = time.perf_counter()
    am = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=example, targets="all-linear", r=args.r)
    notes["inject"] = f"{time.perf_counter() - start:.2f}"
    randomize_lora_b(am)
    am.eval()
    am.save_adapter(workdir / "single")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), workdir / "single").eval()
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), workdir / "single").merge_and_unload().eval()

    def call(model: Callable, inputs: dict, **extra) -> Callable[[], torch.Tensor]:
        # generate runs under no_grad by itself (transformers' decorator; adaptc's too): the same for every variant.
        return lambda: model(**inputs, **generation, **extra)[:, args.prompt:]

    steps: dict[str, Callable] = {}
    for batch in args.batches:
        inputs = prompt_of(batch, args)
        steps[f"{batch}|adaptc unmerged"] = call(am.generate, inputs)
        steps[f"{batch}|PEFT unmerged"] = call(theirs.generate, inputs)
        steps[f"{batch}|merged"] = call(merged.generate, inputs)

    if args.mixed_rows:
        names = mixed_names(args)
        adapters = list(dict.fromkeys(names))
        start = time.perf_counter()
        am4 = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=example, adapter_name=adapters[0],
                            targets="all-linear", r=args.r)
        for name in adapters[1:]:
            am4.add_adapter(name, "lora", targets="all-linear", r=args.r)
        notes["inject mixed"] = f"{time.perf_counter() - start:.2f}"
        randomize_lora_b(am4)
        am4.eval()
        am4.save_adapter(workdir / "mixed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs4 = peft.PeftModel.from_pretrained(copy.deepcopy(base), workdir / "mixed" / adapters[0],
                                                     adapter_name=adapters[0])
            for name in adapters[1:]:
                theirs4.load_adapter(workdir / "mixed" / name, adapter_name=name)
            theirs4.eval()
        inputs = prompt_of(args.mixed_rows, args)
        steps["mixed|adaptc unmerged"] = call(am4.generate, inputs, adapter_names=names)
        steps["mixed|PEFT unmerged"] = call(theirs4.generate, inputs, adapter_names=names)
    return steps, notes


# --- measuring -------------------------------------------------------------------------------------

def measure(steps: dict[str, Callable], rounds: int, clock: Callable[[], float] = time.perf_counter,
            ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, torch.Tensor]]:
    """First-call seconds, the rounds' times (seconds per call, interleaved) and each variant's output."""
    first, outputs = {}, {}
    for name, step in steps.items():  # warm-up: adaptc captures its prefill and one-token graphs here
        start = clock()
        outputs[name] = step()
        first[name] = clock() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
        LOAD.append(os.getloadavg()[0])
    return first, times, outputs


def same_tokens(got: torch.Tensor, reference: torch.Tensor) -> str:
    if got.shape == reference.shape and torch.equal(got, reference):
        return "yes"
    if got.shape != reference.shape:
        return f"no (shape {tuple(got.shape)} vs {tuple(reference.shape)})"
    differs = (got != reference).any(0).nonzero()
    return f"no ({int((got == reference).sum())}/{got.numel()} equal, first difference at new token {int(differs[0])})"


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.2f} ({'met' if ratio <= target else 'missed'})"


# --- report ----------------------------------------------------------------------------------------

def tables(results: dict, args: argparse.Namespace) -> str:
    per_token = args.new_tokens
    lines = [f"| model | batch | variant | ms / new token | min-max | first call s | adaptc / PEFT "
             f"(target <= {TARGET_PEFT}) | adaptc / merged (target <= {TARGET_MERGED}) | tokens = PEFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    mixed = [f"| model | rows | variant | ms / new token | min-max | first call s | adaptc / PEFT (target <= "
             f"{TARGET_MIXED}) | mixed / one adapter, batch {args.mixed_rows} | tokens = PEFT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, (first, times, outputs, _) in results.items():
        ms = {name: statistics.median(t) * 1000 / per_token for name, t in times.items()}
        spread = {name: f"{min(t) * 1000 / per_token:.2f}-{max(t) * 1000 / per_token:.2f}" for name, t in times.items()}
        for batch in args.batches:
            key = f"{batch}|"
            for variant in VARIANTS:
                name = key + variant
                to_peft = to_merged = ""
                if variant == "adaptc unmerged":
                    to_peft = verdict(ms[name] / ms[key + "PEFT unmerged"], TARGET_PEFT)
                    to_merged = verdict(ms[name] / ms[key + "merged"], TARGET_MERGED)
                check = "(reference)" if variant == "PEFT unmerged" else \
                    same_tokens(outputs[name], outputs[key + "PEFT unmerged"])
                lines.append(f"| {family} | {batch} | {variant} | {ms[name]:.2f} | {spread[name]} | {first[name]:.2f} "
                             f"| {to_peft} | {to_merged} | {check} |")
        if "mixed|adaptc unmerged" in ms:
            ours, theirs = ms["mixed|adaptc unmerged"], ms["mixed|PEFT unmerged"]
            single = {v: ms.get(f"{args.mixed_rows}|{v}") for v in ("adaptc unmerged", "PEFT unmerged")}
            rows = f"{args.mixed_rows} over {args.mixed_adapters} adapters"
            for variant, value in (("adaptc unmerged", ours), ("PEFT unmerged", theirs)):
                name = "mixed|" + variant
                ratio = verdict(ours / theirs, TARGET_MIXED) if variant == "adaptc unmerged" else ""
                to_single = f"{value / single[variant]:.2f}" if single[variant] else ""
                check = "(reference)" if variant == "PEFT unmerged" else \
                    same_tokens(outputs[name], outputs["mixed|PEFT unmerged"])
                mixed.append(f"| {family} | {rows} | {variant} | {value:.2f} | {spread[name]} | {first[name]:.2f} "
                             f"| {ratio} | {to_single} | {check} |")
    text = "\n".join(lines)
    if len(mixed) > 2:
        text += "\n\nMixed-adapter batch (`generate(adapter_names=[...])`):\n\n" + "\n".join(mixed)
    return text


def notes_line(results: dict) -> str:
    parts = [f"{family}: inject {notes['inject']} s" + (f", 4-adapter model {notes['inject mixed']} s"
                                                        if "inject mixed" in notes else "")
             for family, (*_, notes) in results.items()]
    return "Set-up (capture + passes, not in any column): " + "; ".join(parts) + "."


def git_commit() -> str:
    """HEAD's short hash, and the files of adaptc/, passes/ and targets/ that differ from it (others may be
    editing them): taken before the models are built, as the code that runs is imported then."""
    def git(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *command], cwd=HERE.parent, capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown"
    changed = git("diff", "--name-only", "HEAD", "--", "adaptc", "passes", "targets").stdout.split()
    return head.stdout.strip() + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama,gpt2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="Llama's key/value heads")
    parser.add_argument("--intermediate", type=int, default=688, help="Llama's MLP width")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (all-linear)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (one adapter)")
    parser.add_argument("--mixed-rows", type=int, default=8, help="rows of the mixed-adapter batch (0: skip it)")
    parser.add_argument("--mixed-adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU clock (with --threads 1: robust to a busy machine)")
    parser.add_argument("--quick", action="store_true", help="smoke run: prompt 16, 16 new tokens, 1 round")
    parser.add_argument("--out", help="results file (default bench/RESULTS-generate.md; "
                        "--quick: bench/quick-generate.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.new_tokens, args.rounds = 16, 16, 1
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.mixed_rows and args.mixed_rows % args.mixed_adapters:
        parser.error("--mixed-rows must be a multiple of --mixed-adapters")
    args.out = args.out or str(HERE / ("quick-generate.md" if args.quick else "RESULTS-generate.md"))
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    LOAD.append(os.getloadavg()[0])
    commit = git_commit()
    import adaptc  # noqa: F401  (imported now: the code the commit above describes)

    results = {}
    for family in args.models.split(","):
        print(f"{family}: injecting, loading into PEFT, warming up ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            steps, notes = variants(family, args, Path(workdir))
            print(f"{family}: {len(steps)} variants x {args.rounds} rounds ...", file=sys.stderr, flush=True)
            clock = time.thread_time if args.cpu_time else time.perf_counter
            results[family] = (*measure(steps, args.rounds, clock), notes)
    text = tables(results, args) + "\n\n" + notes_line(results)
    print(text)
    import peft
    import transformers

    header = (
        f"# Generation: adaptc am.generate vs PEFT generate vs the merged model\n\n"
        f"`python bench/bench_generate.py {' '.join(argv)}`\n\n"
        f"{datetime.date.today().isoformat()}, commit {commit}. {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} heads (Llama: {args.kv_heads} key/value heads, MLP {args.intermediate}), vocab {args.vocab}; "
        f"LoRA all-linear r={args.r}, lora_B random. Prompt {args.prompt} tokens, {args.new_tokens} new tokens "
        f"(greedy, no early stop), ms per new token = {'thread CPU' if args.cpu_time else 'wall'} time of one "
        f"generate call / new tokens, prefill "
        f"included; medians of {args.rounds} interleaved rounds after one warm-up call each (\"first call s\", "
        f"which for adaptc includes capturing its generation graphs). "
        f"{args.threads} thread{'s' if args.threads > 1 else ''}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}; 1-minute load average {LOAD[0]:.2f} at the start, "
        f"{min(LOAD):.2f}-{max(LOAD):.2f} over the rounds ({os.cpu_count()} CPUs). torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {cpu_name()}.\n\n"
    )
    write_results(args.out, header, text)


if __name__ == "__main__":
    main()
