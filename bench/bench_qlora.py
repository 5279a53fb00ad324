"""QLoRA benchmark: weight memory, peak training memory and step time of LoRA on a Llama-style model
with an fp32, int8 or NF4 frozen base (pure PyTorch, CPU).

    .venv/bin/python bench/bench_qlora.py                 # 8 layers, hidden 1024 (a few minutes on 2 cores)
    .venv/bin/python bench/bench_qlora.py --layers 2 --hidden 256 --steps 2   # a quick look

Each configuration runs in its own process so that memory figures do not mix. Peak training
memory is the process's peak resident set size (VmHWM) over the training steps, reset just
before them (Linux ``/proc/self/clear_refs``), so building the fp32 model before quantizing
it does not count; glibc is told to return freed blocks to the system (``MALLOC_MMAP_THRESHOLD_``),
or RSS would keep counting each layer's freed dequantized weight. Prints a table and writes
bench/RESULTS-qlora.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("fp32", "int8", "nf4", "nf4-bf16")
# A fixed mmap threshold: glibc otherwise raises it after each large free and keeps freed
# blocks (a layer's dequantized weight) in the heap, so RSS would count memory no longer in use.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "TRANSFORMERS_VERBOSITY": "error"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def run_one(name: str, args: argparse.Namespace) -> dict:
    import gc

    import torch
    from adaptc.passes.quantize import QuantConfig, quantized_modules, weight_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    import adaptc

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    fp32_linear = weight_bytes(model)["full"] - model.lm_head.weight.numel() * 4  # the layers QLoRA quantizes
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    quantize = None
    if name != "fp32":
        fmt, _, compute = name.partition("-")
        quantize = QuantConfig(format=fmt, compute_dtype=compute or None)
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=args.r, alpha=2 * args.r, quantize=quantize)
    am.train()
    sizes = weight_bytes(model)
    linear_bytes = sizes["quantized"] if quantize else fp32_linear
    param_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-3)

    saved: dict[int, int] = {}

    def pack(tensor):  # what autograd keeps for the backward pass, by storage
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step() -> float:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = am(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    first_loss = step()  # warm-up: the train-mode graph, optimizer state
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_bytes = sum(n for ptr, n in saved.items() if ptr not in params)  # activations, not weights
    gc.collect()
    _reset_peak()
    rss_before = _status_kib("VmRSS")
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    return {
        "config": name,
        "quantized_layers": len(quantized_modules(model)),
        "linear_weight_mib": linear_bytes / 2**20,
        "linear_ratio": linear_bytes / fp32_linear,
        "model_weight_mib": param_bytes / 2**20,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_above_steady_mib": (peak - rss_before) / 1024,
        "saved_mib": saved_bytes / 2**20,
        "step_s": statistics.median(times),
        "loss_first": first_loss,
        "loss_last": losses[-1],
    }


def table(rows: list[dict]) -> str:
    head = ["config", "linear weights MiB", "x fp32", "all weights MiB", "RSS before steps MiB",
            "peak RSS in steps MiB", "peak - before MiB", "saved for backward MiB", "step s", "loss first -> last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['linear_weight_mib']:.1f} | {r['linear_ratio']:.3f} | {r['model_weight_mib']:.1f} | "
            f"{r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_above_steady_mib']:.0f} | {r['saved_mib']:.0f} | "
            f"{r['step_s']:.2f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=None, help="default: hidden * 11 / 4")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-qlora.md")))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0

    rows = []
    forwarded = _drop_option(sys.argv[1:], "--configs")
    for name in args.configs:
        print(f"running {name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--one", name], capture_output=True, text=True,
                              env={**os.environ, **MALLOC_ENV})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    text = table(rows)
    print(text)
    import torch

    setup = (f"LlamaForCausalLM, {args.layers} layers, hidden {args.hidden}, intermediate "
             f"{args.intermediate or args.hidden * 11 // 4}, {args.heads} heads, vocab {args.vocab}; LoRA r={args.r} on "
             f"all linear layers; AdamW; batch {args.batch} x {args.seq} tokens; {args.steps} timed steps after one "
             f"warm-up; torch {torch.__version__}, {args.threads} CPU threads.")
    Path(args.out).write_text(
        "# QLoRA benchmark (bench/bench_qlora.py)\n\n"
        f"Command: `.venv/bin/python bench/bench_qlora.py {' '.join(sys.argv[1:])}`\n\n{setup}\n\n{text}\n\n"
        "- linear weights: the layers QLoRA quantizes (every linear layer but the output head), with their "
        "scales; `x fp32` is their size over the same layers in fp32.\n"
        "- all weights: every parameter and buffer of the model (embeddings, norms, head, LoRA).\n"
        "- RSS: resident memory of the process (glibc told to return freed blocks: MALLOC_MMAP_THRESHOLD_=65536); "
        "the peak is reset just before the timed steps, so building the fp32 model first does not count.\n"
        "- saved for backward: tensors autograd keeps from the forward pass (counted once per storage, weights "
        "excluded); a dequantized weight would show here if it were kept.\n"
        "- nf4: double quantization of the scales on; nf4-bf16: compute dtype bfloat16.\n"
    )
    print(f"written to {args.out}")
    return 0


def _drop_option(argv: list[str], option: str) -> list[str]:
    """argv without ``option`` and the values that follow it."""
    out, skipping = [], False
    for arg in argv:
        if arg == option:
            skipping = True
            continue
        if skipping and not arg.startswith("--"):
            continue
        skipping = False
        out.append(arg)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
