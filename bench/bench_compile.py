"""Compile cost: capture + inject, and export + optimize, against depth; it must grow linearly.

    .venv/bin/python bench/bench_compile.py                    # depths 4 8 16 32, and BERT-base size
    .venv/bin/python bench/bench_compile.py --depths 2,4 --no-bert-base   # a quick look

For each depth a Llama-style decoder (hidden --hidden) is built from a config; the table gives
``adaptc.inject`` (torch.export capture, site matching, LoRA all-linear r=8 insertion, first
compile of the graph) and ``adaptc.export_onnx`` (merge, dynamo ONNX export, onnxscript ORT
fusions, ORT optimization, the parity run) wall times, and the time per layer: roughly constant
per layer means linear growth. The last row is the issue's target: capture + inject of a
12-layer BERT-base-sized model (hidden 768, 12 heads, batch 1 x 128) within 5 s.
Results go to bench/RESULTS-compile.md.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from adaptc.atomic import atomic_write_bytes


def llama(depth: int, hidden: int) -> tuple[torch.nn.Module, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 1000, (2, 32))
    return LlamaForCausalLM(config).eval(), {"input_ids": ids}


def bert_base() -> tuple[torch.nn.Module, dict]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    return BertForSequenceClassification(config).eval(), {"input_ids": torch.randint(0, 30000, (1, 128))}


def timed(fn, *args, **kwargs):
    gc.collect()
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    from bench_lora_train import cpu_name

    import adaptc

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bert-base", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-compile.md")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = ["| model | layers | capture + inject s | per layer ms | export + optimize s | per layer ms |",
            "|---|---|---|---|---|---|"]
    for depth in [int(d) for d in args.depths.split(",")]:
        print(f"llama depth {depth} ...", file=sys.stderr)
        model, inputs = llama(depth, args.hidden)
        am, inject_s = timed(adaptc.inject, model, "lora", example_inputs=inputs, r=8)
        with tempfile.TemporaryDirectory() as workdir:
            _, export_s = timed(adaptc.export_onnx, am, Path(workdir) / "m.onnx", latency_runs=1)
        rows.append(f"| Llama h{args.hidden} | {depth} | {inject_s:.2f} | {inject_s / depth * 1000:.0f} "
                    f"| {export_s:.1f} | {export_s / depth * 1000:.0f} |")
        print(rows[-1], file=sys.stderr)
    if not args.no_bert_base:
        print("BERT-base ...", file=sys.stderr)
        model, inputs = bert_base()
        _, inject_s = timed(adaptc.inject, model, "lora", example_inputs=inputs, r=8)
        rows.append(f"| BERT-base (target <= 5 s) | 12 | {inject_s:.2f} | {inject_s / 12 * 1000:.0f} | | |")
    text = "\n".join(rows)
    print(text)
    header = (
        f"# Compile cost against depth\n\n`python bench/bench_compile.py {' '.join(sys.argv[1:])}`\n\n"
        f"LoRA all-linear r=8, {args.threads} threads. torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {cpu_name()}.\n\n"
    )
    atomic_write_bytes(Path(args.out), (header + text + "\n").encode())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
