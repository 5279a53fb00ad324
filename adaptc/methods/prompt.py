"""Prompt tuning and P-tuning: virtual tokens added to the token sequence (capture-time edits)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from adaptc.config import PromptConfig, PTuningConfig
from adaptc.errors import TargetError
from adaptc.inputs import foreign_container
from adaptc.passes.prompt import PromptAdapter, SequenceEdit
from adaptc.passes.sequence import find_sequence_entry
from adaptc.tables import number

from . import prompt_checkpoint
from .base import AdapterBuild, Method


class PromptMethod(Method):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings in front of the sequence."""

    name = "prompt"
    config_class = PromptConfig
    aliases = ("prompt_tuning",)
    peft_types = ("PROMPT_TUNING",)
    edits_sequence = True
    merge = "constants"
    site_table = False
    encoder_note = ""

    def build(self, am: Any, adapter_name: str, config: Any) -> AdapterBuild:
        model = am.base_model
        modes = {m: m.training for m in am.modules()}
        am.eval()  # the matcher compares the graph's values with an eager run: no dropout
        try:
            entry = find_sequence_entry(am.graph_module, model, am.example_inputs, config.method)
        finally:
            for module, mode in modes.items():
                module.training = mode
        adapter = PromptAdapter(config, entry)
        adapter.init_from(config, model)
        edit = SequenceEdit(adapter)
        _check_output_shapes(model, edit, am.example_inputs, config)
        return AdapterBuild(config, [entry], {"prompt": adapter}, None, edit)

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return prompt_checkpoint.save(am, adapter_name)

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        prompt_checkpoint.load(am, checkpoint, adapter_name)

    def inspect(self, graph: Any, model: nn.Module, inputs: Any, config: Any) -> list[str]:
        entry = find_sequence_entry(graph, model, inputs, config.method)
        tokens = config.num_virtual_tokens
        return [f"virtual tokens enter at: {entry.describe()}",
                f"{tokens} virtual tokens x hidden {entry.hidden} = {number(tokens * entry.hidden)} prompt parameters"
                + self.encoder_note]

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        return [*super().describe(am, adapter_name)[:1],
                f"virtual tokens enter at {am.adapter_sites(adapter_name)[0].describe()}"]


class PTuningMethod(PromptMethod):
    """P-tuning: the virtual tokens come from a small MLP or LSTM prompt encoder."""

    name = "ptuning"
    config_class = PTuningConfig
    aliases = ("p_tuning",)
    peft_types = ("P_TUNING",)
    encoder_note = " (plus the P-tuning encoder)"


def _check_output_shapes(model: nn.Module, edit: Any, inputs: Any, config: Any) -> None:
    """With the virtual tokens in, every output must keep the base model's shape.

    The virtual positions are dropped from outputs by shape (a [batch, sequence, ...] tensor); an
    output that is not a sequence but whose second dimension happens to equal the longer sequence
    (10 classes, 6 tokens + 4 virtual) would lose columns. Caught here, on the example inputs.
    """

    def shapes(out: Any) -> list[tuple[int, ...]]:
        out = out.to_tuple() if hasattr(out, "to_tuple") else out
        # A key/value cache in the output is left whole by the strip (passes/prompt.py), so not compared.
        leaves = pytree.tree_leaves(out, is_leaf=foreign_container)
        return [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            base = shapes(model(*inputs.args, **inputs.kwargs))
            try:
                with edit.applied(model):
                    got = shapes(model(*inputs.args, **inputs.kwargs))
            except (RuntimeError, ValueError, IndexError) as exc:
                raise TargetError(
                    f"{type(model).__name__} fails with {config.num_virtual_tokens} virtual tokens added at "
                    f"{edit.adapter.entry.module!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); a model "
                    "that fixes its sequence length (an image grid in hierarchical vision models, a table of one "
                    "length applied after the sequence starts) cannot take extra tokens. Use "
                    "method='prefix' or 'lora'"
                ) from None
    finally:
        for module, mode in modes.items():
            module.training = mode
    for index, (want, have) in enumerate(zip(base, got)):
        if want != have:
            raise TargetError(
                f"with {config.num_virtual_tokens} virtual tokens, output {index} of {type(model).__name__} would have "
                f"shape {list(have)} instead of {list(want)}: its second dimension equals the sequence length with the "
                f"virtual tokens, so adaptc cannot tell it from a sequence; choose another num_virtual_tokens"
            )
