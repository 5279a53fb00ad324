"""Mixed-adapter batches in one graph: every LoRA adapter stacked, one adapter chosen per row.

``export_onnx(am, path, mixed_adapters=True)`` exports a graph that holds every LoRA adapter of ``am`` and
takes one more input, ``adapter_index`` ``[batch]`` (int64): row ``i`` runs adapter ``adapter_index[i]``
(its position in ``am.adapters``), and ``-1`` or ``len(am.adapters)`` runs the base model. At each LoRA
site the graph gathers the row's A and B and runs a batched low-rank matmul, so one ONNX Runtime batch
serves rows of different adapters. Each adapter's scale is folded into its B; ranks that differ are
zero-padded to the largest at that site; a site an adapter does not adapt holds zeros for it, as does the
base entry (the last), so those rows get exactly the base output. Other indices are not checked by the
graph: an index outside ``[-(n+1), n]`` is ONNX Runtime's own error (its ``Gather`` reports the index out
of bounds), and ``-2`` ... ``-(n+1)`` count from the end, as ``Gather`` does.

The rewrite works on the torch.fx graph, before ONNX conversion, so other exporters can reuse it::

    stacked = stacked_adapters_graph(am, graph, adapters=None)
        # am: an AdaptedModel whose adapters (all of them, or the names given, in that order) are LoRA
        # graph: one of am's captured graphs (am.graph_for(inputs), eval mode) or any fx.GraphModule
        #   in which am's adapters appear as its LoraLayer / LoraSiblings call_module nodes
        # returns StackedAdapters: .module (a new fx.GraphModule sharing am's base weights, the adapters'
        #   tensors copied into stacks as they are now; the input graph is not changed), .adapters
        #   (index -> name), .base_index, .index_for(names), .rows(index)
    with stacked.rows(adapter_index):           # a LongTensor [batch]; inside torch.export too
        out = stacked.module(*args, **kwargs)   # called like the graph it came from

    IndexedCall(flat_module, stacked)           # forward(*tensors, adapter_index): for torch.export /
                                                # torch.onnx.export, adapter_index the last input

A site's input must hold the batch on its first axis (``[batch, ...]``, or ``[batch * tokens, in]`` as
GPT-2's Conv1D flattens it), as for PyTorch's mixed batches (adaptc/mixed_batch.py). Refused, before
anything is built, with :class:`~adaptc.errors.ConfigError`: adapters of other methods (prompt tuning,
prefix tuning, P-tuning: their virtual tokens change every row's shapes), LoRA on conv sites, and a
model with no adapter. DoRA on linear sites is supported (its per-channel magnitude scale is gathered
per row like A and B; the norm is that of the stored weight plus the adapter's update, as in training).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from adaptc.passes.lora import LoraLayer
from adaptc.passes.lora_fused import LoraSiblings, restore_bases, stable_topological_sort
from adaptc.passes.sites import site_key
from torch import fx, nn

from adaptc.errors import ConfigError, InputError
from adaptc.inputs import contiguous_call

ADAPTER_INDEX = "adapter_index"  # the graph input's name
STACKED_ATTR = "_adaptc_stacked"  # the stacked sites' module dict in the new graph module
INDEX_ATTR = "_adaptc_stacked_index"  # the node that hands every site the row indices


class RowIndex(nn.Module):
    """The rows' adapter indices, as one graph node every stacked site reads.

    The index is not a placeholder of the graph (that would change the captured graph's calling
    convention): :meth:`StackedAdapters.rows` puts it here for the length of a call, and this node
    returns it, ``-1`` mapped to the base entry. Under torch.export it is a traced input like any other.
    """

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count  # adapters; the base entry is at index ``count``
        self._slot: list[torch.Tensor] = []  # a plain list: export refuses tensor attributes set in forward

    def forward(self) -> torch.Tensor:
        if not self._slot:
            raise InputError("a stacked-adapters graph runs inside StackedAdapters.rows(adapter_index)")
        index = self._slot[-1]
        # -1 is the base entry; other indices go to Gather as they are (-2 ... -(n + 1) count from the end;
        # beyond that, Gather's own error). Made explicit for F.embedding, which takes no negative index.
        return torch.where(index == -1, self.count, index)


class StackedLora(nn.Module):
    """One LoRA site with every adapter stacked: ``base + B[i] A[i] x`` for each row's index ``i``.

    ``lora_A``: ``[n + 1, r, in]`` (embedding: ``[(n + 1) * vocab, r]``, one table per adapter),
    ``lora_B``: ``[n + 1, out, r]`` with the scale folded in; entry ``n`` (the base) is zero.
    ``magnitude_scale`` (DoRA at the site): ``[n + 1, out]``, 1 for the rows without DoRA.
    """

    def __init__(self, kind: str, a: torch.Tensor, b: torch.Tensor, magnitude_scale: torch.Tensor | None) -> None:
        super().__init__()
        self.kind = kind
        self.count = b.shape[0]
        self.in_features = a.shape[0] // self.count if kind == "embedding" else a.shape[-1]
        self.register_buffer("lora_A", a)
        self.register_buffer("lora_B", b)
        self.register_buffer("magnitude_scale", magnitude_scale)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, entries={self.count}, r={self.lora_B.shape[-1]}, dora={self.magnitude_scale is not None}"

    def forward(self, x: torch.Tensor, base: torch.Tensor, index: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        batch = index.shape[0]
        if self.kind == "embedding":
            # one table of (n + 1) * vocab rows: row i's token t is entry i * vocab + t
            ids = index[:, None] * self.in_features + x.reshape(batch, -1)
            hidden = F.embedding(ids, self.lora_A)  # [batch, tokens, r]
        else:
            # [batch, tokens, in] whatever the site's layout ([b, t, in], or GPT-2's flattened [b * t, in])
            rows = x.to(self.lora_A.dtype).reshape(batch, -1, self.in_features)
            hidden = torch.matmul(rows, self.lora_A[index].transpose(1, 2))
        delta = torch.matmul(hidden, self.lora_B[index].transpose(1, 2))  # [batch, tokens, out]
        out_features = delta.shape[-1]
        if self.magnitude_scale is None:
            return base + delta.reshape(base.shape).to(base.dtype)
        # DoRA: y = base + (m / ||W + dW|| - 1) * (W x) + m / ||W + dW|| * dW x, per row's adapter
        scale = self.magnitude_scale[index].unsqueeze(1)  # [batch, 1, out]
        plain = (base if bias is None else base - bias).reshape(batch, -1, out_features)
        update = (scale - 1) * plain.to(delta.dtype) + scale * delta
        return base + update.reshape(base.shape).to(base.dtype)


@dataclass
class StackedAdapters:
    """The graph with every LoRA site stacked, and how to choose each row's adapter."""

    module: fx.GraphModule
    adapters: list[str]  # index -> adapter name
    sites: int  # stacked site uses in the graph

    @property
    def base_index(self) -> int:
        """The index of the base model (no adapter); ``-1`` means it too."""
        return len(self.adapters)

    def index_for(self, names: Sequence[str | None]) -> torch.Tensor:
        """``adapter_index`` for one adapter name per row (``None`` or ``"__base__"``: the base model)."""
        from adaptc.mixed_batch import BASE

        unknown = sorted({n for n in names if n not in (None, BASE) and n not in self.adapters})
        if unknown:
            raise ConfigError(f"unknown adapter {', '.join(map(repr, unknown))}; the graph stacks {', '.join(self.adapters)}")
        return torch.tensor([self.base_index if n in (None, BASE) else self.adapters.index(n) for n in names],
                            dtype=torch.long)

    @contextlib.contextmanager
    def rows(self, adapter_index: torch.Tensor) -> Iterator[None]:
        """Within the block, calls of :attr:`module` give row ``i`` adapter ``adapter_index[i]``."""
        slot = self.module.get_submodule(INDEX_ATTR)._slot
        slot.append(adapter_index)
        try:
            yield
        finally:
            slot.pop()


