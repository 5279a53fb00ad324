"""Inference latency: PEFT unmerged eager against adaptc merged (eager and ONNX Runtime), in one process.

    .venv/bin/python bench/bench_inference.py --layers 4 --hidden 256 --seq 128      # RESULTS.md
    .venv/bin/python bench/bench_inference.py --models gpt2 --layers 2 --hidden 64 --seq 16   # a quick look
    .venv/bin/python bench/bench_inference.py --models decoders --layers 4 --hidden 256 --seq 128   # every decoder
    .venv/bin/python bench/bench_inference.py --models gpt2 --mixed-only --layers 2 --hidden 64 --seq 16

Per model one LoRA adapter (all-linear, r=16, B drawn at random so the update is not zero) is saved
by adaptc in PEFT's format and loaded by PEFT, so both run the same weights. Models: GPT-2, Llama,
BERT (``build`` of bench_lora_train.py), and every text decoder of the conformance zoo
(tests/conformance/zoo.py: OPT, Qwen2, Mistral, Falcon, Phi3, Qwen3, mixture-of-experts, ...)
scaled to ``--layers`` / ``--hidden`` / ``--heads`` / ``--vocab``; ``--models decoders`` runs all
of those. A model whose export fails gets one row saying why. Variants, timed interleaved (one
forward of each in turn, medians over the rounds), with the same thread count for torch and ONNX
Runtime:

- base eager: the model without adapter (the floor for eager);
- PEFT unmerged eager: ``PeftModel`` as loaded, LoRA computed beside every linear;
- adaptc merged eager: ``am.merge()``, the update folded into the weights;
- ORT base: adaptc's export of the model with a zero adapter (B = 0 folds to nothing);
- ORT merged: ``adaptc.export_onnx`` (merge, onnxscript ORT fusions, ORT extended optimizations);
- ORT int8: the same plus ORT dynamic int8 quantization; its accuracy change is reported as
  the largest logit difference to PEFT and the share of argmax predictions that agree.

The mixed-adapter batch (``--mixed``, a second table): 8 rows over 4 LoRA adapters (ranks 8 to 32,
two rows each) in one call, against the same rows as one call per adapter:

- ORT mixed batch: ``export_onnx(..., mixed_adapters=True)``, one run with ``adapter_index``;
- ORT adapters one after another: the unmerged export, one run of each adapter's 2 rows with its
  ``.onnx_adapter`` active (``RunOptions.add_active_adapter``);
- PEFT mixed eager: ``PeftModel(..., adapter_names=[...])``, the 4 adapters loaded from adaptc's files;
- adaptc mixed eager: ``am(..., adapter_names=[...])``.

``--cpu-time`` (with ``--threads 1``) times with the thread's CPU clock instead of the wall clock:
robust to a busy machine, where wall times mean little; ``--profile`` adds ORT's profiler op-time shares
of each merged export (where its time goes). Figures for the docs need a quiet machine.

Results go to bench/RESULTS-inference.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import traceback
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


BUILT_HERE = ("gpt2", "llama", "bert")  # bench_lora_train.build; the other decoders come from the conformance zoo


def zoo_decoders() -> dict[str, Callable[[], torch.nn.Module]]:
    """The conformance zoo's text decoders (causal LMs taking input_ids), by name: GPT-2 and Llama included."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "conformance"))
    from zoo import LLMS, TRANSFORMERS

    return {arch.id: arch.build for arch in TRANSFORMERS + LLMS
            if arch.peft_task == "CAUSAL_LM" and arch.family == "transformers"}


def build_model(family: str, args: argparse.Namespace) -> torch.nn.Module:
    """GPT-2, Llama and BERT as bench_lora_train builds them; a zoo decoder with its config scaled to the bench size."""
    if family in BUILT_HERE:
        return build(family, args)
    decoders = zoo_decoders()
    if family not in decoders:
        raise SystemExit(f"unknown model {family!r}: one of {', '.join(sorted({*BUILT_HERE, *decoders}))}")
    config = scaled_config(decoders[family]().config, args)
    torch.manual_seed(0)
    return type(decoders[family]())(config)


