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
"""

from __future__ import annotations

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


def _trainer_class() -> type:
    from transformers import Trainer

    class AdapterTrainer(Trainer):
        """``transformers.Trainer`` that checkpoints an AdaptedModel's adapters in PEFT's format.

        Everything else is the Trainer's: loss, gradient accumulation, DDP through accelerate,
        optimizer / scheduler / RNG state in each ``checkpoint-N`` folder, ``resume_from_checkpoint``,
        ``load_best_model_at_end``.
        """

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
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_adapter_weights", "signature_class", "unwrap"]  # signature_class: its old home
