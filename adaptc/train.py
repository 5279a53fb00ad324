"""A training loop for adapters: AdamW, warm-up + cosine decay, accumulation, checkpoints, resume.

``adaptc train`` uses it, and so can Python code::

    am = adaptc.inject(model, "lora", example_inputs=inputs)
    result = adaptc.train(am, batches, config=adaptc.TrainConfig(steps=100, lr=1e-3), output_dir="out/")

``batches`` is a list of input dicts, or a function returning an iterable of them (called once per
epoch, after seeding torch's RNG with ``seed + epoch`` so that shuffling or augmentation drawn from
it is reproducible, and repeated exactly on ``resume``). A batch's entries that the model's
``forward`` takes by name go to the model; the others (labels for a ``loss``) stay for ``loss`` and
``metric``. The loss is ``loss(output, batch)`` when given, else ``output.loss``.

Only parameters with ``requires_grad`` (the active adapter's) are optimized. With ``output_dir``,
``last/`` and ``best/`` checkpoints (adapter + optimizer, scheduler, step, data position and RNG
state, see :mod:`adaptc.train_state`) are written atomically at every evaluation point and at the
end, with ``train_log.json`` and ``loss.png``; ``resume=True`` continues from ``last/`` and gives the
same weights as an uninterrupted run. A NaN or infinite loss or gradient stops training before the
optimizer step, so no NaN ever reaches the weights or a checkpoint.

LoRA+ (``loraplus_lr_ratio``: B learns ratio x lr) and LoRA-FA (``lora_fa``: A frozen) are options of
:class:`TrainConfig`; a method whose training needs more than a plain step (AdaLoRA) contributes hooks
(:func:`method_hooks`, described below).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .atomic import atomic_write_text
from .errors import CheckpointError, ConfigError, InputError, TrainingError
from .plot import loss_curve
from .train_state import checkpoint_dir, load_state, save_checkpoint

LOG_NAME = "train_log.json"
PLOT_NAME = "loss.png"
DEFAULT_EVALS = 5  # evaluation / checkpoint points over a run when eval_every is not given

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch], torch.Tensor]
MetricFn = Callable[[Any, Batch], Any]


@dataclass
class TrainConfig:
    """Options of :func:`train`. Give ``steps`` (optimizer steps) or ``epochs`` (passes over the batches)."""

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.1  # < 1: a fraction of the steps; >= 1: a number of steps
    batch_accum: int = 1  # micro-batches per optimizer step
    bf16: bool = False  # bfloat16 autocast for the forward pass
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # steps between evaluations and checkpoints (default: 5 over the run)
    seed: int = 0
    progress: bool = True
    # LoRA+: B's learning rate is loraplus_lr_ratio x lr (LoRA on embeddings: loraplus_lr_embedding), as PEFT's
    # create_loraplus_optimizer. LoRA-FA: A stays frozen at its initial value; only B (and DoRA's magnitude) train.
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    lora_fa: bool = False

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of steps (optimizer steps) or epochs (passes over the batches)")
        if self.steps is not None and (not _is_int(self.steps) or self.steps <= 0):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and (not _is_number(self.epochs) or not self.epochs > 0):
            raise ConfigError(f"epochs must be a positive number, got {self.epochs!r}")
        if not _is_number(self.lr) or not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be a positive number (e.g. 1e-3), got {self.lr!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _is_number(self.warmup) or self.warmup < 0:
            raise ConfigError(f"warmup must be a fraction of the steps (< 1) or a number of steps, got {self.warmup!r}")
        if not _is_int(self.batch_accum) or self.batch_accum <= 0:
            raise ConfigError(f"batch_accum must be a positive integer, got {self.batch_accum!r}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or not self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        if self.eval_every is not None and (not _is_int(self.eval_every) or self.eval_every <= 0):
            raise ConfigError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        check_lora_options(self.loraplus_lr_ratio, self.loraplus_lr_embedding, self.lora_fa)

    def warmup_steps(self, total: int) -> int:
        return min(total, int(self.warmup) if self.warmup >= 1 else round(self.warmup * total))


def check_lora_options(loraplus_lr_ratio: Any, loraplus_lr_embedding: Any, lora_fa: Any) -> None:
    """Validate the LoRA+ / LoRA-FA options (adaptc.train, ``adaptc train`` and adaptc.hf share them)."""
    if loraplus_lr_ratio is not None and (not _is_number(loraplus_lr_ratio) or not 0 < loraplus_lr_ratio < math.inf):
        raise ConfigError(f"loraplus_lr_ratio must be a positive number (B's learning rate / A's, e.g. 16), "
                          f"got {loraplus_lr_ratio!r}")
    if not _is_number(loraplus_lr_embedding) or not 0 < loraplus_lr_embedding < math.inf:
        raise ConfigError(f"loraplus_lr_embedding must be a positive learning rate, got {loraplus_lr_embedding!r}")
    if not isinstance(lora_fa, bool):
        raise ConfigError(f"lora_fa must be True or False, got {lora_fa!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What :func:`train` did. ``evals`` holds every evaluation, the first at step 0 (before training)."""

    steps: int
    start_step: int
    first_loss: float | None
    last_loss: float | None
    evals: list[dict[str, float]]
    best: dict[str, float] | None
    seconds: float
    samples_per_s: float
    output_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # last / best / log / plot -> path


