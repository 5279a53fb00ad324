"""Training an AdaptedModel with torch.distributed: DDP, FSDP2 and launching torchrun.

adaptc brings no trainer of its own. An AdaptedModel is an ``nn.Module`` whose only
parameters with ``requires_grad`` are the active adapters', so plain
``DistributedDataParallel(am)`` communicates adapter gradients only; the helpers here cover
what the wrappers cannot know:

- :func:`save_adapter`: rank 0 writes the checkpoint (atomically, as ``am.save_adapter`` does),
  the others wait for it, and an error on rank 0 is raised on every rank instead of hanging.
- :func:`fully_shard_adapted`: FSDP2, one unit per repeated block plus the root. FSDP replaces
  parameters with sharded ones and swaps in the unsharded ones around each unit's forward; the
  captured graphs never call the blocks' forward and hold parameter references of their own, so
  nodes at each block's boundaries in the graphs run the unit's gather and free and point the
  graph at the live parameters.
- :func:`adapters_in_sync`: the largest difference between this rank's adapters and rank 0's.
- :func:`launch_torchrun`: what ``adaptc train --nproc N`` runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import AdaptcError, CheckpointError, ConfigError, InputError
from .hf import unwrap

__all__ = [
    "adapters_in_sync",
    "fully_shard_adapted",
    "init_from_env",
    "is_main_process",
    "launch_torchrun",
    "save_adapter",
    "torchrun_command",
    "unwrap",
    "without_launch_options",
]

# Options of `adaptc train` that concern the launch; the launched processes must not see them.
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on global rank 0, and when torch.distributed is not initialised."""
    return not _distributed() or dist.get_rank() == 0


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a possibly sharded (FSDP2 DTensor) parameter; a collective when sharded."""
    full = getattr(p, "full_tensor", None)
    return full() if callable(full) else p


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | list[str] | None = None) -> list[Path]:
    """Save the adapters of a (DDP / FSDP2 / accelerate-wrapped) AdaptedModel from rank 0.

    Call it on every rank. FSDP2-sharded adapters are gathered first (a collective); rank 0
    then writes in PEFT's format through ``am.save_adapter`` (temporary files renamed into
    place); the other ranks wait until the files are complete, so any rank may read them
    afterwards. Returns the folders written (on every rank).
    """
    am = unwrap(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name or am.adapters)
    unknown = [n for n in names if n not in am.adapters]
    if unknown or not names:  # every rank raises alike, before any collective
        raise CheckpointError(f"unknown adapter {unknown or names!r}; this model has: {', '.join(am.adapters)}")
    # Every rank takes part in the gathers; only rank 0 keeps the full tensors.
    full: dict[tuple[int, str], nn.Parameter] = {}
    for name in names:
        for layer in am.adapters[name].values():
            for pname, p in layer.named_parameters(recurse=False):
                if hasattr(p, "full_tensor"):
                    tensor = _full(p.detach())
                    full[(id(layer), pname)] = nn.Parameter(tensor, requires_grad=False)
    error: BaseException | None = None
    folders: list[Path] = []
    if is_main_process():
        saved = {}
        try:
            for name in names:
                for layer in am.adapters[name].values():
                    for pname in list(layer._parameters):
                        if (id(layer), pname) in full:
                            saved[(layer, pname)] = layer._parameters[pname]
                            layer._parameters[pname] = full[(id(layer), pname)]
            folders = am.save_adapter(directory, adapter_name)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks learn of it
            error = exc
        finally:
            for (layer, pname), p in saved.items():
                layer._parameters[pname] = p
    if _distributed():
        box = [None if error is None else f"{type(error).__name__}: {error}", [str(f) for f in folders]]
        dist.broadcast_object_list(box, src=0)  # also the barrier: it returns once rank 0 has written
        if error is None and box[0] is not None:  # rank 0 failed writing (disk full, permissions, ...)
            raise AdaptcError(f"rank 0 could not save the adapter to {directory}: {box[0]}")
        folders = [Path(f) for f in box[1]]
    if error is not None:
        raise error
    return folders


def adapters_in_sync(model: nn.Module) -> float:
    """The largest absolute difference between this rank's adapter parameters and rank 0's (a collective).

    0.0 on every rank when they agree exactly; DDP keeps them so by construction. Sharded
    (FSDP2) parameters are gathered first, so every rank compares whole tensors.
    """
    am = unwrap(model)
    params = [p for _, p in sorted(am.adapters.named_parameters())]
    if not _distributed() or not params:
        return 0.0
    # NCCL communicates device tensors only; gloo takes CPU tensors.
    device = torch.device("cpu") if dist.get_backend() == "gloo" else params[0].device
    worst = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        mine = _full(p.detach()).to(device, torch.float64)
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (mine - reference).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def fully_shard_adapted(model: nn.Module, *, per_block: bool = True, **fsdp_options: Any) -> nn.Module:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to an AdaptedModel; returns it.

    With ``per_block`` (the default) each repeated block of the base model (the children of its
    layer list: ``model.layers.N``, ``transformer.h.N``, ``encoder.layer.N``, found from the
    captured graphs as gradient checkpointing finds them) is an FSDP unit of its own, and the
    AdaptedModel (embeddings, head, final norm, adapters) is the root unit. The captured graphs
    never call a block's ``forward``, so FSDP's module hooks would not fire: a node inserted before
    each block's region of the graph runs the unit's pre-forward (all-gather its weights, point the
    graph at them) and one after it runs the post-forward (free them again, and register the
    pre-backward all-gather on the block's outputs); the backward gathers each block again, in
    reverse order, while its gradients are computed. A step so holds one block's gathered weights at
    a time (plus one prefetched in the backward) besides the root's. ``per_block=False`` (or a model
    without repeated blocks) makes the whole model one unit: every weight gathered for the step.
    A quantized base (NF4 / int8, ``passes/quantize.py``) shards the same way: a ``QuantLinear``'s
    packed weight is a (uint8) parameter, gathered and freed with its block; its scales are buffers,
    which FSDP leaves whole on every rank.

    Adapter parameters are broadcast from rank 0 first, as DDP does, so ranks that initialised
    adapters differently still train one adapter; the base weights must already be identical on
    every rank (loaded from one checkpoint). ``fsdp_options`` go to every ``fully_shard`` call
    (``mesh``, ``reshard_after_forward``, ``mp_policy``, ...).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    am = unwrap(model)
    if model is not am:
        raise InputError(f"fully_shard_adapted takes the AdaptedModel itself, not a {type(model).__name__} around it")
    if not _distributed():
        raise ConfigError("torch.distributed is not initialised: call torch.distributed.init_process_group() first")
    sharded = [name or "<root>" for name, m in am.named_modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise ConfigError(
            f"{', '.join(sharded[:3])} already sharded with fully_shard; an AdaptedModel runs captured graphs that "
            "never call its submodules' forward, so shard only the AdaptedModel, once, with fully_shard_adapted"
        )
    if not any(p.requires_grad for p in am.parameters()):
        raise ConfigError("the AdaptedModel has no trainable parameter: add or activate an adapter first")
    blocks = _block_units(am) if per_block else {}
    with torch.no_grad():
        for p in am.adapters.parameters():
            dist.broadcast(p.data, src=0)
    for block in blocks.values():
        fully_shard(block, **fsdp_options)
    fully_shard(am, **fsdp_options)

    cache: dict[tuple, tuple[list, dict[str, list]]] = {}
    live: dict[str, list[tuple[nn.Module, str, nn.Module]]] = {}  # block path -> its bindings, for _BlockBoundary
    boundaries = {path: _BlockBoundary(path, block, live) for path, block in blocks.items()}

    def point_graphs_at_live_parameters(*_: Any) -> None:
        # Runs after FSDP's own pre-forward hook (registered first, with prepend), which unsharded the root unit,
        # and after each capture. The table is rebuilt when graphs were captured or edited; new graphs get
        # their block boundaries first.
        key = tuple((id(g), len(g._adaptc_graphs), id(g.graph), len(g.graph.nodes)) for g in am._all_graphs())
        if key not in cache:
            cache.clear()
            if boundaries:
                for graph in am._all_graphs():
                    _instrument(graph, boundaries)
                key = tuple((id(g), len(g._adaptc_graphs), id(g.graph), len(g.graph.nodes)) for g in am._all_graphs())
            cache[key] = _split_bindings(_parameter_bindings(am), blocks)
        root, by_block = cache[key]
        live.clear()
        live.update(by_block)
        for holder, leaf, owner in root:  # the blocks' parameters are pointed at when their unit is gathered
            holder._parameters[leaf] = owner._parameters[leaf]

    am.register_forward_pre_hook(point_graphs_at_live_parameters, with_kwargs=True)
    if blocks:
        capture_context = am._capture_context

        @contextlib.contextmanager
        def capture_with_weights_gathered(edits: tuple[str, ...]) -> Iterator[None]:
            # A capture runs the base model eagerly: its blocks' weights must be whole (a collective, as every
            # rank captures alike) and their FSDP hooks out of the way, or export traces FSDP itself.
            with capture_context(edits), _units_gathered([*blocks.values(), am]):
                yield

        am._capture_context = capture_with_weights_gathered
        graph_for = am.graph_for

        def graph_with_boundaries(inputs: Any) -> Any:
            graph = graph_for(inputs)  # a graph captured just now must not run before it has its boundaries
            point_graphs_at_live_parameters()
            return graph

        am.graph_for = graph_with_boundaries
    return am


@contextlib.contextmanager
def _units_gathered(units: list[nn.Module]) -> Iterator[None]:
    """Every FSDP unit of ``units`` gathered, and its forward hooks suspended; as they were afterwards."""
    sharded, hooks = [], []
    try:
        for unit in units:
            state = unit._get_fsdp_state()
            if not all(group.is_unsharded for group in state._fsdp_param_groups):
                sharded.append(unit)
            unit.unshard()
            for table in (unit._forward_pre_hooks, unit._forward_hooks):
                hooks.append((table, dict(table)))
                for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
                    table.pop(handle.id, None)
        yield
    finally:
        for table, saved in hooks:
            table.clear()
            table.update(saved)
        for unit in sharded:
            unit.reshard()


def _block_units(am: Any) -> dict[str, nn.Module]:
    """The base model's repeated blocks (path -> module), as the checkpointing pass finds them in the graphs."""
    from .passes import checkpoint as checkpointing

    paths: list[str] = []
    for graph in am._all_graphs():
        for mode_graph in graph._adaptc_graphs.values():
            for path, _ in _block_regions(mode_graph, checkpointing):
                if path not in paths:
                    paths.append(path)
    units: dict[str, nn.Module] = {}
    for path in paths:
        try:
            units[path] = am.base_model.get_submodule(path)
        except AttributeError:
            continue
    return units