class IndexedCall(nn.Module):
    """``forward(*tensors, adapter_index)``: ``module(*tensors)`` with each row's adapter, for export.

    ``module`` calls ``stacked.module`` (a :class:`~targets.flat.FlatCall` over it, for instance).
    ``batch_input``: the position of a tensor whose first axis is the batch (None: none), so that the
    exported ``adapter_index`` shares its batch axis instead of getting a size of its own.
    """

    def __init__(self, module: nn.Module, stacked: StackedAdapters, batch_input: int | None = 0) -> None:
        super().__init__()
        self.module = module
        self._stacked = stacked  # not a submodule: ``module`` reaches the same graph
        self.batch_input = batch_input

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *tensors, adapter_index = flat
        if self.batch_input is not None:
            torch._check(adapter_index.shape[0] == tensors[self.batch_input].shape[0])
        with self._stacked.rows(adapter_index):
            return self.module(*tensors)


# --- checks ----------------------------------------------------------------------------------------

def stackable_adapters(am: nn.Module, adapters: Sequence[str] | None = None) -> list[str]:
    """The adapters to stack, in order; a ConfigError when one cannot be (see the module docstring)."""
    names = list(am.adapters) if adapters is None else list(adapters)
    if not names:
        raise ConfigError("mixed adapters need at least one adapter: this model has none; inject or load one first")
    unknown = [n for n in names if n not in am.adapters]
    if unknown:
        raise ConfigError(f"unknown adapter {unknown[0]!r}; this model has: {', '.join(am.adapters)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapters to stack are named twice: {names}")
    others = [n for n in am.adapters if am.adapter_record(n).method.name != "lora"]
    if others:
        method = am.adapter_record(others[0]).method.name
        raise ConfigError(
            f"adapter {others[0]!r} is a {method!r} adapter: mixed-adapter graphs stack LoRA adapters only (virtual "
            f"tokens or prefixes would change every row's shapes); delete_adapter({others[0]!r}) first, or export it "
            "on its own with merge=True"
        )
    for name in names:
        for key, layer in am.adapters[name].items():
            if layer.kind == "conv":
                raise ConfigError(
                    f"adapter {name!r} adapts the conv site {key.replace('__', '.')}: mixed-adapter graphs stack LoRA "
                    "on linear and embedding sites only; export such adapters one at a time (merge=False gives "
                    "swappable .onnx_adapter files)"
                )
    return names


