"""AdaptedModel: the model after adapter passes, trainable like any nn.Module."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import base_guard, cached_generation, mixed_batch
from .capture import CapturedGraphModule
from .checkpoint import load_into, save_adapter
from .checkpoint_files import check_new_name
from .errors import AdaptcError, ConfigError
from .inputs import Inputs
from .methods import ADAPTERS_ATTR, Method, adapter_prefix, available_methods, get_method, make_config
from .passes import checkpoint as checkpointing
from .passes.manager import PassManager
from .passes.weighted import add_weighted_adapter
from .signature import signature_class
from .targets import merge as merge_target
from .warn import warn_user


@dataclass
class Adapter:
    """One adapter on a model: its method, config and sites, and how it edits graphs."""

    name: str
    method: Method
    config: Any
    sites: list
    graph_pass: Any = None  # a GraphPass applied to every captured graph (LoRA, prefix)
    edit: Any = None  # a capture-time edit (prompt methods; prefix's position shift)


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.fraction:.4f}"


class AdaptedModel(nn.Module):
    """A captured model with adapters inserted.

    ``base_model`` is the original model object (its weights frozen, shared, not copied);
    ``adapters[name]`` holds one adapter's parameters by site; only adapter parameters
    require grad. Calls run a captured graph chosen by training mode and input structure; a
    call whose inputs differ in structure (other keywords) or in a dimension the graph was
    specialised on captures the model once more for them, and every adapter is inserted
    there too.

    Several adapters can live on one model (:meth:`add_adapter`); the active ones
    (:meth:`set_adapter`) add their updates, the others are skipped.
    """

    def __init__(self, model: nn.Module, graph: CapturedGraphModule, sites: list) -> None:
        super().__init__()
        self.base_model = model
        self.adapters = nn.ModuleDict()
        self.all_sites = sites  # every site of the unadapted graph (selection reads is_head from it)
        self._graphs: dict[tuple, list[CapturedGraphModule]] = {}
        self._example_inputs = graph._adaptc_inputs
        self._records: dict[str, Adapter] = {}  # by adapter name, in the order added
        self._passes = PassManager()
        self._active: list[str] = []
        # Graphs are cached per set of capture-time edits in force (they change shapes); these are
        # switched off by disable_adapters().
        self._edits_disabled: set[str] = set()
        self._disabled: set[str] = set()  # adapters switched off by disable_adapters(): merges leave them out
        self.train(model.training)  # start in the mode the model was in, like the model
        self._register_graph(graph)
        # The HF Trainer reads input and label names from forward's signature on the class (adaptc/signature.py).
        self.__class__ = signature_class(type(self), type(model))

    # -- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, config: Any = None, **options: Any) -> None:
        """Insert a new adapter (``config`` or method options, as for ``adaptc.inject``) and activate it.

        Everything is validated before the model changes; the new adapter becomes the only
        active one (like PEFT's ``add_adapter`` followed by ``set_adapter``).
        """
        with self._checkpointing_suspended():  # the methods read the graphs as captured
            self._add_adapter(name, config, **options)

    def _add_adapter(self, name: str, config: Any = None, **options: Any) -> None:
        check_new_name(self.adapters, name)
        config = make_config(config if config is not None else "lora", options)
        method = get_method(config)
        if method.edits_sequence:
            present = [r for r in self._records.values() if r.method.edits_sequence]
            if present:
                raise ConfigError(
                    f"this model already has the {present[0].method.name!r} adapter {present[0].name!r}; "
                    f"one prompt-method adapter ({', '.join(_sequence_methods())}) per model: delete it first or "
                    "inject into a fresh model"
                )
        built = method.build(self, name, config)
        self.adapters[name] = nn.ModuleDict(built.layers)
        self._records[name] = Adapter(name, method, built.config, built.sites, built.graph_pass, built.edit)
        if built.graph_pass is not None:
            for graph in self.all_graphs():
                graph.transform_graphs(functools.partial(self._passes.run_one, graph_pass=built.graph_pass),
                                       remember=False)
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self.set_adapter(name)
        if built.edit is not None:
            try:  # capture with the edit now, so a model it does not suit fails here, not on first use
                self.graph_for(self._example_inputs)
            except Exception:
                self.delete_adapter(name)
                raise

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapter(s): only their parameters train and apply."""
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.adapters]
        if unknown or not wanted:
            raise ConfigError(f"unknown adapter {unknown or names!r}; this model has: {', '.join(self.adapters)}")
        for name, layers in self.adapters.items():
            on = name in wanted
            for layer in layers.values():
                layer.active = on
                layer.requires_grad_(on)
        self._active = wanted

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter: its nodes leave every graph and its parameters are dropped."""
        if name not in self.adapters:
            raise ConfigError(f"unknown adapter {name!r}; this model has: {', '.join(self.adapters)}")
        record = self._records[name]
        target = f"{adapter_prefix(name)}."

        def remove(gm: CapturedGraphModule) -> None:
            record.method.remove(gm, name)
            for node in list(gm.graph.nodes):
                if node.op == "call_module" and node.target.startswith(target):
                    node.replace_all_uses_with(node.args[1])  # args: (x, base output, weight, bias)
                    gm.graph.erase_node(node)
            # A graph captured with a prompt edit lifted every parameter the model held then, this
            # adapter's included, as get_attr nodes (unused): left in, they would look for it.
            for node in list(gm.graph.nodes):
                if node.op == "get_attr" and node.target.startswith(target) and not node.users:
                    gm.graph.erase_node(node)

        for graph in self.all_graphs():
            graph.transform_graphs(functools.partial(self._passes.run_one, graph_pass=remove, removal=True),
                                   remember=False)
        self._forget_graphs(name)
        del self.adapters[name]
        del self._records[name]
        self._active = [n for n in self._active if n != name]

    @contextlib.contextmanager
    def disable_adapters(self, names: list[str] | None = None) -> Iterator[None]:
        """Within the block the model computes exactly the base model's outputs (``names``: only
        those adapters are switched off). A merged export made in the block leaves the switched-off
        adapters out, as the block's outputs do; ``merge()`` refuses there (it would consume them)."""
        chosen = {n: layers for n, layers in self.adapters.items() if names is None or n in names}
        saved = {id(layer): layer.active for layers in chosen.values() for layer in layers.values()}
        saved_edits, saved_disabled = set(self._edits_disabled), set(self._disabled)
        try:
            for layers in chosen.values():
                for layer in layers.values():
                    layer.active = False
            self._edits_disabled |= set(chosen)
            self._disabled |= set(chosen)
            yield
        finally:
            for layers in chosen.values():
                for layer in layers.values():
                    layer.active = saved[id(layer)]
            self._edits_disabled = saved_edits
            self._disabled = saved_disabled

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """Add ``adapter_name``, a weighted combination of LoRA ``adapters`` (PEFT's semantics).

        ``combination``: ``"linear"`` (same rank, approximate), ``"cat"`` (exact, rank = sum) or
        ``"svd"`` (exact up to ``svd_rank``). The new adapter is added but not activated.
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, combination, svd_rank)

    @property
    def active_adapter(self) -> str:
        if not self._active:
            raise AdaptcError("no adapter is active; add_adapter() or set_adapter() first")
        return self._active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def enabled_adapters(self) -> list[str]:
        """The active adapters that apply now: inside :meth:`disable_adapters` the ones it switched off are
        left out (what a merged export folds in)."""
        return [n for n in self._active if n not in self._disabled]

    @property
    def sites(self) -> list:
        """The sites the active adapter adapts: name, kind, op, weight shape, parameters added."""
        return self._records[self.active_adapter].sites

    @property
    def adapter_config(self) -> Any:
        """The active adapter's configuration (``config`` stays the base model's: transformers reads it)."""
        return self._records[self.active_adapter].config

    def adapter_configs(self) -> dict[str, Any]:
        return {name: record.config for name, record in self._records.items()}

    def adapter_sites(self, name: str) -> list:
        return self._records[name].sites

    def adapter_record(self, name: str) -> Adapter:
        """Everything about adapter ``name``: method, config, sites, graph pass, capture-time edit."""
        return self._records[name]

    # -- checkpoints (adaptc/checkpoint.py) -------------------------------------------------------

    def save_adapter(self, directory: str | os.PathLike, adapter_name: str | list[str] | None = None) -> list:
        """Write adapters in PEFT's format (all of them by default); ``default`` in ``directory``, others in subfolders."""
        return save_adapter(self, directory, adapter_name)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **ignored: Any) -> list:
        """PEFT's and transformers' name for :meth:`save_adapter` (the base weights are not saved);
        ``is_main_process=False`` writes nothing, as in transformers."""
        return self.save_adapter(save_directory) if is_main_process else []

    # -- activation checkpointing (adaptc/passes/checkpoint.py) -----------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, *,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the repeated blocks' activations in the backward instead of keeping them, in every
        training graph, present and future (:mod:`adaptc.passes.checkpoint`); gradients do not change.

        ``gradient_checkpointing_kwargs`` (transformers' and PEFT's): ``use_reentrant`` (default False),
        ``preserve_rng_state`` (default True: dropout draws the same masks again) and adaptc's ``policy``:
        ``"full"`` (default; the whole block is recomputed) or ``"selective"`` (matmul and attention outputs
        are kept, norms, activations and element-wise ops recomputed). ``every_n_layers``: only blocks
        0, n, 2n, ... are checkpointed. ``offload=True`` is not supported.
        """
        settings = checkpointing.make_settings(gradient_checkpointing_kwargs, every_n_layers=every_n_layers,
                                               offload=offload)
        self._set_checkpointing(checkpointing.CheckpointPass(settings))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' name (its Trainer calls it for ``gradient_checkpointing=True``): :meth:`gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_disable(self) -> None:
        """Plain training graphs again: every activation kept for the backward."""
        self._set_checkpointing(None)

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpoint_pass() is not None

    is_activation_checkpointing = is_gradient_checkpointing

    def enable_input_require_grads(self) -> None:
        """Nothing to do (transformers and PEFT call it for reentrant checkpointing; on the base model it would
        hook an embedding module the graphs never call): checkpointed blocks give the adapters their
        gradients without inputs that require grad."""

    def disable_input_require_grads(self) -> None:
        """Nothing to undo (see :meth:`enable_input_require_grads`)."""

    def _checkpoint_pass(self) -> checkpointing.CheckpointPass | None:
        return next((p for p in self._passes.after if isinstance(p, checkpointing.CheckpointPass)), None)

    def _set_checkpointing(self, new: checkpointing.CheckpointPass | None, index: int | None = None) -> None:
        """Make ``new`` (None: none) the checkpointing pass and apply it to every graph captured so far."""
        old = self._checkpoint_pass()
        if old is None and new is None:
            return
        if old is not None:
            self._passes.after.remove(old)
        if new is not None:  # last by default: it cuts the finished graph into blocks
            self._passes.after.insert(len(self._passes.after) if index is None else index, new)
        for graph in self.all_graphs():
            graph.transform_graphs(new if new is not None else checkpointing.inline, remember=False)
        trained = [g for g in self.all_graphs() if True in g._adaptc_graphs]
        if new is not None and trained and index is None and not any(self._blocks_in(g) for g in trained):
            warn_user(f"gradient checkpointing found no block to recompute in the training graph of "
                      f"{type(self.base_model).__name__}: no repeated blocks (a ModuleList of layers), or each "
                      "writes into memory it does not own (batch norm's running statistics)")

    @staticmethod
    def _blocks_in(graph: CapturedGraphModule) -> bool:
        return any(checkpointing.has_blocks(g) for mode, g in graph._adaptc_graphs.items() if mode)

    @contextlib.contextmanager
    def _checkpointing_suspended(self) -> Iterator[None]:
        """Within the block every graph is as captured (methods read them when adding an adapter)."""
        current = self._checkpoint_pass()
        if current is None:
            yield
            return
        index = self._passes.after.index(current)
        self._set_checkpointing(None)
        try:
            yield
        finally:
            self._set_checkpointing(current, index)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` (GenerationConfig: greedy, sampling, beams, stopping criteria,
        streamers) for a decoder-only transformers model, every step through the adapted model,
        with transformers' key/value cache where it can be kept (:mod:`adaptc.cached_generation`;
        elsewhere each step runs the whole sequence).

        ``adapter_names=[...]``: one LoRA adapter per prompt row ("__base__": none), as in PEFT.
        For a causal LM not from transformers use :func:`adaptc.generate` (no cache).
        """
        return base_guard.generate(self, *args, **kwargs)

    def _adapters_apply(self) -> bool:
        """Whether a call computes anything other than the base model (an active, enabled adapter)."""
        return bool(self._edits_in_force()) or any(
            getattr(layer, "active", False) for layers in self.adapters.values() for layer in layers.values()
        )

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str = "default") -> None:
        """Add a saved adapter (adaptc's or PEFT's) under ``adapter_name`` and make it the active one."""
        load_into(self, directory, adapter_name)

    def chunked_loss(self, enabled: bool = True, *, chunk_size: int = 1024, logits: bool = False) -> list[str]:
        """Compute a causal LM's loss from ``labels`` without its [batch, sequence, vocab] logits (off by default).

        In training graphs, the LM head and the cross-entropy run over ``chunk_size`` tokens at a time and
        are recomputed in the backward (:mod:`adaptc.passes.chunked_loss`); loss and gradients are the
        plain ones. The output's ``logits`` are ``None`` there, or with ``logits=True`` computed without a
        gradient (one more [batch, sequence, vocab] tensor). ``enabled=False`` restores the plain graphs.
        Returns one note per training graph captured so far: chunked, or left unchunked and why.
        """
        from .passes import chunked_loss

        return chunked_loss.configure(self, enabled, chunk_size, logits)

    # -- graphs ---------------------------------------------------------------------------------

    def all_graphs(self) -> list[CapturedGraphModule]:
        """Every graph captured so far (one per input structure and set of capture-time edits)."""
        return [graph for graphs in self._graphs.values() for graph in graphs]

    _all_graphs = all_graphs

    def _apply_adapter_passes(self, graph: CapturedGraphModule) -> None:
        self._passes.run(graph, [r.graph_pass for r in self._records.values() if r.graph_pass is not None])

    def _register_graph(self, graph: CapturedGraphModule, edits: tuple[str, ...] = ()) -> None:
        setattr(graph, ADAPTERS_ATTR, self.adapters)
        graph.transform_graphs(self._apply_adapter_passes)
        self._graphs.setdefault((graph._adaptc_inputs.structure_key(), edits), []).append(graph)

    def _forget_graphs(self, name: str) -> None:
        """Drop the graphs captured with adapter ``name``'s edit (they traced its computation)."""
        for key in [k for k in self._graphs if name in k[1]]:
            del self._graphs[key]

    def _edits_in_force(self) -> tuple[str, ...]:
        return tuple(n for n, r in self._records.items()
                     if r.edit is not None and n in self._active and n not in self._edits_disabled)

    def edits_in_force_records(self) -> list[Adapter]:
        """The adapters whose capture-time edits apply to the next call."""
        return [self._records[name] for name in self._edits_in_force()]

    @contextlib.contextmanager
    def edits_suspended(self, names: list[str]) -> Iterator[None]:
        """Within the block, calls run without these adapters' capture-time edits (their other
        parts still apply): a cached generation step after the prompt's virtual tokens."""
        saved = set(self._edits_disabled)
        self._edits_disabled |= set(names)
        try:
            yield
        finally:
            self._edits_disabled = saved

    @contextlib.contextmanager
    def _capture_context(self, edits: tuple[str, ...]) -> Iterator[None]:
        """Around a capture: the adapters reachable from the model (the edits' hooks read their
        parameters, and export must see them as the model's), and the edits' hooks installed."""
        model = self.base_model
        model.add_module(ADAPTERS_ATTR, self.adapters)
        try:
            with contextlib.ExitStack() as stack:
                for name in edits:
                    stack.enter_context(self._records[name].edit.applied(model))
                yield
        finally:
            del model._modules[ADAPTERS_ATTR]

    def graph_for(self, inputs: Inputs) -> CapturedGraphModule:
        """The captured graph that runs these inputs in the current mode, capturing one if needed."""
        edits = self._edits_in_force()
        candidates = self._graphs.get((inputs.structure_key(), edits), [])
        for graph in candidates:
            if graph.training != self.training:
                graph.train(self.training)
            if graph.accepts(inputs):
                return graph
        graph = CapturedGraphModule.build(self.base_model, inputs, self.training,
                                          around=functools.partial(self._capture_context, edits))
        self._register_graph(graph, edits)
        return graph

    @property
    def graph_module(self) -> CapturedGraphModule:
        """The graph captured from the example inputs, in the current mode."""
        return self.graph_for(self._example_inputs)

    @property
    def example_inputs(self) -> Inputs:
        return self._example_inputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)  # PEFT's: one adapter per row (adaptc/mixed_batch.py)
        if "past_key_values" in kwargs or "cache" in kwargs:  # a key/value cache of transformers
            kwargs = cached_generation.cache_keywords(self.base_model, kwargs)
        if adapter_names is not None:
            output = self._mixed_forward(adapter_names, args, kwargs)
        else:
            output = self.graph_for(Inputs(args, kwargs))(*args, **kwargs)
        if "cache" in kwargs or "past_key_values" in kwargs:  # a graph returns a new cache; the caller's grows
            output = cached_generation.keep_callers_cache(kwargs, output)
        return output

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for graph in self.all_graphs():
            graph.rebind()
            # Constants the graphs own (lifted tensors) follow the move too.
            for name, buffer in list(graph.named_buffers()):
                if name.startswith("_adaptc_"):
                    module, _, leaf = name.rpartition(".")
                    owner = graph.get_submodule(module) if module else graph
                    owner._buffers[leaf] = fn(buffer)
        return self

    def merge(self, safe: bool = False, requantize: bool = False) -> nn.Module:
        """Fold the active LoRA adapters into the base model's weights and return that model.

        The merged adapters leave this AdaptedModel (like PEFT's ``merge_and_unload``); inactive
        ones stay. ``safe=True`` checks the merged weights for NaN/inf before writing any. A
        weight shared by several modules (tied embeddings) is refused: see ``targets/merge.py``.
        A quantized base layer (``quantize=``) becomes full precision, or stays quantized with
        ``requantize=True``.
        """
        return merge_target.merge(self, safe=safe, requantize=requantize)

    # -- introspection ----------------------------------------------------------------------------

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of one adapter (the active one by default)."""
        return list(self.adapters[name or self.active_adapter].parameters())

    def trainable_summary(self, *, print_it: bool = True) -> TrainableSummary:
        """Trainable / total parameter counts (printed, and returned)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        summary = TrainableSummary(trainable, total)
        if print_it:
            print(summary)
        return summary

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base_model":
                raise
            base = self._modules.get("base_model")
            if base is None:
                raise
            try:
                value = getattr(base, name)
            except AttributeError:
                raise AttributeError(f"{type(self).__name__} and its base model have no attribute {name!r}") from None
            if inspect.ismethod(value) and isinstance(value.__self__, nn.Module):
                # A base-model method that runs the base model's modules would skip the adapters: it raises instead.
                return base_guard.guarded(value, name, self._adapters_apply, base)
            return value

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self._active}"

    def _mixed_forward(self, adapter_names: list[str], args: tuple, kwargs: dict) -> Any:
        """One call of one graph in which row ``i`` uses adapter ``adapter_names[i]`` ("__base__": none)."""
        with mixed_batch.rows_applied(self, adapter_names, mixed_batch.batch_size_of(args, kwargs)):
            return self.graph_for(Inputs(args, kwargs))(*args, **kwargs)


def _sequence_methods() -> list[str]:
    return [n for n in available_methods() if get_method(n).edits_sequence]