def _block_regions(graph: Any, checkpointing: Any) -> list[tuple[str, list[Any]]]:
    """(block path, its nodes in graph order) for each block of ``graph``: a run of nodes, or the one call
    of a block that gradient checkpointing wrapped."""
    regions = [(path, [n for n in run if n.op != "get_attr"]) for path, run in checkpointing.find_blocks(graph)]
    regions += [(n.meta["adaptc_checkpoint_block"], [n]) for n in graph.nodes
                if n.op == "call_module" and "adaptc_checkpoint_block" in n.meta]
    return [(path, nodes) for path, nodes in regions if nodes]


class _BlockBoundary:
    """The entry and exit of one block's region of the graphs: FSDP's pre- and post-forward of its unit."""

    def __init__(self, path: str, block: nn.Module, live: dict[str, list]) -> None:
        self.path, self.block, self.live = path, block, live

        def fsdp_block_enter(*inputs: Any) -> tuple:
            args, _ = self.block._get_fsdp_state()._pre_forward(self.block, inputs, {})
            for holder, leaf, owner in self.live.get(self.path, ()):
                holder._parameters[leaf] = owner._parameters[leaf]  # the gathered parameter
            return tuple(args)

        def fsdp_block_exit(outputs: tuple) -> tuple:
            return tuple(self.block._get_fsdp_state()._post_forward(self.block, (), outputs))

        fsdp_block_enter._adaptc_fsdp = fsdp_block_exit._adaptc_fsdp = path  # type: ignore[attr-defined]
        self.enter, self.exit = fsdp_block_enter, fsdp_block_exit


