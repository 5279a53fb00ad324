"""Peak memory of one LoRA training step: adaptc (plain, checkpointed, chunked loss, NF4) against PEFT.

    .venv/bin/python bench/bench_memory.py                  # Llama 6 layers, hidden 512, vocab 8192, 1 x 2048 tokens
    .venv/bin/python bench/bench_memory.py --tokens 4096 --vocab 32000
    .venv/bin/python bench/bench_memory.py --quick          # tiny smoke run (under a minute)

Every variant runs alone in a fresh subprocess (so peaks do not mix), with
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` (large blocks go back to the system when freed,
so the resident set follows what is live). The process builds the model, injects, runs two warm-up
steps (capture, optimizer state), then resets VmHWM (``echo 5 > /proc/self/clear_refs``) and runs one
step: forward, backward, AdamW on the adapter. "peak" is VmHWM after the step minus VmRSS before it:
what the step adds on top of the warmed-up process (activations, gradients, temporaries; weights and
optimizer state are already there). "step" is the median of ``--steps`` more steps.

LoRA all-linear r=16, alpha 32, no dropout. Results go to bench/RESULTS-memory.md with ratios against
PEFT and PEFT + gradient checkpointing, and, worked from the measured bytes per token, the longest
sequence a 1B- and an 8B-shaped Llama fits in 24 GiB with each variant.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_train import cpu_name, write_results  # noqa: E402

# name: (implementation, checkpointing policy or None, chunked loss, quantize)
VARIANTS = {
    "PEFT": ("peft", None, False, None),
    "PEFT + checkpointing": ("peft", "full", False, None),
    "adaptc": ("adaptc", None, False, None),
    "adaptc + ckpt full": ("adaptc", "full", False, None),
    "adaptc + ckpt selective": ("adaptc", "selective", False, None),
    "adaptc + chunked loss": ("adaptc", None, True, None),
    "adaptc + ckpt full + chunked loss": ("adaptc", "full", True, None),
    "adaptc + ckpt full + chunked loss + NF4": ("adaptc", "full", True, "nf4"),
}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
CHUNK = 1024  # am.chunked_loss's default chunk_size

# the shapes worked on paper: (layers, hidden, intermediate, vocab, parameters)
SHAPES = {
    "1B (16 x 2048, 8192, vocab 128256)": (16, 2048, 8192, 128256),
    "8B (32 x 4096, 14336, vocab 128256)": (32, 4096, 14336, 128256),
}
BUDGET = 24 * 2**30


# --- one variant, in its own process ---------------------------------------------------------------

def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.tokens), tie_word_embeddings=False, attn_implementation="sdpa"))
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def adapted(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    implementation, policy, chunked, quantize = VARIANTS[name]
    model, batch = build(args)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if implementation == "peft":
            import peft

            if policy:
                model.gradient_checkpointing_enable({"use_reentrant": False})
                model.enable_input_require_grads()
            am = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                             target_modules="all-linear"))
        else:
            import adaptc

            am = adaptc.inject(model, "lora", example_inputs=batch, targets="all-linear", r=16, alpha=32,
                               dropout=0.0, quantize=quantize)
            if policy:
                am.gradient_checkpointing_enable({"policy": policy})
            if chunked:
                am.chunked_loss(True)
    am.train()
    return am, batch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(name: str, args: argparse.Namespace) -> dict[str, float]:
    am, batch = adapted(name, args)
    optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = am(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    step()
    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    loss = step()
    peak = _status_kib("VmHWM") - before
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 1024, "step_s": statistics.median(times), "loss": loss,
            "rss_mib": before / 1024}


def start_variant(name: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, **MALLOC_ENV}
    return subprocess.Popen([sys.executable, __file__, *argv, "--one", name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def result_of(name: str, proc: subprocess.Popen) -> dict[str, float]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


# --- on paper: the longest sequence in 24 GiB ----------------------------------------------------

def weight_bytes(layers: int, hidden: int, intermediate: int, vocab: int, nf4: bool) -> float:
    """Llama with grouped-query attention as the real 1B / 8B have it (8 key-value heads of 64 / 128: k, v
    take hidden / 4 columns each), untied head. bf16: 2 bytes a weight; NF4: the linear weights of the
    blocks at 0.5 bytes plus one fp32 absmax per 64 (0.5625 bytes), embedding and LM head in bf16."""
    kv = hidden // 4
    block_linear = hidden * (hidden + 2 * kv + hidden) + 3 * hidden * intermediate
    per_linear_byte = 0.5625 if nf4 else 2.0
    return layers * block_linear * per_linear_byte + 2 * vocab * hidden * 2.0


def adapter_bytes(layers: int, hidden: int, intermediate: int, r: int = 16) -> float:
    """LoRA A and B of every linear in fp32, their gradients and AdamW's two moments: 16 bytes a parameter."""
    kv = hidden // 4
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
              (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return layers * sum(r * (i + o) for i, o in shapes) * 16.0


def split_bytes_per_token(results: dict[str, dict], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Each variant's measured bytes per token, split into a part per layer and a part of the LM head.

    The head part (the [tokens, vocab] logits, their fp32 loss copies and gradient) is what chunking the
    loss removes: for a variant without the chunked loss it is its peak minus the peak of its chunked
    counterpart (adaptc's plain and full-checkpointing variants are measured both ways; selective takes
    plain's head part, PEFT and PEFT + checkpointing adaptc's plain one). The rest is divided by the layers.
    """
    per_token = {n: r["peak_mib"] * 2**20 / args.tokens for n, r in results.items()}
    head_plain = max(0.0, per_token["adaptc"] - per_token["adaptc + chunked loss"])
    head_full = max(0.0, per_token["adaptc + ckpt full"] - per_token["adaptc + ckpt full + chunked loss"])
    head = {"adaptc": head_plain, "adaptc + ckpt full": head_full, "adaptc + ckpt selective": head_plain,
            "PEFT": head_plain, "PEFT + checkpointing": head_full}
    split = {}
    for name, b in per_token.items():
        h = head.get(name, 0.0)
        split[name] = (max(0.0, b - h) / args.layers, h)
    return split


def longest_sequence(split: tuple[float, float], chunked: bool, nf4: bool, shape: tuple, args: argparse.Namespace) -> int:
    layers, hidden, intermediate, vocab = shape
    per_layer, head = split
    width = (hidden + intermediate) / (args.hidden + args.intermediate)
    per_token = (layers * per_layer * width + head * vocab / args.vocab) / 2  # bf16 activations: half of fp32
    fixed = weight_bytes(layers, hidden, intermediate, vocab, nf4) + adapter_bytes(layers, hidden, intermediate)
    if chunked:  # one chunk's logits, fp32 copy and gradient, whatever the sequence
        fixed += 3 * CHUNK * vocab * 4
    free = BUDGET - fixed
    return int(free // per_token) if free > 0 and per_token > 0 else 0


# --- report ---------------------------------------------------------------------------------------

def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    peft, ckpt = results["PEFT"], results["PEFT + checkpointing"]
    lines = ["| variant | peak MiB | x PEFT | x PEFT+ckpt | step s | x PEFT+ckpt time | KiB / token |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['peak_mib']:.0f} | {r['peak_mib'] / peft['peak_mib']:.2f} | "
                     f"{r['peak_mib'] / ckpt['peak_mib']:.2f} | {r['step_s']:.2f} | {r['step_s'] / ckpt['step_s']:.2f} | "
                     f"{r['peak_mib'] * 1024 / args.tokens:.1f} |")
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> str:
    ckpt, peft = results["PEFT + checkpointing"], results["PEFT"]
    ours = {n: r for n, r in results.items() if n.startswith("adaptc")}
    fast = {n: r for n, r in ours.items() if r["step_s"] <= ckpt["step_s"]}
    lines = []
    if fast:
        best = min(fast, key=lambda n: fast[n]["peak_mib"])
        ratio = fast[best]["peak_mib"] / ckpt["peak_mib"]
        lines.append(f"- adaptc's best peak at no more than PEFT+checkpointing's step time: {best}, "
                     f"{ratio:.2f}x its peak, {fast[best]['step_s'] / ckpt['step_s']:.2f}x its time "
                     f"(target <= 0.6x): {'met' if ratio <= 0.6 else 'NOT met'}")
    else:
        lines.append("- no adaptc variant is as fast as PEFT + checkpointing (target: <= 0.6x its peak at no "
                     "more than its step time): NOT met")
    best_any = min(ours, key=lambda n: ours[n]["peak_mib"])
    lines.append(f"- adaptc's lowest peak at any step time: {best_any}, "
                 f"{ours[best_any]['peak_mib'] / ckpt['peak_mib']:.2f}x PEFT+checkpointing's peak, "
                 f"{ours[best_any]['step_s'] / ckpt['step_s']:.2f}x its time")
    ratio = results["adaptc"]["peak_mib"] / peft["peak_mib"]
    lines.append(f"- adaptc without checkpointing: {ratio:.2f}x PEFT's peak (target <= 1.0): "
                 f"{'met' if ratio <= 1.0 else 'NOT met'}")
    return "\n".join(lines)


def paper(results: dict[str, dict], args: argparse.Namespace) -> str:
    split = split_bytes_per_token(results, args)
    names = list(SHAPES)
    lines = ["| variant | per layer B / token (measured, fp32) | LM head B / token | " + " | ".join(
        f"{n}: longest sequence" for n in names) + " |", "|---" * (3 + len(names)) + "|"]
    for name, (per_layer, head) in split.items():
        _, _, chunked, quantize = VARIANTS[name]
        cells = []
        for shape in SHAPES.values():
            n = longest_sequence((per_layer, head), chunked, quantize == "nf4", shape, args)
            cells.append(f"{n:,}" if n else "does not fit")
        lines.append(f"| {name} | {per_layer:.0f} | {head:.0f} | " + " | ".join(cells) + " |")
    weights = "; ".join(
        f"{n.split()[0]}: weights {weight_bytes(*s, nf4=False) / 2**30:.2f} GiB bf16, "
        f"{weight_bytes(*s, nf4=True) / 2**30:.2f} GiB NF4, adapter + grads + AdamW {adapter_bytes(*s[:3]) / 2**30:.2f} GiB"
        for n, s in SHAPES.items())
    return "\n".join(lines) + f"\n\n{weights}."


ARITHMETIC = """\
How the longest sequences are worked out (on paper, from the measured peaks above; not measured on
those models): each variant's peak divided by the tokens is its bytes per token at this size (fp32
activations). That is split into a part of the LM head (the [tokens, vocab] logits, their fp32 loss
copy and gradient; what chunking the loss removes, so it is the peak of the variant minus the peak of
its chunked counterpart; selective, PEFT and PEFT + checkpointing take the head part of adaptc's plain
or full-checkpointing variant) and a part per layer (the rest, over the layers). For the target shape,
the per-layer part is scaled by the layer count and by (hidden + intermediate) over this model's, the
head part by the vocabulary over this one's, and the sum is halved for bf16 activations. The fixed
part is the weights (bf16: 2 bytes a weight; NF4: 0.5625 bytes a block linear weight, embedding and LM
head in bf16; grouped-query attention with k and v at hidden / 4 as in the real models), the adapter
(r=16 on every linear) with its gradient and AdamW state (16 bytes a parameter), and for the chunked
variants one chunk's logits, fp32 copy and gradient (3 x 1024 x vocab x 4 bytes). The longest sequence
is (24 GiB - fixed) / bytes per token, for batch 1. It ignores the allocator's fragmentation and
attention's workspace (SDPA's kernels keep memory linear in the sequence), so read it as an upper
bound to within some tens of percent; it ranks the variants faithfully because all share the same
assumptions."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="sequence length (batch 1)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 2 layers, hidden 64, 256 tokens")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-memory.md")))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 64, 176, 4
        args.tokens, args.vocab, args.steps, args.threads = 256, 512, 1, 1
    return args


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    results = {}
    if args.quick:  # a smoke run: every variant at once (each still in its own process; times meaningless)
        procs = {name: start_variant(name, argv) for name in names}
        results = {name: result_of(name, proc) for name, proc in procs.items()}
    for name in names:
        if name not in results:  # one at a time: peaks and times undisturbed
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = result_of(name, start_variant(name, argv))
    text = table(results, args)
    print(text)
    if not set(VARIANTS) <= set(results):
        return
    goals = targets(results)
    print(goals)
    on_paper = paper(results, args)
    print(on_paper)
    if args.quick:
        return
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = (
        f"# Peak memory of a LoRA training step: adaptc vs PEFT\n\n`python bench/bench_memory.py {' '.join(argv)}`\n\n"
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit()} (with the working "
        f"tree's changes), {cpu_name()}, load average {load} at the end. Llama {args.layers} layers, hidden "
        f"{args.hidden}, intermediate {args.intermediate}, {args.heads} heads, vocab {args.vocab}, batch 1 x "
        f"{args.tokens} tokens, LoRA all-linear r=16, no dropout, AdamW, {args.threads} threads, torch "
        f"{torch.__version__}, Python {platform.python_version()}. Each variant in its own process with "
        f"`MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`; peak = VmHWM over one step minus VmRSS of "
        f"the warmed-up process before it; step = median of {args.steps} steps.\n\n"
    )
    body = (f"{text}\n\nTargets:\n\n{goals}\n\n## Longest sequence in 24 GiB (on paper)\n\n{on_paper}\n\n"
            f"{ARITHMETIC}")
    write_results(args.out, header, body)


if __name__ == "__main__":
    main()