def scaled_config(config, args: argparse.Namespace):
    """The zoo's small config at the bench's size: width, depth, heads and vocabulary; the widths derived
    from them (MLP, head size, experts, key/value heads in the zoo's proportion) follow."""
    config = copy.deepcopy(config)
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    wanted = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, vocab_size=args.vocab,
                  intermediate_size=args.hidden * 11 // 4, ffn_dim=args.hidden * 4, word_embed_proj_dim=args.hidden,
                  moe_intermediate_size=args.hidden, n_inner=args.hidden * 4)
    if heads:  # an attention model (not Mamba)
        wanted.update(num_attention_heads=args.heads, head_dim=args.hidden // args.heads)
        if getattr(config, "qk_rope_head_dim", None) is not None:  # latent attention: head_dim is the rotary part
            del wanted["head_dim"]
        if isinstance(kv, int) and kv:  # grouped-query: the zoo's ratio of query to key/value heads
            wanted["num_key_value_heads"] = max(1, args.heads * kv // heads)
    for name in ("max_position_embeddings", "n_positions"):
        if getattr(config, name, None) is not None:
            wanted[name] = max(getattr(config, name), args.seq)
    if getattr(config, "layer_types", None) is not None:  # one entry per layer (Gemma 3's local/global)
        wanted["layer_types"] = [config.layer_types[i % len(config.layer_types)] for i in range(args.layers)]
    for name, value in wanted.items():
        if getattr(config, name, None) is None:
            continue  # a field this architecture does not have
        try:
            setattr(config, name, value)
        except AttributeError:  # a derived property (Falcon's head_dim): it follows the others
            pass
    return config


def variants(family: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    import onnxruntime as ort
    import peft

    import adaptc

    base = build_model(family, args).eval()
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

    sessions = {name: ort.InferenceSession(str(workdir / f"{name}.onnx"), session_options(args),
                                           providers=["CPUExecutionProvider"])
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
    if args.profile:
        notes["op time"] = op_time_shares(workdir / "merged.onnx", feeds["merged"], args)
    return steps, notes


def op_time_shares(path: Path, feeds: dict, args: argparse.Namespace, runs: int = 5, top: int = 6) -> str:
    """ORT's profiler on ``path``: the op types taking the most kernel time, as shares of the total (relative
    figures: a busy machine slows every op alike, roughly) and node counts."""
    import json
    from collections import Counter

    import onnxruntime as ort

    options = session_options(args)
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    time_of, count = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_of[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    total = sum(time_of.values()) or 1
    return ", ".join(f"{op} {100 * t / total:.0f}% (x{round(count[op] / runs)})" for op, t in time_of.most_common(top))


def session_options(args: argparse.Namespace):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # ORT's pool spins after each run and would steal the cores from the torch variant timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


MIXED_RANKS = (8, 16, 24, 32)  # four adapters, two rows each


def mixed_variants(family: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    """8 rows over 4 adapters: one mixed ORT run, one ORT run per adapter, PEFT's and adaptc's mixed eager."""
    import onnxruntime as ort
    import peft

    import adaptc

    base = build_model(family, args).eval()
    rows = len(MIXED_RANKS) * 2
    ids = torch.randint(0, args.vocab, (rows, args.seq), generator=torch.Generator().manual_seed(2))
    names = [f"a{i}" for i in range(len(MIXED_RANKS))]
    am = adaptc.inject(copy.deepcopy(base), "lora", example_inputs={"input_ids": ids[:2]}, adapter_name=names[0],
                       r=MIXED_RANKS[0], alpha=16)
    for name, rank in zip(names[1:], MIXED_RANKS[1:]):
        am.add_adapter(name, r=rank, alpha=16)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    am.eval()
    am.save_adapter(workdir / "adapters")
    mixed = adaptc.export_onnx(am, workdir / "mixed.onnx", mixed_adapters=True, latency_runs=1)
    unmerged = adaptc.export_onnx(am, workdir / "unmerged.onnx", merge=False, latency_runs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # save_adapter writes each adapter not named "default" to a subfolder of its own
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), workdir / "adapters" / names[0],
                                                adapter_name=names[0])
        for name in names[1:]:
            theirs.load_adapter(workdir / "adapters" / name, adapter_name=name)
    theirs.eval()
    row_names = [names[i % len(names)] for i in range(rows)]  # interleaved: each adapter's rows are not adjacent
    index = np.array([mixed.mixed_adapters.index(n) for n in row_names], dtype=np.int64)
    options = session_options(args)
    mixed_session = ort.InferenceSession(str(workdir / "mixed.onnx"), options, providers=["CPUExecutionProvider"])
    plain_session = ort.InferenceSession(str(workdir / "unmerged.onnx"), options, providers=["CPUExecutionProvider"])
    # RunOptions does not keep its adapter alive: the LoraAdapter objects must live as long as the options
    # (measured: once they were garbage-collected, the next run failed with std::bad_alloc).
    loaded, run_options = {}, {}
    for name, file in unmerged.adapters.items():
        loaded[name] = ort.LoraAdapter()
        loaded[name].Load(file)
        run_options[name] = ort.RunOptions()
        run_options[name].add_active_adapter(loaded[name])
    groups = {name: [i for i, n in enumerate(row_names) if n == name] for name in names}
    feeds = ids.numpy()

    def one_after_another(adapters: dict = loaded) -> np.ndarray:  # holds the adapters (see above)
        out = None
        for name, where in groups.items():
            got = plain_session.run(None, {"input_ids": feeds[where]}, run_options[name])[0]
            out = np.empty((rows, *got.shape[1:]), got.dtype) if out is None else out
            out[where] = got
        return out

    def eager(model) -> Callable:
        def run() -> np.ndarray:
            with torch.inference_mode():
                return logits_of(model(input_ids=ids, adapter_names=row_names)).numpy()
        return run

    steps = {
        "PEFT mixed eager": eager(theirs),
        "adaptc mixed eager": eager(am),
        "ORT adapters one after another": one_after_another,
        "ORT mixed batch": lambda: mixed_session.run(None, {"input_ids": feeds, "adapter_index": index})[0],
    }
    reference = steps["PEFT mixed eager"]()
    notes = {}
    for name in ("adaptc mixed eager", "ORT adapters one after another", "ORT mixed batch"):
        notes[name] = f"max |diff| {np.abs(steps[name]() - reference).max():.1e}"
    return steps, notes


def mixed_table(results: dict[str, tuple[dict[str, float], dict[str, str]]]) -> str:
    lines = ["| model | variant | ms / batch | / PEFT mixed | vs PEFT output |", "|---|---|---|---|---|"]
    for family, (medians, notes) in results.items():
        if "failed" in notes:
            lines.append(f"| {family} | not measured | | | {notes['failed']} |")
            continue
        for name, ms in medians.items():
            lines.append(f"| {family} | {name} | {ms:.1f} | {ms / medians['PEFT mixed eager']:.2f} | {notes.get(name, '')} |")
    return "\n".join(lines)


def table(results: dict[str, tuple[dict[str, float], dict[str, str]]]) -> str:
    lines = ["| model | variant | ms / batch | / PEFT unmerged | / ORT base | vs PEFT output |", "|---|---|---|---|---|---|"]
    for family, (medians, notes) in results.items():
        if "failed" in notes:
            lines.append(f"| {family} | not measured | | | | {notes['failed']} |")
            continue
        for name, ms in medians.items():
            ort_ratio = f"{ms / medians['ORT base']:.2f}" if name.startswith("ORT") else ""
            lines.append(f"| {family} | {name} | {ms:.1f} | {ms / medians['PEFT unmerged eager']:.2f} | {ort_ratio} "
                         f"| {notes.get(name, '')} |")
        lines.append(f"| {family} | ORT fused ops | | | | {notes['fusions']} |")
        if "op time" in notes:
            lines.append(f"| {family} | ORT merged op time | | | | {notes['op time']} |")
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
    parser.add_argument("--models", default="gpt2,llama,bert",
                        help="comma-separated; 'decoders': every text decoder of the conformance zoo")
    parser.add_argument("--mixed", action="store_true", help="also the mixed-adapter batch (a second table)")
    parser.add_argument("--mixed-only", action="store_true", help="only the mixed-adapter batch")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU clock (with --threads 1: robust to a busy machine)")
    parser.add_argument("--profile", action="store_true",
                        help="a row of ORT profiler op-time shares for each merged export (relative: robust to load)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-inference.md")))
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    families = args.models.split(",")
    if families == ["decoders"]:
        families = list(zoo_decoders())
    results, mixed = {}, {}
    for family in families:
        with tempfile.TemporaryDirectory() as workdir:
            if not args.mixed_only:
                print(f"{family}: exporting and warming up ...", file=sys.stderr)
                results[family] = measured(variants, family, args, Path(workdir), clock)
            if args.mixed or args.mixed_only:
                print(f"{family}: mixed-adapter batch ...", file=sys.stderr)
                mixed[family] = measured(mixed_variants, family, args, Path(workdir) / "mixed", clock)
    text = "\n\n".join(part for part in (table(results) if results else "", mixed_table(mixed) if mixed else "") if part)
    print(text)
    header = (
        f"# Inference: adaptc merged (eager, ONNX Runtime) vs PEFT unmerged\n\n"
        f"`python bench/bench_inference.py {' '.join(sys.argv[1:])}`\n\n"
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}, LoRA all-linear r=16, "
        f"{args.threads} threads (torch and ORT), medians of {args.rounds} interleaved rounds"
        f"{' (thread CPU time)' if args.cpu_time else ''}. torch "
        f"{torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {cpu_name()}.\n\n"
    )
    write_results(args.out, header, text)


def measured(make: Callable, family: str, args: argparse.Namespace, workdir: Path,
             clock: Callable[[], float]) -> tuple[dict[str, float], dict[str, str]]:
    """Medians of ``make``'s variants; a model that cannot be exported or run gets its error as a note."""
    workdir.mkdir(exist_ok=True)
    try:
        steps, notes = make(family, args, workdir)
    except Exception as error:  # noqa: BLE001 - one model's failure is a row of the table, not the end of the run
        traceback.print_exc()
        reason = " ".join(str(error).split())[:160].replace("|", "/")
        return {}, {"failed": f"{type(error).__name__}: {reason}"}
    return interleaved_medians(steps, args.rounds, clock), notes


if __name__ == "__main__":
    main()
