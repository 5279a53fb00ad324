"""Prompt tuning and P-tuning: virtual tokens added to the token sequence, applied at capture time.

Adding tokens changes a shape everything downstream depends on (a ViT's 197 tokens are
baked into its reshapes), so this is not a graph edit: :class:`SequenceEdit` installs hooks
on the model, and the model is captured again with them, so tracing derives every shape.

- Text models (the sequence starts at a token-embedding lookup): the inputs get
  ``num_virtual_tokens`` placeholder ids in front (the attention mask ones, token types
  zeros, labels -100), and the lookup's output has those rows replaced by the prompt. That
  is exactly PEFT's ``cat(prompt, embed(ids))`` passed as ``inputs_embeds``, so position
  embeddings, masks and losses see the longer sequence.
- Any other model: the prompt is inserted into the sequence entering the first attention (the
  output of the module that produces it, or the first argument of the module that takes it),
  after its class/distillation tokens, along its sequence axis ([batch, sequence, hidden] or
  [sequence, batch, hidden]). Attention masks made for the shorter sequence are widened with
  unmasked columns; modules that count leading tokens (rotary ViTs) count the virtual ones too.

Sequence outputs come back aligned with the caller's tokens: the virtual positions are
removed from every output tensor shaped ``[batch, extended length, ...]`` (or, for a
time-first stream, ``[extended length, batch, ...]``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from adaptc.config import PromptConfig, PTuningConfig
from adaptc.errors import ConfigError, InputError
from adaptc.inputs import foreign_container

from .sequence import SequenceEntry

# How each per-token input grows for virtual tokens in a text model (PEFT's conventions).
_TOKEN_INPUT_FILL = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}


class PromptAdapter(nn.Module):
    """The learned virtual tokens of one prompt-tuning or P-tuning adapter.

    Prompt tuning: ``embedding`` [num_virtual_tokens, hidden] is the prompt. P-tuning: the
    prompt is ``encoder(embedding)`` (an MLP, or a bidirectional LSTM and an MLP). After
    :meth:`fold` the prompt is a constant buffer and the module has no parameters.
    """

    def __init__(self, config: PromptConfig, entry: SequenceEntry) -> None:
        super().__init__()
        self.method = config.method
        self.entry = entry
        self.num_virtual_tokens = config.num_virtual_tokens
        self.active = True
        hidden = entry.hidden
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden)
        self.encoder_type = None
        if isinstance(config, PTuningConfig):
            self.encoder_type = config.encoder
            width = config.encoder_hidden_size or hidden
            if config.encoder == "mlp":  # PEFT's layout, so P-tuning checkpoints line up
                self.mlp_head = nn.Sequential(
                    nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, hidden)
                )
            else:
                self.lstm_head = nn.LSTM(hidden, width, num_layers=config.encoder_num_layers,
                                         dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
                self.mlp_head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, hidden))
        self.folded = False

    def prompt(self) -> torch.Tensor:
        """The virtual tokens, [num_virtual_tokens, hidden]."""
        if self.folded:
            return self.constant
        x = self.embedding.weight
        if self.encoder_type == "lstm":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        if self.encoder_type is not None:
            x = self.mlp_head(x)
        return x

    @torch.no_grad()
    def fold(self) -> None:
        """Evaluate the prompt once and keep it as a constant; the parameters are dropped."""
        value = self.prompt().detach().clone()
        for name in list(self._modules):
            delattr(self, name)
        self.register_buffer("constant", value)
        self.folded = True
        self.encoder_type = None

    def init_from(self, config: PromptConfig, model: nn.Module, generator: torch.Generator | None = None) -> None:
        """Initialise the input embeddings: random (PEFT's default), sampled vocabulary rows, or a text."""
        if config.init == "random":
            return
        if self.entry.kind != "token-embedding":
            raise ConfigError(f"init={config.init!r} needs a text model (a token-embedding table); use init='random'")
        table = (model.get_parameter(self.entry.table) if self.entry.table
                 else model.get_submodule(self.entry.module).weight).detach()
        if config.init == "vocab":
            rows = torch.randint(0, table.shape[0], (self.num_virtual_tokens,), generator=generator)
        else:
            rows = torch.tensor(_token_ids(config.tokenizer, config.init), dtype=torch.long)
            if rows.numel() == 0:
                raise ConfigError(f"init text {config.init!r} tokenizes to no tokens")
            rows = rows.repeat((self.num_virtual_tokens + rows.numel() - 1) // rows.numel())[: self.num_virtual_tokens]
        with torch.no_grad():
            self.embedding.weight.copy_(table[rows].to(self.embedding.weight.dtype))


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    if callable(tokenizer) and hasattr(tokenizer, "convert_tokens_to_ids"):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if callable(tokenizer):
        ids = tokenizer(text)
        return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    raise ConfigError("tokenizer must be a Hugging Face tokenizer or a callable text -> list of token ids")


class SequenceEdit:
    """Hooks that add an adapter's virtual tokens to one call of the model (see the module docstring)."""

    def __init__(self, adapter: PromptAdapter) -> None:
        self.adapter = adapter
        self._output_axis: int | None = None  # the sequence axis of time-first models' outputs, once seen

    @property
    def prefill_tokens(self) -> int | None:
        """Tokens this edit adds to a text model's first generation step (the cache holds them after
        it, so later steps run without the edit); None where generation cannot keep a cache."""
        return self.adapter.num_virtual_tokens if self.adapter.entry.kind == "token-embedding" else None

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        entry = self.adapter.entry
        state: dict[str, Any] = {}
        target = model.get_submodule(entry.module) if entry.module else model
        lookup = contextlib.nullcontext()
        if entry.kind == "token-embedding" and entry.table:  # F.embedding in the model's own forward
            handles = [model.register_forward_pre_hook(self._extend_inputs(model, state), with_kwargs=True)]
            lookup = _functional_lookup(model, entry.table, self._replace_rows(state))
        elif entry.kind == "token-embedding":
            handles = [
                model.register_forward_pre_hook(self._extend_inputs(model, state), with_kwargs=True),
                target.register_forward_hook(self._replace_rows(state)),
            ]
        elif entry.where == "input":  # the stream is the first argument of the module (a Conformer's first layer)
            handles = [
                model.register_forward_pre_hook(self._start(state), with_kwargs=True),
                target.register_forward_pre_hook(self._insert_input(state), with_kwargs=True),
            ]
        else:
            handles = [
                model.register_forward_pre_hook(self._start(state), with_kwargs=True),
                target.register_forward_hook(self._insert(state)),
            ]
        handles.append(model.register_forward_hook(self._strip(state), with_kwargs=True))
        sequence = entry.kind == "sequence"
        try:
            with lookup, _masks_grown(entry.insert_at, self.adapter.num_virtual_tokens) if sequence \
                    else contextlib.nullcontext(), _prefix_counts(model, entry.prefix_modules,
                                                                  self.adapter.num_virtual_tokens):
                yield
        finally:
            for handle in handles:
                handle.remove()

    # -- text: grow the inputs, then put the prompt in the placeholder rows -------------------------

    def _extend_inputs(self, model: nn.Module, state: dict):
        entry, count = self.adapter.entry, self.adapter.num_virtual_tokens
        signature = inspect.signature(model.forward)

        def hook(_module, args, kwargs):
            state.clear()
            bound = signature.bind(*args, **kwargs)
            values = _flat_arguments(bound)
            ids = values.get(entry.ids_input)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise InputError(
                    f"{self.adapter.method}: the token ids input {entry.ids_input!r} is missing or not [batch, sequence]; "
                    "pass it on every call (inputs_embeds alone is not supported)"
                )
            batch, length = ids.shape
            state.update(batch=batch, length=length, start=0, fired=False)
            for name, value in list(values.items()):
                if not isinstance(value, torch.Tensor) or value.dim() < 2:
                    continue
                if name == entry.ids_input:
                    values[name] = torch.cat([ids.new_zeros(batch, count), ids], dim=1)
                elif name == "position_ids":
                    ahead = torch.arange(count, device=value.device, dtype=value.dtype).expand(value.shape[0], count)
                    values[name] = torch.cat([ahead, value + count], dim=1)
                elif name in _TOKEN_INPUT_FILL and value.shape[1] == length:
                    pad = value.new_full((value.shape[0], count, *value.shape[2:]), _TOKEN_INPUT_FILL[name])
                    values[name] = torch.cat([pad, value], dim=1)
            return _rebind(signature, bound, values)

        return hook

    def _replace_rows(self, state: dict):
        count = self.adapter.num_virtual_tokens

        def hook(_module, _args, out):
            if not self.adapter.active or state.get("fired", True):
                return out
            state["fired"] = True
            prompt = self.adapter.prompt().to(out.dtype)
            return torch.cat([prompt.expand(out.shape[0], -1, -1), out[:, count:]], dim=1)

        return hook

    # -- any model: insert into the sequence module's output ----------------------------------

    def _start(self, state: dict):
        def hook(_module, _args, _kwargs):
            state.clear()
            state["fired"] = False

        return hook

    def _insert(self, state: dict):
        def hook(_module, _args, out):
            return self._extended(out, state)

        return hook

    def _insert_input(self, state: dict):
        def hook(_module, args, kwargs):
            if not args:
                return None
            return (self._extended(args[0], state), *args[1:]), kwargs

        return hook

    def _extended(self, stream: Any, state: dict) -> Any:
        """``stream`` with the virtual tokens inserted along its sequence axis (first call only)."""
        at, axis = self.adapter.entry.insert_at, self.adapter.entry.axis
        if not isinstance(stream, torch.Tensor) or stream.dim() != 3 or state.get("fired", True):
            return stream
        state.update(fired=True, batch=stream.shape[1 - axis], length=stream.shape[axis], start=at)
        prompt = self.adapter.prompt().to(stream.dtype)
        prompt = prompt.unsqueeze(1 - axis).expand(*((-1, stream.shape[1], -1) if axis == 0 else (stream.shape[0], -1, -1)))
        return torch.cat([stream.narrow(axis, 0, at), prompt, stream.narrow(axis, at, stream.shape[axis] - at)], dim=axis)

    # -- outputs: drop the virtual positions ---------------------------------------------------------

    def _strip(self, state: dict):
        count = self.adapter.num_virtual_tokens
        # A time-first stream may come out batch-first ([batch, sequence, ...], a Conformer) or as it
        # is ([sequence, batch, ...]); a text or batch-first stream comes out batch-first.
        axes = (1, 0) if self.adapter.entry.axis == 0 else (1,)

        def hook(_module, _args, _kwargs, out):
            if not state.get("fired"):
                raise InputError(
                    f"{self.adapter.method}: the module {self.adapter.entry.module!r} that starts the token sequence "
                    "did not run (or ran through a functional call), so no virtual tokens were added; "
                    "use method='lora' or 'prefix' for this model"
                )
            batch, length, start = state["batch"], state["length"] + count, state["start"]

            def strip(value: Any) -> Any:
                if not isinstance(value, torch.Tensor) or value.dim() < 2:
                    return value
                matching = [a for a in axes if value.shape[1 - a] == batch and value.shape[a] == length]
                if len(matching) > 1:  # batch == extended length: the layout the outputs had when it was clear
                    matching = [self._output_axis] if self._output_axis is not None else matching
                elif len(matching) == 1 and len(axes) > 1:
                    self._output_axis = matching[0]
                if not matching:
                    return value
                axis = matching[0]
                return torch.cat([value.narrow(axis, 0, start), value.narrow(axis, start + count,
                                                                             value.shape[axis] - start - count)], dim=axis)

            return _map_output(strip, out)

        return hook


@contextlib.contextmanager
def _functional_lookup(model: nn.Module, table: str, replace_rows) -> Iterator[None]:
    """``F.embedding`` patched for one call of a model that looks its tokens up in its own forward:
    a lookup in ``table`` gets the prompt rows, as a submodule's forward hook would.

    The table is fetched at call time, not before: torch.export swaps a module's parameters for
    its own tensors while it traces.
    """
    original = F.embedding

    def embedding(input, weight, *args, **kwargs):
        out = original(input, weight, *args, **kwargs)
        return replace_rows(None, None, out) if weight is _attribute(model, table) else out

    F.embedding = embedding
    try:
        yield
    finally:
        F.embedding = original


@contextlib.contextmanager
def _masks_grown(at: int, count: int) -> Iterator[None]:
    """Masks built from the sequence before the virtual tokens were inserted grow with them.

    A model that builds its attention mask from the sequence's length (wav2vec2 does, from the
    feature projection's output; a Conformer makes a key padding mask from its ``lengths``) hands
    attention a mask ``count`` columns short. While the model is captured,
    ``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` (what
    nn.MultiheadAttention calls) are wrapped to insert visible columns (and rows, for a per-query
    mask) at the virtual tokens' position: the virtual tokens are never masked. Tracing records the
    edit in the graph. Capture is single-threaded, so the wrappers are never seen by other code.
    """
    sdpa_original, mha_original = F.scaled_dot_product_attention, F.multi_head_attention_forward

    def widen(mask: torch.Tensor, axis: int, size: int, visible: bool) -> torch.Tensor:
        if mask.shape[axis] == 1 or mask.shape[axis] == size:
            return mask
        shape = list(mask.shape)
        shape[axis] = count
        fill = mask.new_full(shape, visible) if mask.dtype == torch.bool else mask.new_zeros(shape)
        before = mask.narrow(axis, 0, at)
        after = mask.narrow(axis, at, mask.shape[axis] - at)
        return torch.cat([before, fill, after], dim=axis)

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() >= 2:  # a True means "attend"
            attn_mask = widen(attn_mask, -1, key.shape[-2], True)
            attn_mask = widen(attn_mask, -2, query.shape[-2], True)
        return sdpa_original(query, key, value, attn_mask, *args, **kwargs)

    def mha(query, key, value, *args, key_padding_mask=None, attn_mask=None, **kwargs):
        # nn.MultiheadAttention's masks: a True means "do not attend"; query and key are [length, batch, E].
        if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dim() >= 1:
            key_padding_mask = widen(key_padding_mask, -1, key.shape[0], False)
        if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() >= 2:
            attn_mask = widen(attn_mask, -1, key.shape[0], False)
            attn_mask = widen(attn_mask, -2, query.shape[0], False)
        return mha_original(query, key, value, *args, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **kwargs)

    # nn.MultiheadAttention's inference fast path (batch_first, no grad) calls a fused kernel, not the function.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    F.scaled_dot_product_attention, F.multi_head_attention_forward = sdpa, mha
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.multi_head_attention_forward = sdpa_original, mha_original
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def _prefix_counts(model: nn.Module, names: tuple[str, ...], count: int) -> Iterator[None]:
    """The modules that count the sequence's leading tokens count the virtual tokens among them, for one call.

    timm's rotary attention (EVA-02) rotates every token after its ``num_prefix_tokens`` class and
    register tokens by a table sized to the patch grid; the virtual tokens sit right after those
    tokens, so counting them as prefix tokens leaves them unrotated (no position, like the class
    token) and every patch keeps its own angles.
    """
    modules = [model.get_submodule(name) for name in names]
    for module in modules:
        module.num_prefix_tokens += count
    try:
        yield
    finally:
        for module in modules:
            module.num_prefix_tokens -= count


def _flat_arguments(bound: inspect.BoundArguments) -> dict[str, Any]:
    """Bound arguments with ``**kwargs`` spread out, so every input is found by its name."""
    values = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        else:
            values[name] = value
    return values


def _rebind(signature: inspect.Signature, bound: inspect.BoundArguments, values: dict[str, Any]):
    var_kw = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    for name in bound.arguments:
        if name == var_kw:
            bound.arguments[name] = {k: values[k] for k in bound.arguments[name]}
        else:
            bound.arguments[name] = values[name]
    return bound.args, bound.kwargs


def _map_output(fn, out: Any) -> Any:
    """Apply ``fn`` to every tensor in a model output (tensors, tuples, dicts, ModelOutput)."""
    if hasattr(out, "keys") and hasattr(out, "__setitem__") and not isinstance(out, dict):  # a ModelOutput
        for key in list(out.keys()):
            out[key] = _map_output(fn, out[key])
        return out
    # Another library's registered container (a key/value cache) is left whole: its tensors are not
    # laid out [batch, sequence, ...] and must keep every position.
    return pytree.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, out,
                           is_leaf=foreign_container)


def _attribute(root: nn.Module, dotted: str) -> object:
    obj: object = root
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj
