"""``adaptc train``: train a saved adapter on the batches a model file provides.

The model file defines, besides ``build_model()`` and ``example_inputs()``:
``train_batches()`` (an iterable of input dicts; called once per epoch), optionally
``eval_batches()`` and ``metric(output, batch)`` (higher is better; the best checkpoint follows
it), and ``loss(output, batch)`` where the model's output has no ``.loss``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .api import load_adapter
from .cli_common import CliError, build_module_from_file, failed_in_user_code, load_model_file
from .train import TrainConfig, train

EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT

TRAIN_EPILOG = """\
examples:
  adaptc inject examples/text_classification.py --method lora --r 8 -o out/
  adaptc train  examples/text_classification.py --adapter out/ --steps 20 --lr 2e-3
  adaptc train  examples/text_classification.py --adapter out/ --epochs 2 --batch-accum 2 --bf16
  adaptc train  examples/text_classification.py --adapter out/ --steps 20 --lr 2e-3 --resume
  adaptc export examples/text_classification.py --adapter out/best -o model.onnx

model.py defines train_batches() (an iterable of input dicts; entries the model's forward does
not take by name, such as labels for loss(), stay in the batch for loss() and metric()), and
optionally eval_batches(), metric(output, batch) (higher is better) and loss(output, batch)
(needed when the model's output has no .loss).

Writes into the adapter folder: last/ and best/ (adapters loadable with --adapter, plus the state
--resume needs), train_log.json and loss.png. Ctrl-C saves last/; rerun with --resume to go on.
"""


def add_train_parser(sub: Any, common: argparse.ArgumentParser, parser_class: type) -> None:
    p = sub.add_parser(
        "train", parents=[common], help="train a saved adapter on the model file's batches",
        description="Train the adapter saved in --adapter (by `adaptc inject -o`) with AdamW, linear warm-up and "
                    "cosine decay, evaluating and checkpointing as it goes.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder written by `adaptc inject -o DIR`")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="N", help="optimizer steps to train")
    length.add_argument("--epochs", type=float, metavar="E", help="passes over train_batches()")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)g)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up: a fraction of the steps, or a number of steps if >= 1 (default: %(default)g)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: %(default)g)")
    p.add_argument("--batch-accum", type=int, default=1, metavar="K", help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (default: %(default)g)")
    p.add_argument("--eval-every", type=int, metavar="N", help="steps between evaluations and checkpoints (default: 5 over the run)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed for torch's RNG (default: %(default)s)")
    p.add_argument("--loraplus-lr-ratio", type=float, metavar="R", help="LoRA+: train LoRA's B matrices at R x --lr "
                   "(as PEFT's create_loraplus_optimizer; e.g. 16)")
    p.add_argument("--loraplus-lr-embedding", type=float, default=1e-6, metavar="LR",
                   help="LoRA+: the learning rate of LoRA on embeddings (default: %(default)g)")
    p.add_argument("--lora-fa", action="store_true", help="LoRA-FA: keep LoRA's A matrices frozen, train B only "
                   "(less activation memory)")
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu, cuda (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/last after an interruption")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    launch = p.add_argument_group("several processes (torchrun; DDP over the adapter gradients)")
    launch.add_argument("--nproc", type=int, default=1, metavar="N", help="processes per node (default: %(default)s); "
                        "each takes every N-th batch, rank 0 writes the checkpoints")
    launch.add_argument("--nnodes", default="1", help="nodes (default: %(default)s); with more than one, run the same "
                        "command on each node with its --node-rank")
    launch.add_argument("--node-rank", type=int, help="this node's index, 0 .. nnodes-1")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address reachable from every node")
    launch.add_argument("--rdzv-id", help="a job id shared by the nodes (default: adaptc)")
    p.set_defaults(func=cmd_train)


def _wrap_user(fn: Callable, what: str, path_arg: str, module: types.ModuleType) -> Callable:
    """Errors raised inside a model file's function become one-line CLI errors naming the file and line."""
    path = Path(module.__file__).resolve()

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise failed_in_user_code(f"{what} in {path_arg}", path, exc) from exc

    return call


def _wrap_batches(fn: Callable, what: str, path_arg: str, module: types.ModuleType) -> Callable[[], Iterator]:
    # A generator fails while it is iterated, not when it is called: wrap both.
    path = Path(module.__file__).resolve()
    call = _wrap_user(fn, what, path_arg, module)

    def batches() -> Iterator:
        iterator = iter(call())
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise failed_in_user_code(f"{what} in {path_arg}", path, exc) from exc
            yield item

    return batches


def _function(module: types.ModuleType, name: str, path_arg: str, required: str | None = None) -> Callable | None:
    fn = getattr(module, name, None)
    if fn is None:
        if required:
            raise CliError(f"{path_arg} defines no {name}(); `adaptc train` needs {name}() {required}")
        return None
    if not callable(fn):
        raise CliError(f"{name} in {path_arg} is a {type(fn).__name__}, not a function")
    return fn


def cmd_train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        steps=args.steps, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        batch_accum=args.batch_accum, bf16=args.bf16, max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress,
        loraplus_lr_ratio=args.loraplus_lr_ratio, loraplus_lr_embedding=args.loraplus_lr_embedding,
        lora_fa=args.lora_fa,
    )
    config.validate()  # bad options fail before the model is built
    if not isinstance(args.nproc, int) or args.nproc < 1:
        raise CliError(f"--nproc must be a positive integer (processes per node), got {args.nproc}")
    if (args.nproc > 1 or str(args.nnodes) not in ("1", "1:1")) and "WORLD_SIZE" not in os.environ:
        # The launcher: torchrun starts this same command (without the launch options) once per process.
        return distributed.launch_torchrun(
            distributed.without_launch_options(args.argv), args.nproc, nnodes=args.nnodes,
            node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
        )
    if not Path(args.model_file).expanduser().exists():
        load_model_file(args.model_file)  # raises its "not found" error before the adapter is looked at
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        hint = f"create one with `adaptc inject {args.model_file} --method lora -o {args.adapter}`"
        if not adapter.exists():
            raise CliError(f"adapter folder {args.adapter!r} not found; {hint}")
        raise CliError(f"{args.adapter!r} holds no adapter_config.json; {hint}")
    rank, world, launched_device = distributed.init_from_env()  # (0, 1, ...) when not launched by torchrun
    try:
        device = launched_device if world > 1 else torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as exc:
        raise CliError(f"--device {args.device!r} is not usable here ({str(exc).splitlines()[0]}); use cpu") from None

    module, model, example = build_module_from_file(args.model_file)
    path_arg = args.model_file
    batches = _function(module, "train_batches", path_arg, "that yields the training batches (dicts of inputs)")
    eval_fn = _function(module, "eval_batches", path_arg)
    metric = _function(module, "metric", path_arg)
    loss = _function(module, "loss", path_arg)
    if metric is not None and eval_fn is None:
        raise CliError(f"{path_arg} defines metric() but no eval_batches(); define eval_batches() for metric() to run on")

    eval_batches = None
    if eval_fn is not None:
        eval_batches = list(_wrap_batches(eval_fn, "eval_batches()", path_arg, module)())  # evaluated several times

    am = load_adapter(model, adapter, example_inputs=example)
    am.to(device)
    summary = am.trainable_summary(print_it=False)
    if rank == 0:
        where = f" on {world} processes" if world > 1 else ""
        print(f"{type(model).__name__} from {path_arg} with the adapter in {args.adapter}{where}: {summary}")
    try:
        result = train(
            am, _wrap_batches(batches, "train_batches()", path_arg, module), config=config,
            loss=_wrap_user(loss, "loss()", path_arg, module) if loss else None,
            eval_batches=eval_batches,
            metric=_wrap_user(metric, "metric()", path_arg, module) if metric else None,
            output_dir=adapter, resume=args.resume,
        )
    except KeyboardInterrupt:
        print(f"adaptc: interrupted; the last completed step is saved in {adapter / 'last'}: "
              "rerun the same command with --resume to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank == 0:
        print(_report(result))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _report(result: Any) -> str:
    lines = [f"trained steps {result.start_step}->{result.steps} in {result.seconds:.1f}s "
             f"({result.samples_per_s:.1f} samples/s)"]
    if result.first_loss is not None:
        lines.append(f"train loss {result.first_loss:.4f} (first step) -> {result.last_loss:.4f} (last step)")
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        for key in ("loss", "metric"):
            if key in first and key in last:
                lines.append(f"eval {key} {first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})")
    if result.best:
        lines.append("best: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.best.items()))
    for name, path in result.files.items():
        lines.append(f"{name}: {path}")
    return "\n".join(lines)
