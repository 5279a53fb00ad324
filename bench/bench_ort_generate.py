"""Generation from the exported ONNX folder: onnxruntime-genai and a plain ONNX Runtime session loop against
adaptc's ``am.generate`` and PEFT's ``generate``, in one process.

    .venv/bin/python bench/bench_ort_generate.py                 # prompt 128, 128 new tokens, batch 1 and 8
    .venv/bin/python bench/bench_ort_generate.py --quick         # smoke run: prompt 16, 16 new tokens, 1 round

Per model (a Llama with grouped-query attention and a GPT-2, 4 layers, hidden 256, built from transformers
configs as in bench/bench_generate.py) one LoRA adapter (all-linear, r=16, lora_B drawn at random) is
injected by adaptc and loaded by PEFT into a copy of the same base weights. The adapted model is exported
with ``export_onnx(am, folder, task="text-generation", merge=False)``: the base decoder with its key/value
cache and the adapter as an ``.onnx_adapter`` file, applied per request as a server would. Variants:

- ORT genai: onnxruntime-genai, the adapter set with ``Generator.set_active_adapter``;
- ORT session: ``adaptc.ort.OrtGenerator(engine="session")``, a numpy loop over one InferenceSession;
- adaptc: ``am.generate`` (transformers' generate through the captured graphs, with its cache);
- PEFT: ``PeftModel.generate``.

Greedy, no early stop (the models have no EOS), no padding. Time: wall time of one generate call divided by
the new tokens (prefill included), median over interleaved rounds after one warm-up call each. "tokens =
PEFT" compares the generated tokens. Target: ORT at least 2x PEFT's tokens per second (ratio <= 0.5).
Timings are only meaningful on a quiet machine: the load average is in the header.

Results go to bench/RESULTS-ort-generate.md (``--quick``: bench/quick-ort-generate.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import LOAD, build, git_commit, measure, prompt_of, randomize_lora_b, same_tokens  # noqa: E402
from bench_lora_train import cpu_name, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET = 0.5  # ORT time per token / PEFT's: 2x the tokens per second
VARIANTS = ("ORT genai", "ORT session", "adaptc am.generate", "PEFT generate")


def variants(family: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    import peft

    import adaptc
    from adaptc.ort import OrtGenerator, genai_available

    base = build(family, args)
    base.config.eos_token_id = base.generation_config.eos_token_id = None  # no early stop anywhere
    notes: dict[str, str] = {}
    example = {"input_ids": prompt_of(1, args)["input_ids"]}
    am = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=example, targets="all-linear", r=args.r)
    randomize_lora_b(am)
    am.eval()
    am.save_adapter(workdir / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), workdir / "adapter").eval()
    start = time.perf_counter()
    folder = workdir / "onnx"
    adaptc.export_onnx(am, folder, task="text-generation", merge=False)
    notes["export"] = f"{time.perf_counter() - start:.1f}"
    config_path = folder / "genai_config.json"  # the same thread count for onnxruntime-genai's session
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = args.threads
    config_path.write_text(json.dumps(config, indent=2))

    generation = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "pad_token_id": 0}
    session = OrtGenerator(folder, "session", threads=args.threads)
    genai = OrtGenerator(folder, "genai") if genai_available() else None
    steps: dict[str, Callable] = {}
    for batch in args.batches:
        inputs = prompt_of(batch, args)
        ids = inputs["input_ids"]
        if genai is not None:
            steps[f"{batch}|ORT genai"] = lambda g=genai, ids=ids: torch.from_numpy(
                g.generate(ids, adapter="default", max_new_tokens=args.new_tokens)[:, args.prompt:])
        steps[f"{batch}|ORT session"] = lambda ids=ids: torch.from_numpy(
            session.generate(ids, adapter="default", max_new_tokens=args.new_tokens)[:, args.prompt:])
        steps[f"{batch}|adaptc am.generate"] = lambda i=inputs: am.generate(**i, **generation)[:, args.prompt:]
        steps[f"{batch}|PEFT generate"] = lambda i=inputs: theirs.generate(**i, **generation)[:, args.prompt:]
    return steps, notes


def tables(results: dict, args: argparse.Namespace) -> str:
    lines = [f"| model | batch | variant | ms / new token | min-max | first call s | / PEFT (target <= {TARGET}) "
             "| tokens / s | tokens = PEFT |", "|---|---|---|---|---|---|---|---|---|"]
    for family, (first, times, outputs, _) in results.items():
        ms = {name: statistics.median(t) * 1000 / args.new_tokens for name, t in times.items()}
        spread = {n: f"{min(t) * 1000 / args.new_tokens:.2f}-{max(t) * 1000 / args.new_tokens:.2f}"
                  for n, t in times.items()}
        for batch in args.batches:
            peft_name = f"{batch}|PEFT generate"
            for variant in VARIANTS:
                name = f"{batch}|{variant}"
                if name not in ms:
                    continue
                ratio = ms[name] / ms[peft_name]
                to_peft = "(reference)" if variant == "PEFT generate" else \
                    f"{ratio:.2f}" + (f" ({'met' if ratio <= TARGET else 'missed'})" if variant.startswith("ORT") else "")
                check = "(reference)" if variant == "PEFT generate" else same_tokens(outputs[name], outputs[peft_name])
                tokens_s = batch * 1000 / ms[name]
                lines.append(f"| {family} | {batch} | {variant} | {ms[name]:.2f} | {spread[name]} | {first[name]:.2f} "
                             f"| {to_peft} | {tokens_s:.0f} | {check} |")
    notes = "; ".join(f"{family}: export {n['export']} s" for family, (*_, n) in results.items())
    return "\n".join(lines) + f"\n\nSet-up (not in any column): {notes}."


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
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: prompt 16, 16 new tokens, 1 round")
    parser.add_argument("--out", help="results file (default bench/RESULTS-ort-generate.md; "
                        "--quick: bench/quick-ort-generate.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.new_tokens, args.rounds = 16, 16, 1
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.out = args.out or str(HERE / ("quick-ort-generate.md" if args.quick else "RESULTS-ort-generate.md"))
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    LOAD.append(os.getloadavg()[0])
    commit = git_commit()
    import adaptc  # noqa: F401  (imported now: the code the commit above describes)

    results = {}
    for family in args.models.split(","):
        print(f"{family}: injecting, exporting, loading into PEFT, warming up ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            steps, notes = variants(family, args, Path(workdir))
            print(f"{family}: {len(steps)} variants x {args.rounds} rounds ...", file=sys.stderr, flush=True)
            results[family] = (*measure(steps, args.rounds), notes)
    text = tables(results, args)
    print(text)
    import onnxruntime
    import peft
    import transformers

    try:
        import onnxruntime_genai

        genai_version = onnxruntime_genai.__version__
    except ImportError:
        genai_version = "not installed"
    header = (
        "# Generation with ONNX Runtime: the exported folder vs am.generate vs PEFT\n\n"
        f"`python bench/bench_ort_generate.py {' '.join(argv)}`\n\n"
        f"{datetime.date.today().isoformat()}, commit {commit}. {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} heads (Llama: {args.kv_heads} key/value heads, MLP {args.intermediate}), vocab {args.vocab}; "
        f"LoRA all-linear r={args.r}, lora_B random, exported unmerged (adapter file active per request). Prompt "
        f"{args.prompt} tokens, {args.new_tokens} new tokens (greedy, no early stop); ms per new token = wall time "
        f"of one generate call / new tokens, prefill included; medians of {args.rounds} interleaved rounds after "
        f"one warm-up call each. {args.threads} thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"1-minute load average {LOAD[0]:.2f} at the start, {min(LOAD):.2f}-{max(LOAD):.2f} over the rounds "
        f"({os.cpu_count()} CPUs): figures taken under load are not meaningful. torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"onnxruntime-genai {genai_version}, Python {platform.python_version()}, {platform.machine()}, "
        f"{cpu_name()}.\n\n"
    )
    write_results(args.out, header, text)


if __name__ == "__main__":
    main()
