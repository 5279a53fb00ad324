"""Inference latency: PEFT unmerged eager against adaptc merged (eager and ONNX Runtime), in one process.

    .venv/bin/python bench/bench_inference.py --layers 4 --hidden 256 --seq 128      # RESULTS.md
    .venv/bin/python bench/bench_inference.py --models gpt2 --layers 2 --hidden 64 --seq 16   # a quick look

Per model (GPT-2, Llama, BERT from transformers configs) one LoRA adapter (all-linear, r=16,
B drawn at random so the update is not zero) is saved by adaptc in PEFT's format and loaded by
PEFT, so both run the same weights. Variants, timed interleaved (one forward of each in turn,
medians over the rounds), with the same thread count for torch and ONNX Runtime:

- base eager: the model without adapter (the floor for eager);
- PEFT unmerged eager: ``PeftModel`` as loaded, LoRA computed beside every linear;
- adaptc merged eager: ``am.merge()``, the update folded into the weights;
- ORT base: adaptc's export of the model with a zero adapter (B = 0 folds to nothing);
- ORT merged: ``adaptc.export_onnx`` (merge, onnxscript ORT fusions, ORT extended optimizations);
- ORT int8: the same plus ORT dynamic int8 quantization; its accuracy change is reported as
  the largest logit difference to PEFT and the share of argmax predictions that agree.

Results go to bench/RESULTS-inference.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Interleaved timing of torch and ONNX Runtime: neither runtime's threads may busy-wait after a run
# (libgomp spins by default), or each steals the cores from the variant timed next.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora_train import build, cpu_name, interleaved_medians, write_results  # noqa: E402  (the same model builders)


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def variants(family: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    import onnxruntime as ort
    import peft

    import adaptc

    base = build(family, args).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids}

    zero = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=inputs, r=16, alpha=32)
    adaptc.export_onnx(zero, workdir / "base.onnx", latency_runs=1)

    am = adaptc.inject(copy.deepcopy(base), "lora", example_inputs=inputs, r=16, alpha=32)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    am.save_adapter(workdir / "adapter")
    report = adaptc.export_onnx(am.eval(), workdir / "merged.onnx", quantize="int8", latency_runs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), workdir / "adapter").eval()
    merged = am.merge().eval()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    # ORT's pool spins after each run and would steal the cores from the torch variant timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {name: ort.InferenceSession(str(workdir / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
                for name in ("base", "merged", "merged.int8")}
    feeds = {name: {sessions[name].get_inputs()[0].name: ids.numpy()} for name in sessions}

    def eager(model: torch.nn.Module) -> Callable:
        def run() -> np.ndarray:
            with torch.inference_mode():
                return logits_of(model(**inputs)).numpy()
        return run

    def onnx(name: str) -> Callable:
        return lambda: sessions[name].run(None, feeds[name])[0]

    steps = {
        "base eager": eager(base),
        "PEFT unmerged eager": eager(theirs),
        "adaptc merged eager": eager(merged),
        "ORT base": onnx("base"),
        "ORT merged": onnx("merged"),
        "ORT merged int8": onnx("merged.int8"),
    }
    reference = steps["PEFT unmerged eager"]()
    notes = {"fusions": ", ".join(f"{op} {n}" for op, n in sorted(report.fused_ops.items())) or "none"}
    for name in ("adaptc merged eager", "ORT merged", "ORT merged int8"):
        got = steps[name]()
        agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
        notes[name] = f"max |diff| {np.abs(got - reference).max():.1e}, argmax agrees {agree:.1%}"
    return steps, notes


def table(results: dict[str, tuple[dict[str, float], dict[str, str]]]) -> str:
    lines = ["| model | variant | ms / batch | / PEFT unmerged | / ORT base | vs PEFT output |", "|---|---|---|---|---|---|"]
    for family, (medians, notes) in results.items():
        for name, ms in medians.items():
            ort_ratio = f"{ms / medians['ORT base']:.2f}" if name.startswith("ORT") else ""
            lines.append(f"| {family} | {name} | {ms:.1f} | {ms / medians['PEFT unmerged eager']:.2f} | {ort_ratio} "
                         f"| {notes.get(name, '')} |")
        lines.append(f"| {family} | ORT fused ops | | | | {notes['fusions']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gpt2,llama,bert")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-inference.md")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = {}
    for family in args.models.split(","):
        print(f"{family}: exporting and warming up ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as workdir:
            steps, notes = variants(family, args, Path(workdir))
            results[family] = (interleaved_medians(steps, args.rounds), notes)
    text = table(results)
    print(text)
    header = (
        f"# Inference: adaptc merged (eager, ONNX Runtime) vs PEFT unmerged\n\n"
        f"`python bench/bench_inference.py {' '.join(sys.argv[1:])}`\n\n"
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}, LoRA all-linear r=16, "
        f"{args.threads} threads (torch and ORT), medians of {args.rounds} interleaved rounds. torch "
        f"{torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {cpu_name()}.\n\n"
    )
    write_results(args.out, header, text)


if __name__ == "__main__":
    main()
