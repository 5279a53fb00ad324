"""LoRA training step time and memory: adaptc against PEFT, full fine-tuning and the frozen floor.

    .venv/bin/python bench/bench_lora_train.py                      # the issue's sizes (slow on 2 cores)
    .venv/bin/python bench/bench_lora_train.py --layers 4 --hidden 256 --seq 128   # what RESULTS.md records

For each model (GPT-2, Llama, BERT from transformers configs; a timm ViT) every variant is
built from the same weights and batch. Time: one round runs one AdamW step of each variant in
turn (interleaved in one process, so machine noise hits all alike); the table reports medians
over the rounds, each as a multiple of the floor (the frozen model's forward plus the backward
to its inputs, no weight gradient), and adaptc's as a ratio to PEFT's. Memory: each variant
runs again alone in a fresh subprocess; "saved" is what autograd keeps for the backward
(activations, by storage, weights excluded) and "peak" the process's resident-set growth over
a step (VmHWM after a reset). "adaptc unfused" is adaptc with fuse_siblings=False: the same
compiler without the sibling fusion (passes/lora_fused.py), to show what that lever gives.
FLOPs: one more step of each variant under torch.utils.flop_counter, matrix multiplies only; "x floor
FLOP" against "x floor" (time) shows how much of a variant's time over the floor is arithmetic it
must do, and how much is overhead.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from adaptc.atomic import atomic_write_bytes

# name: ({family: targets} or one target for all, r, alpha, dropout)
QV = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "vit": ["qkv"]}
ALL = {"gpt2": "all-linear", "llama": "all-linear", "bert": "all-linear", "vit": ["qkv", "proj", "fc1", "fc2"]}
CONFIGS = {
    "q/v r=8": (QV, 8, 16, 0.0),
    "all-linear r=16": (ALL, 16, 32, 0.0),
    "all-linear r=16 dropout 0.05": (ALL, 16, 32, 0.05),
}
IMPLEMENTATIONS = ("PEFT", "adaptc", "adaptc unfused")


# --- models and batches --------------------------------------------------------------------------

def build(family: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.hidden,
                                          n_layer=args.layers, n_head=args.heads, tie_word_embeddings=False))
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                            intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                            num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                            tie_word_embeddings=False))
    if family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                                        intermediate_size=args.hidden * 4, num_labels=4))
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=args.image, depth=args.layers,
                             num_classes=10)


def make_batch(family: str, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"x": torch.randn(args.batch, 3, args.image, args.image, generator=generator),
                "target": torch.randint(0, 10, (args.batch,), generator=generator)}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    if family == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 4, (args.batch,), generator=generator)}
    return {"input_ids": ids, "labels": ids}


def loss_of(model: torch.nn.Module, family: str, batch: dict) -> torch.Tensor:
    if family == "vit":
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["target"])
    return model(**batch).loss


def targets_for(family: str, config: str):
    targets, r, alpha, dropout = CONFIGS[config]
    return targets[family], r, alpha, dropout


# --- variants --------------------------------------------------------------------------------------

def make_step(model: torch.nn.Module, family: str, batch: dict) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = loss_of(model, family, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_floor(model: torch.nn.Module, family: str, batch: dict) -> Callable[[], None]:
    for p in model.parameters():
        p.requires_grad_(False)

    def step() -> None:
        if family == "vit":
            x = batch["x"].clone().requires_grad_(True)
            loss = loss_of(model, family, {**batch, "x": x})
        else:
            inputs = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            rest = {k: v for k, v in batch.items() if k != "input_ids"}
            loss = model(inputs_embeds=inputs, **rest).loss
        loss.backward()

    return step


def make_variant(name: str, family: str, base: torch.nn.Module, batch: dict,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Callable[[], None]:
    """One variant's training step; ``wrap`` (e.g. ``torch.compile``) is applied to the adapted model."""
    import adaptc

    model = copy.deepcopy(base)
    model.train()
    if name == "floor":
        return make_floor(model, family, batch)
    if name == "full fine-tuning":
        return make_step(model, family, batch)
    implementation, config = name.split(" | ")
    targets, r, alpha, dropout = targets_for(family, config)
    if implementation == "PEFT":
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapted = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                                 target_modules=targets))
    else:
        example = (batch["x"],) if family == "vit" else {k: v for k, v in batch.items()}
        adapted = adaptc.inject(model, "lora", example_inputs=example, targets=targets, r=r, alpha=alpha,
                                dropout=dropout, fuse_siblings=implementation == "adaptc")
    adapted.train()
    return make_step(adapted if wrap is None else wrap(adapted), family, batch)


def variant_names() -> list[str]:
    return ["floor", "full fine-tuning"] + [f"{impl} | {config}" for config in CONFIGS for impl in IMPLEMENTATIONS]


# --- measuring -------------------------------------------------------------------------------------