def _instrument(graph: Any, boundaries: dict[str, _BlockBoundary]) -> None:
    """Insert the block boundaries into every mode's graph of ``graph`` (a CapturedGraphModule), now and
    in modes captured later; a graph whose blocks cannot be bracketed is refused."""
    def hook(gm: Any) -> None:
        _bracket_blocks(gm, boundaries)

    graph.transform_graphs(hook, remember=getattr(graph, "_adaptc_fsdp_instrumented", None) is not boundaries)
    graph._adaptc_fsdp_instrumented = boundaries


def _bracket_blocks(gm: Any, boundaries: dict[str, _BlockBoundary]) -> None:
    import operator

    from .passes import checkpoint as checkpointing

    graph = gm.graph
    if any(getattr(n.target, "_adaptc_fsdp", None) for n in graph.nodes if n.op == "call_function"):
        return  # already bracketed (a hook run again)
    position = {n: i for i, n in enumerate(graph.nodes)}
    seen = set()
    for path, span in _block_regions(graph, checkpointing):
        boundary = boundaries.get(path)
        if boundary is None or path in seen:
            continue
        seen.add(path)
        span = checkpointing._with_getitems(span) if len(span) == 1 else span
        inside = set(span)
        first, last = position[span[0]], max(position[n] for n in span)
        # Every use of the block's parameters must lie within the region, or it would read them freed.
        for node in graph.nodes:
            if node.op == "get_attr" and node.target.startswith(path + "."):
                stray = [u for u in node.users if u not in inside and not first <= position[u] <= last]
                if stray:
                    raise ConfigError(
                        f"per-block FSDP: {stray[0].name} uses {node.target} outside the region of block {path}; "
                        "pass per_block=False to fully_shard_adapted"
                    )
        inputs = list(dict.fromkeys(a for n in span for a in n.all_input_nodes
                                    if a not in inside and a.op != "get_attr"))
        outputs = [n for n in span if any(u not in inside for u in n.users)]
        with graph.inserting_before(span[0]):
            enter = graph.call_function(boundary.enter, tuple(inputs))
            for i, node in enumerate(inputs):
                item = graph.call_function(operator.getitem, (enter, i))
                node.replace_all_uses_with(item, delete_user_cb=inside.__contains__)
        tail = max(span, key=position.__getitem__)
        with graph.inserting_after(tail):
            leave = graph.call_function(boundary.exit, (tuple(outputs),))
        previous = leave
        for i, node in enumerate(outputs):
            with graph.inserting_after(previous):
                item = graph.call_function(operator.getitem, (leave, i))
            outside = {u for u in node.users if u not in inside and u is not leave}
            node.replace_all_uses_with(item, delete_user_cb=outside.__contains__)
            previous = item
    missing = [p for p in boundaries if p not in seen]
    if missing and seen:
        raise ConfigError(f"per-block FSDP: block {missing[0]} has no region in a captured graph; "
                          "pass per_block=False to fully_shard_adapted")