# --- batches ---------------------------------------------------------------------------------------

class _Batches:
    """Epoch-by-epoch access to the user's batches, reproducible for resume."""

    def __init__(self, batches: Any, seed: int) -> None:
        if isinstance(batches, Mapping) or not (callable(batches) or isinstance(batches, Iterable)):
            raise InputError(
                f"batches must be a list of input dicts or a function returning an iterable of them, "
                f"got {type(batches).__name__}"
            )
        self.source, self.seed = batches, seed
        self.one_shot = not callable(batches) and iter(batches) is batches  # a generator: one epoch only

    def epoch(self, index: int) -> Iterator[Batch]:
        if self.one_shot and index > 0:
            raise InputError(
                "the batches are a one-shot iterator (a generator) and ran out; pass a list or a function "
                "that returns a fresh iterable, as model.py's train_batches() does"
            )
        if callable(self.source):
            torch.manual_seed(self.seed + index)  # shuffling drawn from torch's RNG repeats on resume
            return iter(self.source())
        return iter(self.source)

    def count(self) -> int:
        """Batches in one epoch (iterates once when the iterable has no len)."""
        if not callable(self.source) and hasattr(self.source, "__len__"):
            return len(self.source)
        if self.one_shot:
            raise InputError("epochs needs batches with a known length; pass a list or a function, or give steps")
        rng = torch.get_rng_state()
        try:
            return sum(1 for _ in self.epoch(0))
        finally:
            torch.set_rng_state(rng)