def interleaved_medians(steps: dict[str, Callable[[], object]], rounds: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Warm every step up, then time one call of each in turn per round; median ms per step.

    Shared by every benchmark here: interleaving makes machine noise hit all variants alike.
    """
    for step in steps.values():  # warm-up: first-call capture, allocator, optimizer state
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def cpu_name() -> str:
    """The CPU's model and the vector extensions that decide these timings (from /proc/cpuinfo on Linux):
    results from different machines are not comparable, and the header should say which one ran."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(vector)})" if vector else name


def write_results(out: str | Path, header: str, text: str) -> None:
    """The table with its header (command line, sizes, versions) to ``out``, atomically."""
    atomic_write_bytes(Path(out), (header + text + "\n").encode())
    print(f"written to {out}", file=sys.stderr)


def measure_time(family: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per step of every variant, and the matrix-multiply FLOPs of one step of each."""
    base, batch = build(family, args), make_batch(family, args)
    steps = {name: make_variant(name, family, base, batch) for name in variant_names()}
    medians = interleaved_medians(steps, args.rounds, time.thread_time if args.cpu_time else time.perf_counter)
    return medians, {name: step_flops(step) for name, step in steps.items()}


def step_flops(step: Callable[[], None]) -> float:
    """FLOPs of one step's matrix multiplies (mm, addmm, bmm, attention; forward and backward), as
    torch.utils.flop_counter counts them: what the step must compute, however fast it runs.

    The counter knows neither ``addmm_`` (adaptc's fused groups accumulate into outputs with it) nor
    CPU attention's kernels; they get the formulas of ``addmm`` and of flash attention.
    """
    from torch.utils import flop_counter

    def addmm_(self_shape, mat1, mat2, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.mm_flop(mat1, mat2)

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten.addmm_: addmm_,
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward,
    })
    with counter:
        step()
    return float(counter.get_total_flops())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_of_one(family: str, name: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a fresh process: autograd's saved bytes and the RSS peak of one step of one variant."""
    base, batch = build(family, args), make_batch(family, args)
    step = make_variant(name, family, base, batch)
    step()
    step()
    params = {p.untyped_storage().data_ptr() for p in base.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak = _status_kib("VmHWM")
    weights = {p.untyped_storage().data_ptr() for p in base.parameters()} | params
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    return {"saved_mib": activations / 2**20, "peak_mib": (peak - before) / 1024}


def measure_memory(family: str, args: argparse.Namespace, argv: list[str]) -> dict[str, dict[str, float]]:
    results = {}
    for name in variant_names():
        command = [sys.executable, __file__, *argv, "--memory-one", f"{family}::{name}"]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory run of {family} / {name} failed:\n{proc.stderr[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# --- report ----------------------------------------------------------------------------------------

def table(times: dict[str, dict[str, float]], memory: dict[str, dict[str, dict[str, float]]],
          flops: dict[str, dict[str, float]]) -> str:
    lines = ["| model | variant | ms / step | x floor | adaptc / PEFT | GFLOP / step | x floor FLOP "
             "| saved for backward MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, medians in times.items():
        floor = medians["floor"]
        counts = flops[family]
        for name, ms in medians.items():
            ratio = ""
            implementation, _, config = name.partition(" | ")
            if implementation.startswith("adaptc"):
                ratio = f"{ms / medians['PEFT | ' + config]:.2f}"
            mem = memory.get(family, {}).get(name)
            saved = f"{mem['saved_mib']:.0f}" if mem else ""
            peak = f"{mem['peak_mib']:.0f}" if mem else ""
            label = name.replace(" | ", " ")
            lines.append(f"| {family} | {label} | {ms:.0f} | {ms / floor:.2f} | {ratio} | {counts[name] / 1e9:.1f} "
                         f"| {counts[name] / counts['floor']:.3f} | {saved} | {peak} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--image", type=int, default=224, help="ViT image side (patch 16)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gpt2,llama,bert,vit")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU clock (with --threads 1: robust to a busy machine)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-lora-train.md")))
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.memory_one:
        family, name = args.memory_one.split("::")
        print(json.dumps(memory_of_one(family, name, args)))
        return
    forwarded = [a for a in argv if a != "--no-memory"]
    times, memory, flops = {}, {}, {}
    for family in args.models.split(","):
        print(f"{family}: timing {len(variant_names())} variants ...", file=sys.stderr)
        times[family], flops[family] = measure_time(family, args)
        if not args.no_memory:
            print(f"{family}: memory, one subprocess per variant ...", file=sys.stderr)
            memory[family] = measure_memory(family, args, forwarded)
    text = table(times, memory, flops)
    print(text)
    header = (
        f"# LoRA training step: adaptc vs PEFT\n\n`python bench/bench_lora_train.py {' '.join(argv)}`\n\n"
        f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq} (ViT: {args.image}px), AdamW, "
        f"{args.threads} threads, medians of {args.rounds} interleaved rounds"
        f"{' (thread CPU time)' if args.cpu_time else ''}. torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {cpu_name()}.\n\n"
    )
    write_results(args.out, header, text)


if __name__ == "__main__":
    main()
