"""AdaptedModel: the model after adapter passes, trainable like any nn.Module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .capture import CapturedGraphModule
from .inputs import Inputs

ADAPTERS_ATTR = "_adaptc_adapters"


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
    ``adapters`` holds the adapter parameters, the only ones that require grad. Calls run
    a captured graph chosen by training mode and input structure; a call whose inputs
    differ in structure (other keywords) or in a dimension the graph was specialised on
    captures the model once more for them, with the same adapters.
    """

    def __init__(
        self,
        model: nn.Module,
        graph: CapturedGraphModule,
        adapters: nn.ModuleDict,
        graph_pass: Callable[[CapturedGraphModule], None],
        sites: list,
        config: Any,
    ) -> None:
        super().__init__()
        self.base_model = model
        self.adapters = adapters
        self._graphs: dict[tuple, list[CapturedGraphModule]] = {}
        self._graph_pass = graph_pass
        self._example_inputs = graph._adaptc_inputs
        self.sites = sites
        self.adapter_config = config  # `config` stays the base model's (transformers reads it)
        self.train(model.training)  # start in the mode the model was in, like the model
        self._register_graph(graph)

    # -- graphs ---------------------------------------------------------------------------------

    def _register_graph(self, graph: CapturedGraphModule) -> None:
        setattr(graph, ADAPTERS_ATTR, self.adapters)
        graph.transform_graphs(self._graph_pass)
        self._graphs.setdefault(graph._adaptc_inputs.structure_key(), []).append(graph)

    def graph_for(self, inputs: Inputs) -> CapturedGraphModule:
        """The captured graph that runs these inputs in the current mode, capturing one if needed."""
        candidates = self._graphs.get(inputs.structure_key(), [])
        for graph in candidates:
            if graph.training != self.training:
                graph.train(self.training)
            if graph.accepts(inputs):
                return graph
        graph = CapturedGraphModule.build(self.base_model, inputs, self.training)
        self._register_graph(graph)
        return graph

    @property
    def graph_module(self) -> CapturedGraphModule:
        """The graph captured from the example inputs, in the current mode."""
        graph = self.graph_for(self._example_inputs)
        return graph

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = Inputs(args, kwargs)
        return self.graph_for(inputs)(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for graphs in self._graphs.values():
            for graph in graphs:
                graph.rebind()
                # Constants the graphs own (lifted tensors) follow the move too.
                for name, buffer in list(graph.named_buffers()):
                    if name.startswith("_adaptc_"):
                        module, _, leaf = name.rpartition(".")
                        owner = graph.get_submodule(module) if module else graph
                        owner._buffers[leaf] = fn(buffer)
        return self

    # -- introspection ----------------------------------------------------------------------------

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters()]

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
                return getattr(base, name)
            except AttributeError:
                raise AttributeError(f"{type(self).__name__} and its base model have no attribute {name!r}") from None

    def extra_repr(self) -> str:
        return f"method={getattr(self.adapter_config, 'method', '?')}, sites={len(self.sites)}"


def freeze(model: nn.Module) -> None:
    """Stop gradients to every parameter of ``model`` (the adapters are switched on afterwards)."""
    for p in model.parameters():
        p.requires_grad_(False)