class _Caller:
    """Splits a batch into the model's inputs and the rest, and moves tensors to the model's device."""

    def __init__(self, am: nn.Module, device: torch.device) -> None:
        self.device = device
        base = getattr(am, "base_model", am)
        params = inspect.signature(base.forward).parameters.values()
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
        example = getattr(am, "example_inputs", None)
        example_kwargs = dict(example.kwargs) if example is not None else {}
        self.accepted = named | set(example_kwargs)
        # Non-tensor options of the captured call (use_cache=False) apply to every batch that omits them.
        self.constants = {k: v for k, v in example_kwargs.items() if not isinstance(v, torch.Tensor)}

    def inputs(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, Mapping):
            raise InputError(
                f"each batch must be a dict of inputs by name (as model(**batch) takes them), got {type(batch).__name__}"
            )
        given = {k: v for k, v in batch.items() if k in self.accepted}
        if not given:
            raise InputError(
                f"no entry of the batch {sorted(batch)} is an input of the model's forward; name the entries as "
                "forward's arguments (e.g. input_ids, pixel_values, x)"
            )
        merged = {**self.constants, **given}
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in merged.items()}

    def batch_on_device(self, batch: Batch) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def compute_loss(output: Any, batch: Batch, loss: LossFn | None) -> torch.Tensor:
    """``loss(output, batch)`` when given, else ``output.loss``; a scalar tensor."""
    if loss is not None:
        value = loss(output, batch)
    else:
        value = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if value is None:
            raise InputError(
                f"the model's output ({type(output).__name__}) has no .loss; define loss(output, batch) in "
                "model.py (or pass loss= to adaptc.train), or include the labels the model needs in each batch"
            )
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise InputError(f"the loss must be a scalar tensor, got {type(value).__name__}"
                         + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
    return value.reshape(())


# --- method hooks, LoRA+ and LoRA-FA ----------------------------------------------------------------
#
# A method whose training needs more than loss.backward() + optimizer.step() (AdaLoRA: a penalty in
# the loss, a rank allocation after each step) defines ``train_hook(am, adapter_name, total_steps)`` on
# its Method, returning an object with ``loss()`` (a term added to the loss, or None), ``before_step()``
# (after clipping, before the optimizer step) and ``after_step(step)`` (after the optimizer step, before
# the gradients are cleared; ``step`` is the 0-based index of the step just taken). adaptc.train and
# adaptc.hf's AdapterTrainer call them; nothing here knows a method by name.


def method_hooks(am: Any, total_steps: int) -> list[Any]:
    """The training hooks of ``am``'s active adapters whose method defines ``train_hook``."""
    records = getattr(am, "adapter_record", None)
    if records is None:
        return []
    hooks = []
    for name in am.active_adapters:
        method = records(name).method
        make = getattr(method, "train_hook", None)
        if make is not None:
            hook = make(am, name, total_steps)
            if hook is not None:
                hooks.append(hook)
    return hooks


def hooks_loss(hooks: list[Any], loss: torch.Tensor) -> torch.Tensor:
    """``loss`` plus every hook's term."""
    for hook in hooks:
        extra = hook.loss()
        if extra is not None:
            loss = loss + extra.to(loss.dtype)
    return loss


def _lora_layers(am: Any) -> list[tuple[str, nn.Module]]:
    """(adapter name, layer) of every layer of the active adapters."""
    if getattr(am, "adapters", None) is None:
        raise ConfigError(f"LoRA+ / LoRA-FA need an adaptc AdaptedModel, got {type(am).__name__}")
    layers = []
    for name in am.active_adapters:
        layers += [(name, layer) for layer in am.adapters[name].values()]
    return layers


def freeze_lora_a(am: Any) -> list[nn.Parameter]:
    """LoRA-FA: freeze every LoRA A of the active adapters (returns them, to unfreeze after training).

    A frozen A needs no gradient, so autograd keeps no copy of A's input for it: the activation memory of
    the adapter's down-projection goes (only the r-wide ``A x`` stays saved for B's gradient).
    """
    other = [f"{n!r} ({am.adapter_record(n).method.name})" for n in am.active_adapters
             if am.adapter_record(n).method.name != "lora"]
    if other:
        raise ConfigError(f"lora_fa=True freezes LoRA's A matrices; the active adapter(s) {', '.join(other)} are not "
                          "LoRA adapters: train them without lora_fa")
    frozen = []
    for _, layer in _lora_layers(am):
        for param_name in ("lora_A", "lora_embedding_A"):
            param = getattr(layer, param_name, None)
            if isinstance(param, nn.Parameter) and param.requires_grad:
                param.requires_grad_(False)
                frozen.append(param)
    return frozen


def parameter_groups(am: Any, params: list[nn.Parameter], lr: float, weight_decay: float,
                     loraplus_lr_ratio: float | None = None, loraplus_lr_embedding: float = 1e-6) -> list[dict]:
    """The optimizer's parameter groups: one, or with LoRA+ PEFT's three (A: lr; B and 1-D parameters such as
    DoRA's magnitude: ratio x lr; LoRA on an embedding: loraplus_lr_embedding)."""
    if loraplus_lr_ratio is None:
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    wanted = {id(p) for p in params}
    role: dict[int, str] = {}
    for _, layer in _lora_layers(am):
        embedding = getattr(layer, "kind", None) == "embedding"
        for param_name, param in layer.named_parameters(recurse=False):
            if id(param) in wanted:
                is_b = param_name in ("lora_B", "lora_embedding_B") or param.dim() == 1
                role[id(param)] = "embedding" if embedding else ("B" if is_b else "A")
    if "B" not in role.values() and "embedding" not in role.values():
        raise ConfigError("loraplus_lr_ratio sets the learning rate of LoRA's B matrices, but the trained adapter(s) "
                          f"{', '.join(am.active_adapters)} have none (lora_B): LoRA+ needs a LoRA (or AdaLoRA) adapter")
    groups = {"A": [], "embedding": [], "B": []}
    for p in params:
        groups[role.get(id(p), "A")].append(p)
    rates = {"A": lr, "embedding": loraplus_lr_embedding, "B": lr * loraplus_lr_ratio}
    return [{"params": groups[k], "lr": rates[k], "weight_decay": weight_decay} for k in ("A", "embedding", "B")
            if groups[k]]


# --- evaluation ------------------------------------------------------------------------------------

def evaluate(
    am: nn.Module,
    batches: Any,
    *,
    loss: LossFn | None = None,
    metric: MetricFn | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """Mean loss (when one can be computed) and ``metric(output, batch)`` over ``batches``, in eval mode.

    Both are averaged weighted by batch size (the first dimension of the batch's first tensor),
    so a metric returning a batch's accuracy gives the accuracy over all examples.
    """
    device = _device_of(am)
    caller = _Caller(am, device)
    modes = {m: m.training for m in am.modules()}
    am.eval()
    totals: dict[str, float] = {}
    count = 0
    try:
        # fork_rng: evaluation (a batches function is seeded, a model may draw) must not move the training RNG,
        # or a run resumed from a checkpoint taken just before an evaluation would diverge.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _autocast(device, bf16):
            for batch in _Batches(batches, 0).epoch(0):
                output = am(**caller.inputs(batch))
                on_device = caller.batch_on_device(batch)
                n = _batch_size(batch)
                count += n
                try:
                    totals["loss"] = totals.get("loss", 0.0) + n * float(compute_loss(output, on_device, loss))
                except InputError:
                    if loss is not None:
                        raise
                if metric is not None:
                    value = metric(output, on_device)
                    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or \
                            (isinstance(value, torch.Tensor) and value.numel() != 1):
                        raise InputError(f"metric(output, batch) must return a number (higher is better), got {value!r:.80}")
                    totals["metric"] = totals.get("metric", 0.0) + n * float(value)
    finally:
        _restore_modes(modes)  # each module's own mode (a user may keep parts in eval)
    if count == 0:
        raise InputError("the evaluation batches are empty")
    return {k: v / count for k, v in totals.items()}


def _device_of(am: nn.Module) -> torch.device:
    for p in am.parameters():
        if p.requires_grad:
            return p.device
    return next(am.parameters()).device


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# --- the loop --------------------------------------------------------------------------------------
#
# train() is a sequence of stages: check the arguments, plan the run, set up the optimizer, start
# (resume or evaluate step 0), then loop: next batch -> micro-step -> optimizer step -> record ->
# evaluate and checkpoint. Each stage is a small function over the dataclasses below.

@dataclass
class _Plan:
    """The run's length and evaluation points, fixed before the first step (resume checks ``schedule``)."""

    total: int
    warmup: int
    eval_every: int
    rank: int
    world: int
    schedule: dict[str, Any]

    def evaluation_due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total


@dataclass
class _Setup:
    """What every stage of the loop uses and none replaces: model, optimizer, scheduler, run state, options."""

    am: nn.Module
    model: nn.Module  # am, or its DistributedDataParallel wrapper
    caller: _Caller
    device: torch.device
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    run: _Run
    config: TrainConfig
    plan: _Plan
    loss: LossFn | None
    metric: MetricFn | None
    eval_batches: Any
    hooks: list[Any] = field(default_factory=list)  # the methods' training hooks (method_hooks)


@dataclass
class _Cursor:
    """Where the loop is in the data: the epoch, the batches of it consumed (all ranks'), its iterator."""

    data: _Batches
    epoch: int
    index: int
    iterator: Iterator[Batch]


@dataclass
class _Accumulation:
    """The losses of the micro-batches since the last optimizer step; ``size`` of them make a step."""

    size: int
    losses: list[float] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return len(self.losses) >= self.size


@dataclass
class _Throughput:
    """Samples seen and time spent; evaluation time is left out so samples/s is the training rate."""

    start: float
    eval_seconds: float = 0.0
    samples: int = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def rate(self) -> float:
        seconds = self.seconds()
        return self.samples / seconds if seconds > 0 else 0.0


def train(
    am: nn.Module,
    batches: Any,
    *,
    config: TrainConfig | None = None,
    loss: LossFn | None = None,
    eval_batches: Any = None,
    metric: MetricFn | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> TrainResult:
    """Train the parameters of ``am`` that require grad; see the module docstring. Returns a :class:`TrainResult`.

    ``config`` or keyword options (``steps=100, lr=1e-3, ...``, the fields of :class:`TrainConfig`).
    Raises TrainingError on a NaN/inf loss or gradient (after saving the log), and re-raises
    KeyboardInterrupt after writing ``last/`` at the last completed step.
    """
    config = _make_config(config, options)
    root = _check_arguments(loss, metric, output_dir, resume)
    frozen = freeze_lora_a(am) if config.lora_fa else []
    try:
        return _train(am, batches, config, root, loss, eval_batches, metric, resume)
    finally:
        for param in frozen:  # LoRA-FA froze A for this run only
            param.requires_grad_(True)


def _train(am: nn.Module, batches: Any, config: TrainConfig, root: Path | None, loss: LossFn | None,
           eval_batches: Any, metric: MetricFn | None, resume: bool) -> TrainResult:
    params = _trainable_parameters(am)
    data = _Batches(batches, config.seed)
    plan = _plan(config, data)
    setup = _set_up(am, params, root, config, plan, loss=loss, metric=metric, eval_batches=eval_batches)
    _start(setup, resume)
    cursor = _cursor(data, setup.run, resume)
    modes = {m: m.training for m in am.modules()}  # put back if training stops with an error
    am.train()
    run = setup.run
    bar = _progress_bar(config, plan, run.step)
    micro, speed = _Accumulation(config.batch_accum), _Throughput(time.perf_counter())
    try:
        while run.step < plan.total:
            batch = _next_batch(cursor, plan)
            _micro_step(setup, batch, micro, speed)
            if not micro.ready:
                continue
            _optimizer_step(setup, micro)
            _record_step(setup, cursor, micro, speed, bar)
            if plan.evaluation_due(run.step):
                _evaluate_and_checkpoint(setup, speed, bar)
    except KeyboardInterrupt:
        _abandon(bar, modes)
        _save_interrupted(setup)
        raise
    except BaseException:
        _abandon(bar, modes)
        raise
    bar.close()
    seconds = speed.seconds()  # before finish(): writing the log and plot is not training time
    run.finish()
    return run.result(seconds, speed.samples)


# --- stages before the loop ------------------------------------------------------------------------

def _check_arguments(loss: Any, metric: Any, output_dir: Any, resume: bool) -> Path | None:
    """Refuse bad arguments before any work; returns the output folder, if any."""
    for name, fn in (("loss", loss), ("metric", metric)):
        if fn is not None and not callable(fn):
            raise InputError(f"{name} must be a function ({name}(output, batch)), got {type(fn).__name__}")
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise InputError(f"output_dir must be a folder path (str or os.PathLike), got {type(output_dir).__name__}")
    if resume and output_dir is None:
        raise ConfigError("resume needs output_dir, the folder whose last/ checkpoint to continue from")
    root = Path(output_dir) if output_dir is not None else None
    if root is not None and root.exists() and not root.is_dir():
        raise InputError(f"output_dir {str(root)!r} is a file; pass a folder")
    return root


def _trainable_parameters(am: nn.Module) -> list[nn.Parameter]:
    params = [p for p in am.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no parameter that requires grad; inject or load an adapter first")
    return params


def _plan(config: TrainConfig, data: _Batches) -> _Plan:
    rank, world = _world()
    # Under torch.distributed each rank takes every world-th batch, so an epoch is world times fewer steps.
    total = config.steps if config.steps is not None else math.ceil(config.epochs * data.count() / config.batch_accum / world)
    if total <= 0:
        raise InputError("the batches are empty; train_batches() must yield at least one batch")
    warmup = config.warmup_steps(total)
    eval_every = config.eval_every or max(1, math.ceil(total / DEFAULT_EVALS))
    schedule = {"total_steps": total, "warmup_steps": warmup, "lr": config.lr, "weight_decay": config.weight_decay,
                "batch_accum": config.batch_accum, "seed": config.seed, "bf16": config.bf16,
                "max_grad_norm": config.max_grad_norm}
    # Only when set, so that checkpoints written without these options still resume.
    if config.loraplus_lr_ratio is not None:
        schedule.update(loraplus_lr_ratio=config.loraplus_lr_ratio, loraplus_lr_embedding=config.loraplus_lr_embedding)
    if config.lora_fa:
        schedule["lora_fa"] = True
    return _Plan(total=total, warmup=warmup, eval_every=eval_every, rank=rank, world=world, schedule=schedule)


def _set_up(am: nn.Module, params: list[nn.Parameter], root: Path | None, config: TrainConfig, plan: _Plan, *,
            loss: LossFn | None, metric: MetricFn | None, eval_batches: Any) -> _Setup:
    device = _device_of(am)
    caller = _Caller(am, device)
    groups = parameter_groups(am, params, config.lr, config.weight_decay, config.loraplus_lr_ratio,
                              config.loraplus_lr_embedding)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    warmup, total = plan.warmup, plan.total
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    run = _Run(am, root, plan.schedule, config, writer=plan.rank == 0)
    model = _data_parallel(am, device) if plan.world > 1 else am
    return _Setup(am=am, model=model, caller=caller, device=device, params=params, optimizer=optimizer,
                  scheduler=scheduler, run=run, config=config, plan=plan, loss=loss, metric=metric,
                  eval_batches=eval_batches, hooks=method_hooks(am, plan.total))


def _start(setup: _Setup, resume: bool) -> None:
    """Continue from ``last/``, or seed torch and evaluate step 0 (the figure before training)."""
    if resume:
        setup.run.resume(setup.optimizer, setup.scheduler)
        return
    torch.manual_seed(setup.config.seed)
    if setup.eval_batches is not None:
        setup.run.record_eval(0, _evaluate(setup))


def _cursor(data: _Batches, run: _Run, resume: bool) -> _Cursor:
    epoch, index = run.position
    iterator = _skip(data.epoch(epoch), index)
    if resume:
        torch.set_rng_state(run.rng)  # after re-creating the epoch's data, as the interrupted run had
    return _Cursor(data=data, epoch=epoch, index=index, iterator=iterator)


def _progress_bar(config: TrainConfig, plan: _Plan, step: int) -> Any:
    # tqdm is not a declared dependency of adaptc: imported when a run starts, so `import adaptc` needs no tqdm.
    from tqdm.auto import tqdm

    return tqdm(total=plan.total, initial=step, desc="train", unit="step",
                disable=not config.progress or plan.rank != 0, file=sys.stderr, dynamic_ncols=True)


# --- stages of the loop ----------------------------------------------------------------------------

def _next_batch(cursor: _Cursor, plan: _Plan) -> Batch:
    """This rank's next batch, starting the next epoch when one runs out."""
    while True:
        try:
            batch = next(cursor.iterator)
        except StopIteration:
            _check_epoch_length(cursor, plan.world)
            cursor.epoch, cursor.index = cursor.epoch + 1, 0
            cursor.iterator = cursor.data.epoch(cursor.epoch)
            continue
        cursor.index += 1
        if (cursor.index - 1) % plan.world == plan.rank:  # else another rank's batch
            return batch


def _check_epoch_length(cursor: _Cursor, world: int) -> None:
    if cursor.index == 0:
        raise InputError(f"epoch {cursor.epoch} yielded no batch; train_batches() must yield batches every time") from None
    if cursor.index < world:  # every rank sees the same count, so all stop here together
        raise InputError(
            f"epoch {cursor.epoch} has {cursor.index} batches, fewer than the {world} processes; each process needs "
            "at least one: use fewer processes or smaller batches"
        ) from None


def _micro_step(setup: _Setup, batch: Batch, micro: _Accumulation, speed: _Throughput) -> None:
    """Forward, loss and backward of one micro-batch; gradients add up until ``micro.ready``."""
    with _autocast(setup.device, setup.config.bf16):
        output = setup.model(**setup.caller.inputs(batch))
        value = compute_loss(output, setup.caller.batch_on_device(batch), setup.loss).float()
        value = hooks_loss(setup.hooks, value)
    if not _finite_everywhere(value, setup.plan.world):  # every rank stops, or DDP's all-reduce would hang
        raise setup.run.nan_error(f"the loss is {value.item()}", len(micro.losses) + 1, setup.optimizer)
    (value / micro.size).backward()
    micro.losses.append(value.item())
    speed.samples += _batch_size(batch) * setup.plan.world


def _optimizer_step(setup: _Setup, micro: _Accumulation) -> None:
    """Clip, step the optimizer and the schedule, clear the gradients."""
    # Without clipping (max_grad_norm=None) the norm is still computed: a NaN gradient with a finite
    # loss (sqrt at 0, a bad custom op) must not reach the weights either. inf clips nothing.
    limit = setup.config.max_grad_norm if setup.config.max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(setup.params, limit)
    if not torch.isfinite(norm):
        raise setup.run.nan_error(f"the gradient norm is {norm.item()}", len(micro.losses), setup.optimizer)
    for hook in setup.hooks:
        hook.before_step()
    setup.optimizer.step()
    for hook in setup.hooks:
        hook.after_step(setup.run.step)  # 0-based: run.step counts the steps before this one
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)


def _record_step(setup: _Setup, cursor: _Cursor, micro: _Accumulation, speed: _Throughput, bar: Any) -> None:
    """Count the step, keep where to resume from, log the mean micro-batch loss and show it."""
    run = setup.run
    run.step += 1
    run.position = (cursor.epoch, cursor.index)
    run.rng = torch.get_rng_state()
    rate = speed.rate()
    lr = setup.optimizer.param_groups[0]["lr"]
    run.record_step(_mean_over_ranks(sum(micro.losses) / len(micro.losses), setup.plan.world), lr, rate)
    micro.losses = []
    bar.update(1)
    bar.set_postfix(loss=f"{run.log['steps'][-1]['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")


def _evaluate_and_checkpoint(setup: _Setup, speed: _Throughput, bar: Any) -> None:
    """Evaluate (when there are eval batches) and write ``last/`` (and ``best/`` when it improved)."""
    t0 = time.perf_counter()
    run = setup.run
    result = None
    if setup.eval_batches is not None:
        result = _evaluate(setup)
        run.record_eval(run.step, result)
        if setup.plan.rank == 0:
            bar.write(f"step {run.step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in result.items()),
                      file=sys.stderr)
    run.checkpoint(setup.optimizer, setup.scheduler, result)
    setup.am.train()  # whatever evaluation and saving left, training goes on in train mode
    speed.eval_seconds += time.perf_counter() - t0


def _evaluate(setup: _Setup) -> dict[str, float]:
    return evaluate(setup.am, setup.eval_batches, loss=setup.loss, metric=setup.metric, bf16=setup.config.bf16)


def _abandon(bar: Any, modes: dict[nn.Module, bool]) -> None:
    _clear(bar)  # the error message, not a half-drawn bar, is what the user should see last
    _restore_modes(modes)


def _save_interrupted(setup: _Setup) -> None:
    # last/ at the last completed step (none if no step since the start), so resume continues from there.
    setup.run.checkpoint(setup.optimizer, setup.scheduler, None, force=False)
    setup.run.finish()


def _world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _data_parallel(am: nn.Module, device: torch.device) -> nn.Module:
    # Only the adapters require grad, so DDP's buckets carry adapter gradients only.
    return DistributedDataParallel(am, device_ids=[device.index] if device.type == "cuda" else None)


def _finite_everywhere(value: torch.Tensor, world: int) -> bool:
    finite = torch.isfinite(value.detach()).to(torch.int32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / world


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _clear(bar: Any) -> None:
    bar.leave = False
    bar.close()


def _make_config(config: TrainConfig | None, options: dict[str, Any]) -> TrainConfig:
    if config is not None and not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be an adaptc.TrainConfig, got {type(config).__name__}")
    if config is not None and options:
        raise ConfigError(f"got a TrainConfig and keyword options {sorted(options)}; put the options in the config")
    if config is None:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {', '.join(sorted(known))}")
        config = TrainConfig(**options)
    config.validate()
    return config


def _skip(iterator: Iterator[Batch], count: int) -> Iterator[Batch]:
    for _ in range(count):
        if next(iterator, None) is None:
            raise CheckpointError(
                "the batches are shorter than when the checkpoint was written; resume needs the same train_batches()"
            )
    return iterator


class _Run:
    """The state of one training run: step, data position, log, best value, checkpoint files."""

    def __init__(self, am: nn.Module, root: Path | None, schedule: dict[str, Any], config: TrainConfig,
                 writer: bool = True) -> None:
        self.am, self.root, self.schedule, self.config = am, root, schedule, config
        self.writer = writer  # under torch.distributed only rank 0 writes files; every rank keeps the state
        self.step, self.start_step, self.saved_step = 0, 0, None
        self.position = (0, 0)  # (epoch, batches consumed in it) at the last optimizer step
        self.rng = torch.get_rng_state()
        self.log: dict[str, Any] = {"schedule": schedule, "steps": [], "evals": [], "best": None}
        self.best_score: float | None = None
        self.since_checkpoint: list[float] = []
        self.files: dict[str, str] = {}

    def resume(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        assert self.root is not None
        folder = checkpoint_dir(self.root, "last")
        if folder is None:
            raise CheckpointError(
                f"nothing to resume: {self.root / 'last'} has no trainer state; train once without --resume first"
            )
        state = load_state(folder)
        changed = {k: (state["schedule"].get(k), v) for k, v in self.schedule.items() if state["schedule"].get(k) != v}
        if changed:
            text = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"{folder} was trained with other options ({text}); resume with the same options, "
                f"or delete {folder} to start over"
            )
        layers = self.am.adapters[self.am.active_adapter]
        try:
            layers.load_state_dict(state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{folder} does not fit this adapter ({str(exc).splitlines()[0]}); resume with the adapter it was trained "
                f"from, or delete {folder} to start over"
            ) from exc
        scheduler.load_state_dict(state["scheduler"])
        self.step = self.start_step = self.saved_step = int(state["step"])
        self.position = tuple(int(v) for v in state["position"])
        self.rng = state["rng"]
        self.log = json.loads(state["log"])
        self.best_score = state["best_score"]

    def record_step(self, loss: float, lr: float, rate: float) -> None:
        self.log["steps"].append({"step": self.step, "loss": loss, "lr": lr, "samples_per_s": rate})
        self.since_checkpoint.append(loss)

    def record_eval(self, step: int, result: dict[str, float]) -> None:
        self.log["evals"].append({"step": step, **result})

    def _score(self, result: dict[str, float] | None) -> tuple[str, float] | None:
        # Higher metric is better; else lower loss (eval loss, or the train loss since the last checkpoint).
        if result and "metric" in result:
            return "metric", result["metric"]
        if result and "loss" in result:
            return "eval_loss", -result["loss"]
        if self.since_checkpoint:
            return "train_loss", -sum(self.since_checkpoint) / len(self.since_checkpoint)
        return None

    def checkpoint(self, optimizer: Any, scheduler: Any, result: dict[str, float] | None, force: bool = True) -> None:
        if self.root is None or self.saved_step == self.step or (not force and self.step == self.start_step):
            return
        score = self._score(result) if force else None
        improved = score is not None and (self.best_score is None or score[1] > self.best_score)
        if improved:
            self.best_score = score[1]
            name, value = score
            self.log["best"] = {"step": self.step, name: value if name == "metric" else -value}
        state = {
            "schedule": self.schedule, "step": self.step, "position": list(self.position), "rng": self.rng,
            "adapter": self.am.adapters[self.am.active_adapter].state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "log": json.dumps(self.log), "best_score": self.best_score,
        }
        if self.writer:
            self.files["last"] = str(save_checkpoint(self.am, self.root, "last", state))
            if improved:
                self.files["best"] = str(save_checkpoint(self.am, self.root, "best", state))
        self.saved_step = self.step
        self.since_checkpoint = []
        self._write_log()

    def _write_log(self) -> None:
        if self.root is None or not self.writer:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOG_NAME
        atomic_write_text(path, json.dumps(self.log, indent=1) + "\n")
        self.files["log"] = str(path)

    def finish(self) -> None:
        if self.root is None or not self.writer:
            return
        self._write_log()
        plot = loss_curve(self.log, self.root / PLOT_NAME)
        if plot is not None:
            self.files["plot"] = str(plot)
        for name in ("last", "best"):
            folder = checkpoint_dir(self.root, name)
            if folder is not None:
                self.files[name] = str(folder)

    def nan_error(self, what: str, micro: int, optimizer: torch.optim.Optimizer) -> TrainingError:
        optimizer.zero_grad(set_to_none=True)
        self.finish()
        saved = (f"the last checkpoint, {self.root / 'last'}, is from step {self.saved_step}" if self.saved_step
                 else "no checkpoint was written")
        hint = f"lower the learning rate (now {self.config.lr:g})"
        if self.config.bf16:
            hint += ", train without bf16"
        return TrainingError(
            f"{what} at step {self.step + 1} (micro-batch {micro}); training stopped before the optimizer step, so no "
            f"NaN reached the weights and {saved}; {hint}, or check loss() and the batches"
        )

    def result(self, seconds: float, samples: int) -> TrainResult:
        steps = self.log["steps"]
        return TrainResult(
            steps=self.step, start_step=self.start_step,
            first_loss=steps[0]["loss"] if steps else None, last_loss=steps[-1]["loss"] if steps else None,
            evals=list(self.log["evals"]), best=self.log["best"], seconds=seconds,
            samples_per_s=samples / seconds if seconds > 0 else 0.0,
            output_dir=str(self.root) if self.root is not None else None, files=dict(self.files),
        )