def _split_bindings(table: list[tuple[nn.Module, str, nn.Module]], blocks: dict[str, nn.Module]
                    ) -> tuple[list, dict[str, list]]:
    """The bindings of the root unit's parameters, and those of each block's."""
    owners = {id(m): path for path, block in blocks.items() for m in block.modules()}
    root: list = []
    by_block: dict[str, list] = {}
    for entry in table:
        path = owners.get(id(entry[2]))
        if path is None:
            root.append(entry)
        else:
            by_block.setdefault(path, []).append(entry)
    return root, by_block


def _parameter_bindings(am: Any) -> list[tuple[nn.Module, str, nn.Module]]:
    """(graph holder module, name, base model module) for every base parameter a captured graph reads.

    The same job as ``CapturedGraphModule.rebind`` for parameters only, resolved once: rebinding
    every node before each forward cost 38 ms on a 12-layer GPT-2 graph, this table well under 1 ms.
    """
    table: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for graph in am._all_graphs():
        for mode_graph in graph._adaptc_graphs.values():
            for node in mode_graph.nodes:
                if node.op != "get_attr":
                    continue
                path, _, leaf = node.target.rpartition(".")
                try:
                    owner = am.base_model.get_submodule(path)
                    holder = graph.get_submodule(path)
                except AttributeError:
                    continue  # a graph's own constant, not the model's
                if leaf in owner._parameters and leaf in holder._parameters:
                    table[(id(holder), leaf)] = (holder, leaf, owner)
    return list(table.values())


