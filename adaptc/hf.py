"""Hugging Face Trainer / accelerate support for AdaptedModel.

Two things the Trainer reads that a plain ``forward(*args, **kwargs)`` hides:

- It keeps only the batch keys named in ``inspect.signature(model.forward)`` (``remove_unused_columns``)
  and finds the label names and ``return_loss`` in the signature of ``type(model).forward``. So every
  AdaptedModel gets a class of its own per base model class (:func:`signature_class`) whose
  ``forward`` carries the base model's signature. Calls still go to ``AdaptedModel.forward``.
- It saves a model that is not a ``PreTrainedModel`` as one ``model.safetensors`` of its whole
  ``state_dict()``: every frozen base weight at every checkpoint, and a crash in safetensors when
  weights are tied (GPT-2's embedding and LM head). :class:`AdapterTrainer` saves and resumes the
  adapters in PEFT's format instead (``adapter_config.json`` + ``adapter_model.safetensors``).

:class:`AdapterTrainer` also runs what a method adds to training (adaptc.train's method hooks: AdaLoRA's
orthogonality penalty in the loss and its rank allocation after each optimizer step, through
:class:`MethodHooksCallback`) and takes LoRA+ (``loraplus_lr_ratio``, ``loraplus_lr_embedding``) and
LoRA-FA (``lora_fa``) as keyword arguments, as ``adaptc.TrainConfig`` does. A plain ``Trainer`` can take
``MethodHooksCallback(am)`` among its callbacks for the per-step part (the loss term needs AdapterTrainer).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from .checkpoint import plan_load, read_checkpoint
from .errors import CheckpointError, InputError
from .methods.lora_checkpoint import copy_tensors
from .model import AdaptedModel
from .passes.sites import site_key
from .signature import signature_class
from .train import check_lora_options, freeze_lora_a, hooks_loss, method_hooks, parameter_groups


def unwrap(model: nn.Module) -> Any:
    """The AdaptedModel inside DDP, accelerate or ``torch.compile`` wrappers."""
    seen = model
    for _ in range(8):  # wrappers nest a few deep at most (compile(DDP(am)))
        if isinstance(seen, AdaptedModel):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        seen = inner
    raise InputError(
        f"expected an adaptc AdaptedModel (or DDP / accelerate / torch.compile around one), got {type(model).__name__}"
    )


def load_adapter_weights(am: Any, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy a saved adapter's tensors into the existing adapter ``adapter_name`` (resuming training).

    Unlike ``am.load_adapter`` this adds nothing: the adapter must exist with the same sites and
    shapes, so an optimizer built on its parameters keeps working.
    """
    if adapter_name not in am.adapters:
        raise CheckpointError(f"unknown adapter {adapter_name!r}; this model has: {', '.join(am.adapters)}")
    if am.adapter_record(adapter_name).method.name != "lora":
        _copy_other_method(am, directory, adapter_name)
        return
    _, plans = plan_load(am, read_checkpoint(directory, adapter_name))
    layers = am.adapters[adapter_name]
    wanted = {site_key(name) for name in plans}
    if wanted != set(layers):
        raise CheckpointError(
            f"{directory} adapts other sites than adapter {adapter_name!r} ({len(wanted)} vs {len(layers)}); "
            "resume with the adapter configuration it was trained with"
        )
    for name, plan in plans.items():  # check every shape before writing any tensor
        layer = layers[site_key(name)]
        for param, tensor in plan.tensors.items():
            if tuple(getattr(layer, param).shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{directory}: {name}.{param} has shape {tuple(tensor.shape)}, the adapter "
                    f"{tuple(getattr(layer, param).shape)}; resume with the rank it was trained with"
                )
    copy_tensors(layers, plans)