# --- the rewrite -----------------------------------------------------------------------------------

@dataclass
class _Use:
    """One adapter's application at one use of a site's op in the graph."""

    out: fx.Node  # what the graph read as the adapted output
    x: fx.Node
    base: fx.Node
    bias: fx.Node | None
    layer: LoraLayer


def stacked_adapters_graph(am: nn.Module, graph: fx.GraphModule,
                           adapters: Sequence[str] | None = None) -> StackedAdapters:
    """A copy of ``graph`` in which every adapted op of ``adapters`` (default: all, in ``am.adapters`` order)
    runs one :class:`StackedLora` instead of one LoRA node per adapter; see the module docstring. The
    adapters not named leave the copy (no row gets them). For inference: LoRA dropout is not applied."""
    names = stackable_adapters(am, adapters)
    owner = {id(layer): (name, key) for name in names for key, layer in am.adapters[name].items()}
    gm = fx.GraphModule(graph, copy.deepcopy(graph.graph), class_name=type(graph).__name__ + "Stacked")
    restore_bases(gm)  # sibling groups may have taken their base ops in: the stacked sites read them
    uses = _adapter_uses(gm)
    # Every adapter node leaves the graph: its users read its base output, which is the op itself
    # once the whole chain of adapters at that op is gone. Last first: an adapter's base output may be
    # the adapter applied before it, whose own users are then redirected in turn.
    replaced: dict[fx.Node, fx.Node] = {}
    for use in reversed(uses):
        use.out.replace_all_uses_with(use.base)
        replaced[use.out] = use.base
    for node in reversed(list(gm.graph.nodes)):
        if node in replaced or (node.op == "call_module" and not node.users and _is_adapter_module(gm, node)):
            gm.graph.erase_node(node)

    stacked_at: dict[fx.Node, fx.Node] = {}  # a site's op -> the stacked node that now stands for its output

    def current(node: fx.Node) -> fx.Node:
        """What the graph reads now in place of ``node``: a site's input can be another site's output."""
        while node in replaced:
            node = replaced[node]
        return stacked_at.get(node, node)

    def root(node: fx.Node) -> fx.Node:
        while node in replaced:
            node = replaced[node]
        return node

    groups: dict[tuple[str, fx.Node], list[_Use]] = {}
    for use in uses:
        if id(use.layer) in owner:
            groups.setdefault((owner[id(use.layer)][1], root(use.base)), []).append(use)
    index = _index_node(gm, len(names))
    modules = nn.ModuleDict()
    gm.add_module(STACKED_ATTR, modules)
    for number, ((key, op), members) in enumerate(groups.items()):
        modules[str(number)] = _stack_site(am, names, key, members[0].layer.kind)
        x, bias = current(members[0].x), members[0].bias
        with gm.graph.inserting_after(op):
            stacked = gm.graph.call_module(f"{STACKED_ATTR}.{number}", (x, op, index, bias))
        stacked.meta = {k: v for k, v in op.meta.items() if k in ("nn_module_stack", "stack_trace")}
        op.replace_all_uses_with(stacked, delete_user_cb=lambda user, stacked=stacked: user is not stacked)
        stacked_at[op] = stacked
    stable_topological_sort(gm.graph)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # The captured graph was traced on contiguous tensors: a sliced input is made contiguous first, as
    # the captured graph module itself does.
    gm.register_forward_pre_hook(lambda _m, args, kwargs: contiguous_call(args, kwargs), with_kwargs=True)
    return StackedAdapters(gm, names, len(groups))