# --- torchrun ---------------------------------------------------------------------------------

def torchrun_command(
    program: Sequence[str],
    nproc: int,
    *,
    nnodes: int | str = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun command line that runs ``program`` (``["-m", "adaptc.cli", ...]`` or a script and
    its arguments) in ``nproc`` processes per node.

    One node: ``--standalone`` (a local rendezvous on a free port). Several nodes: a c10d
    rendezvous at ``rdzv_endpoint`` (``host:port`` of any one node), the same on every node.
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"--nproc must be a positive integer (processes per node), got {nproc!r}")
    if not program:
        raise ConfigError("nothing to launch: give a script or -m module and its arguments")
    multi_node = str(nnodes) not in ("1", "1:1")
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if multi_node:
        if not rdzv_endpoint:
            raise ConfigError(
                f"nnodes={nnodes}: several nodes need a rendezvous endpoint host:port reachable from every node "
                "(e.g. the first node's address and a free port such as 29500)"
            )
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        cmd += [f"--rdzv_id={rdzv_id or 'adaptc'}"]
        if node_rank is not None:
            cmd.append(f"--node_rank={node_rank}")
    else:
        cmd.append("--standalone")
    return cmd + list(program)


def without_launch_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nnodes`` / ``--node-rank`` / ``--rdzv-endpoint`` / ``--rdzv-id``
    (either ``--opt value`` or ``--opt=value``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(arg)
    return out


def init_from_env() -> tuple[int, int, torch.device]:
    """In a process torchrun started: initialise torch.distributed from its environment.

    NCCL and this process's GPU (``LOCAL_RANK``) when CUDA is available, gloo on CPU otherwise.
    Returns (rank, world size, device). Outside torchrun (no ``WORLD_SIZE``) it does nothing and
    returns (0, 1, the default device).
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not _distributed():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def launch_torchrun(argv: Sequence[str], nproc: int, **options: Any) -> int:
    """Run ``adaptc <argv>`` under torchrun with ``nproc`` processes per node; returns its exit code.

    ``argv`` is the command line after ``adaptc`` without ``--nproc`` (``["train", "model.py", ...]``);
    ``options`` as for :func:`torchrun_command` (``nnodes``, ``rdzv_endpoint``, ...). Inside
    the launched processes ``LOCAL_RANK`` / ``RANK`` / ``WORLD_SIZE`` are set, so a command that
    sees ``WORLD_SIZE`` > 1 initialises torch.distributed and wraps the model in DDP.
    """
    argv = list(argv)
    if without_launch_options(argv) != argv:
        raise ConfigError(
            f"remove {', '.join(LAUNCH_OPTIONS)} from argv (without_launch_options(argv)): the launched "
            "processes must not launch torchrun again"
        )
    cmd = torchrun_command(["-m", "adaptc.cli", *argv], nproc, **options)
    return subprocess.call(cmd)