def _copy_other_method(am: Any, directory: str | os.PathLike, adapter_name: str) -> None:
    """load_adapter_weights for a method other than LoRA: its own load into a scratch adapter, then a copy."""
    record, active = am.adapter_record(adapter_name), list(am.active_adapters)
    scratch = "_adaptc_resume"
    record.method.load(am, read_checkpoint(directory, adapter_name), scratch)
    try:
        loaded, target = am.adapters[scratch].state_dict(), am.adapters[adapter_name].state_dict()
        differ = sorted(k for k in set(loaded) | set(target)
                        if k not in loaded or k not in target or loaded[k].shape != target[k].shape)
        if differ:
            raise CheckpointError(
                f"{directory} does not fit adapter {adapter_name!r} ({differ[0]}: the sites or shapes differ, e.g. "
                "an AdaLoRA checkpoint whose ranks were pruned); resume with the adapter it was trained from"
            )
        am.adapters[adapter_name].load_state_dict(loaded)
    finally:
        am.delete_adapter(scratch)
        am.set_adapter(active)


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    class MethodHooksCallback(TrainerCallback):
        """Calls the active adapters' training hooks (adaptc.train's ``method_hooks``) around each optimizer step.

        ``on_optimizer_step`` runs after ``optimizer.step()`` and before the gradients are cleared, with
        ``state.global_step`` the 0-based index of the step just taken: PEFT's ``update_and_allocate``.
        """

        def __init__(self, model: nn.Module) -> None:
            self.am = unwrap(model)
            self.hooks: list[Any] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.hooks = method_hooks(self.am, state.max_steps)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for hook in self.hooks:
                hook.before_step()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for hook in self.hooks:
                hook.after_step(state.global_step)

    return MethodHooksCallback


def _trainer_class() -> type:
    from transformers import Trainer

    MethodHooksCallback = _callback_class()

    class AdapterTrainer(Trainer):
        """``transformers.Trainer`` that checkpoints an AdaptedModel's adapters in PEFT's format.

        Everything else is the Trainer's: loss, gradient accumulation, DDP through accelerate,
        optimizer / scheduler / RNG state in each ``checkpoint-N`` folder, ``resume_from_checkpoint``,
        ``load_best_model_at_end``.

        Extra keywords: ``loraplus_lr_ratio`` / ``loraplus_lr_embedding`` (LoRA+ learning rates of B and of
        embedding LoRA, as PEFT's ``create_loraplus_optimizer``) and ``lora_fa`` (LoRA's A frozen).
        """

        def __init__(self, *args: Any, loraplus_lr_ratio: float | None = None, loraplus_lr_embedding: float = 1e-6,
                     lora_fa: bool = False, **kwargs: Any) -> None:
            check_lora_options(loraplus_lr_ratio, loraplus_lr_embedding, lora_fa)
            super().__init__(*args, **kwargs)
            self.loraplus = (loraplus_lr_ratio, loraplus_lr_embedding)
            am = unwrap(self.model)
            self.lora_fa_frozen = freeze_lora_a(am) if lora_fa else []
            if loraplus_lr_ratio is not None:  # fail now, not when the optimizer is made
                parameter_groups(am, [p for p in am.parameters() if p.requires_grad], 1.0, 0.0, *self.loraplus)
            self.hooks_callback = MethodHooksCallback(am)
            self.add_callback(self.hooks_callback)

        def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
            if self.loraplus[0] is None or self.optimizer is not None:
                return super().create_optimizer(model)
            am = unwrap(model if model is not None else self.model)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, am)
            params = [p for p in am.parameters() if p.requires_grad]
            groups = parameter_groups(am, params, self.args.learning_rate, self.args.weight_decay, *self.loraplus)
            self.optimizer = cls(groups, **{k: v for k, v in kwargs.items() if k != "lr"})
            return self.optimizer

        def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if not model.training or not self.hooks_callback.hooks:
                return result
            if return_outputs:
                loss, outputs = result
                return hooks_loss(self.hooks_callback.hooks, loss), outputs
            return hooks_loss(self.hooks_callback.hooks, result)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            unwrap(self.model).save_adapter(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            am = unwrap(model if model is not None else self.model)
            for name in am.adapters:
                load_adapter_weights(am, resume_from_checkpoint, name)

        def _load_best_model(self) -> None:
            am = unwrap(self.model)
            for name in am.adapters:
                load_adapter_weights(am, self.state.best_model_checkpoint, name)

    return AdapterTrainer


def __getattr__(name: str) -> Any:
    # transformers is optional: AdapterTrainer is built on first use.
    if name == "AdapterTrainer":
        cls = _trainer_class()
        globals()["AdapterTrainer"] = cls
        return cls
    if name == "MethodHooksCallback":
        cls = _callback_class()
        globals()["MethodHooksCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_adapter_weights", "signature_class", "unwrap"]  # signature_class: its old home