def _is_adapter_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = gm.get_submodule(node.target)
    return isinstance(module, (LoraLayer, LoraSiblings))


def _adapter_uses(gm: fx.GraphModule) -> list[_Use]:
    """Every LoRA application in ``gm``, in graph order: per-site nodes and each output of a sibling group."""
    uses = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, LoraSiblings):
            count = len(module.layers)
            for user in list(node.users):  # getitem(group, i)
                i = user.args[1]
                uses.append(_Use(user, node.args[0], node.args[1 + i], node.args[1 + 2 * count + i], module.layers[i]))
        elif isinstance(module, LoraLayer):
            bias = node.args[3] if len(node.args) > 3 else None
            uses.append(_Use(node, node.args[0], node.args[1], bias, module))
    return uses


def _index_node(gm: fx.GraphModule, count: int) -> fx.Node:
    gm.add_module(INDEX_ATTR, RowIndex(count))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    where = gm.graph.inserting_after(placeholders[-1]) if placeholders else gm.graph.inserting_before()
    with where:
        return gm.graph.call_module(INDEX_ATTR, ())


@torch.no_grad()
def _stack_site(am: nn.Module, names: list[str], key: str, kind: str) -> StackedLora:
    """The stacked tensors of one site: entry i is adapter names[i] (zeros where it has no layer), then the base."""
    layers = [am.adapters[name][key] if key in am.adapters[name] else None for name in names]
    present = [layer for layer in layers if layer is not None]
    rank = max(layer.r for layer in present)
    first = present[0]
    embedding = kind == "embedding"
    a_full = first.lora_embedding_A if embedding else first.lora_A
    b_full = first.lora_embedding_B if embedding else first.lora_B
    in_features, out_features, dtype = a_full.shape[1], b_full.shape[0], a_full.dtype
    a = torch.zeros(len(names) + 1, rank, in_features, dtype=dtype)
    b = torch.zeros(len(names) + 1, out_features, rank, dtype=dtype)
    dora = any(layer.use_dora for layer in present)
    magnitude = torch.ones(len(names) + 1, out_features, dtype=dtype) if dora else None
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        la = layer.lora_embedding_A if embedding else layer.lora_A
        lb = layer.lora_embedding_B if embedding else layer.lora_B
        a[i, : layer.r] = la.detach().cpu()
        b[i, :, : layer.r] = lb.detach().cpu() * layer.scaling  # folded: the graph runs every adapter at scale 1
        if layer.use_dora:
            weight = am.base_model.get_parameter(_site_weight(am, names[i], key)).detach()
            norm = layer._weight_norm(weight).reshape(-1)
            magnitude[i] = (layer.lora_magnitude_vector / norm).detach().cpu()
    if embedding:  # one lookup table: [(n + 1) * vocab, r]
        a = a.transpose(1, 2).reshape(-1, rank).contiguous()
    device = a_full.device
    return StackedLora(kind, a.to(device), b.to(device), magnitude.to(device) if dora else None)


def _site_weight(am: nn.Module, name: str, key: str) -> str:
    return next(site.weight for site in am.adapter_sites(name) if site_key(site.name) == key)
