"""Activation checkpointing: a training graph's repeated blocks recomputed in the backward.

A training step keeps, for the backward, the activations of every op of every layer. This pass (training
graphs only, off by default: ``am.gradient_checkpointing_enable()``) cuts the graph at its repeated
blocks and runs each block through ``torch.utils.checkpoint.checkpoint``: the forward keeps the block's
inputs only, and the backward runs the block again to get the rest.

**Finding the blocks.** torch.export (and torch.fx) record, per node, the stack of modules whose forward
produced it (``node.meta["nn_module_stack"]``). A *block* is a child ``<list>.<i>`` of a container whose
children share a class (a ``ModuleList`` / ``Sequential`` of layers: ``model.layers.0``, ``transformer.h.3``,
``encoder.layer.11``, T5's ``encoder.block.N`` and ``decoder.block.N`` alike) and which ran modules of its
own (a single ``Linear`` or ``ReLU`` in a ``Sequential`` is no block). The outermost such module of a node is
its block, so the experts of a mixture-of-experts layer stay inside their layer. No class name is read.
A block's *region* is its longest run of consecutive nodes (nodes without a module stack, such as a LoRA
group's ``getitem``, may sit inside it); any run of consecutive nodes can become one call, so a block
whose nodes a pass moved apart only loses part of its saving. A block that writes in place into a tensor
it does not own (batch norm's running statistics; a LoRA group writing into a base output computed
outside the block) is left as it is: its recompute would write twice.

**Wrapping.** The region's nodes move into a ``GraphModule`` of their own (the *body*), called by one
:class:`CheckpointedBlock` node with the values the region reads (parameters and buffers included: the
graph's ``get_attr`` nodes stay in the outer graph, so moving the model and FSDP's re-pointing reach
them); ``getitem`` nodes hand on the values used later. Adapters are ``call_module`` nodes of the body
that reach the same module objects, so their parameters train as before. The region as it was is kept,
and :func:`inline` puts it back: passes that rewrite graphs see them as captured (the pass manager undoes
this pass around them, see ``PassManager.run_one``), and disabling restores the plain graph.

**Policies.** ``"full"`` recomputes the whole block. ``"selective"`` keeps the outputs of the block's
matmul-like and attention ops and recomputes the rest (norms, activations, element-wise ops, dropout):
torch's selective activation checkpointing (``create_selective_checkpoint_contexts``) with a policy that
keeps what the ops in :data:`KEPT_OPS` return as they reach the dispatcher (``linear`` / ``matmul`` /
``einsum`` arrive as ``mm``, ``addmm``, ``bmm``; ``scaled_dot_product_attention`` as its flash / efficient
/ cuDNN / CPU-flash kernel; convolutions; adaptc's quantized linear). The GEMMs that LoRA groups run
inside themselves are kept too. Random ops are always recomputed (same RNG state, same values). A kept
output that is then written into in place (a LoRA group adds into its base output) is kept with the
write (:class:`_SelectivePolicy`).

**What the recompute sees.** ``preserve_rng_state`` (on by default) replays the forward's RNG state, so
dropout draws the same masks. Adapter state that a call sets for its own length (``adapter_names`` rows,
``disable_adapters()``, ``set_adapter``, train / eval flags) is recorded by the forward and put back
around the recompute, so a backward run after the call computes the gradients of the call that was made.

``use_reentrant=True`` (accepted for transformers' ``gradient_checkpointing_kwargs``) runs torch's
reentrant variant; a requires-grad placeholder input makes the block's output need a gradient even when
its inputs do not (frozen embeddings), so the adapters inside still get theirs: no
``enable_input_require_grads`` needed. It supports ``loss.backward()`` only (not ``torch.autograd.grad``)
and the ``"full"`` policy only.
"""

from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import checkpoint as torch_checkpoint

from adaptc.errors import ConfigError

from . import lora_fused
from .manager import GraphPass

BLOCKS_ATTR = "_adaptc_checkpoint_blocks"  # the ModuleDict (on the graph module) of the blocks' call nodes
POLICIES = ("full", "selective")
_KWARGS = ("use_reentrant", "preserve_rng_state", "policy", "every_n_layers")


@dataclass(frozen=True)
class CheckpointSettings:
    """How the blocks are checkpointed (``gradient_checkpointing_kwargs``, validated)."""

    policy: str = "full"
    use_reentrant: bool = False
    preserve_rng_state: bool = True
    every_n_layers: int = 1  # checkpoint blocks 0, n, 2n, ... (transformers' option); the others keep everything

    def describe(self) -> str:
        every = f", every {self.every_n_layers} blocks" if self.every_n_layers != 1 else ""
        return f"{self.policy}{', reentrant' if self.use_reentrant else ''}{every}"


def make_settings(kwargs: dict[str, Any] | None = None, *, every_n_layers: int = 1,
                  offload: bool = False) -> CheckpointSettings:
    """Settings from transformers' / PEFT's ``gradient_checkpointing_kwargs`` (``use_reentrant``,
    ``preserve_rng_state``) plus adaptc's ``policy`` (``"full"`` | ``"selective"``); ConfigError on anything else."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"gradient_checkpointing_kwargs must be a dict or None, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise ConfigError(
            f"gradient_checkpointing_kwargs has {', '.join(map(repr, unknown))}; adaptc takes "
            f"{', '.join(map(repr, _KWARGS))} (policy: 'full' or 'selective')"
        )
    if offload:
        raise ConfigError("offloading checkpointed activations to the CPU (offload=True) is not supported; "
                          "leave it False (what is kept is only each block's inputs)")
    policy = kwargs.get("policy", "full")
    if policy is None or policy is True:
        policy = "full"
    if policy not in POLICIES:
        raise ConfigError(f"gradient checkpointing policy must be 'full' or 'selective', got {policy!r}")
    every = kwargs.get("every_n_layers", every_n_layers)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every_n_layers must be a positive integer, got {every!r}")
    reentrant = kwargs.get("use_reentrant", False)
    reentrant = False if reentrant is None else reentrant
    for name, value in (("use_reentrant", reentrant), ("preserve_rng_state", kwargs.get("preserve_rng_state", True))):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
    if policy == "selective" and not SELECTIVE_SUPPORTED:
        raise ConfigError(f"the 'selective' policy needs a newer torch than {torch.__version__} (its selective "
                          "checkpointing policy must see each op's output); use policy='full'")
    if reentrant and policy == "selective":
        raise ConfigError("the 'selective' policy needs use_reentrant=False (torch's selective checkpointing is "
                          "non-reentrant only)")
    return CheckpointSettings(policy, reentrant, kwargs.get("preserve_rng_state", True), every)


def checkpoint_kwargs(option: Any) -> dict[str, Any] | None:
    """``inject(gradient_checkpointing=...)`` as ``gradient_checkpointing_kwargs`` (None: off), validated:
    False / None (off), True / ``"full"``, ``"selective"``, or a dict of the kwargs themselves."""
    if option is None or option is False:
        return None
    if option is True:
        kwargs: dict[str, Any] = {}
    elif isinstance(option, str):
        kwargs = {"policy": option}
    elif isinstance(option, dict):
        kwargs = dict(option)
    else:
        raise ConfigError(f"gradient_checkpointing must be True, False, 'full', 'selective' or a dict, got {option!r}")
    make_settings(kwargs)
    return kwargs


# --- finding the blocks ----------------------------------------------------------------------------

_OUTSIDE = object()  # label of a node a module outside every block produced


def _module_path(raw: str) -> str:
    """``model.layers.0`` from a recorded path (``L['self'].model.layers[0]`` in older formats too)."""
    path = raw
    for head in ("L['self'].", "L['self']", "L__self__."):
        if path.startswith(head):
            path = path[len(head):]
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").strip(".")


def _stack(node: fx.Node) -> list[tuple[str, str]] | None:
    """(module path, class) of the modules whose forward produced ``node``, outermost first; None: unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entries = []
    for value in stack.values():
        path, cls = value if isinstance(value, tuple) and len(value) == 2 else (value, "")
        if str(path).startswith("_empty_nn_module_stack"):
            return None
        cls = cls if isinstance(cls, str) else f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', cls)}"
        entries.append((_module_path(str(path)), cls))
    return entries


def _block_paths(stacks: dict[fx.Node, list[tuple[str, str]]]) -> set[str]:
    """The module paths that are blocks: children ``<list>.<i>`` of one container sharing a class, at least
    two of them, each having run modules of its own."""
    children: dict[str, dict[str, str]] = {}
    paths: set[str] = set()
    for stack in stacks.values():
        for path, cls in stack:
            paths.add(path)
            parent, _, index = path.rpartition(".")
            if index.isdigit():
                children.setdefault(parent, {})[path] = cls
    composite = {".".join(path.split(".")[:i]) for path in paths for i in range(1, path.count(".") + 1)}
    blocks = set()
    for members in children.values():
        by_class: dict[str, list[str]] = {}
        for path, cls in members.items():
            if path in composite:
                by_class.setdefault(cls, []).append(path)
        for same in by_class.values():
            if len(same) >= 2:
                blocks.update(same)
    return blocks


def find_blocks(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """Each block's region, in graph order: (module path, its longest run of consecutive nodes).

    ``get_attr`` nodes inside a run are not part of it (they stay where they are: the block reads them).
    """
    stacks = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            stack = _stack(node)
            if stack is not None:
                stacks[node] = stack
    blocks = _block_paths(stacks)
    if not blocks:
        return []

    def label(node: fx.Node) -> Any:
        stack = stacks.get(node)
        if stack is None:
            return None
        return next((path for path, _ in stack if path in blocks), _OUTSIDE)

    runs: dict[str, list[fx.Node]] = {}
    current, run, pending = None, [], []

    def close() -> None:
        if current is not None and len(run) > len(runs.get(current, ())):
            runs[current] = list(run)

    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            if node.op == "get_attr":
                continue
            close()
            current, run, pending = None, [], []
            continue
        name = label(node)
        if name is None:
            pending.append(node)
        elif name is _OUTSIDE:
            close()
            current, run, pending = None, [], []
        elif name == current:
            run.extend(pending)
            run.append(node)
            pending = []
        else:
            close()
            current, run, pending = name, [node], []
    close()
    position = _position(graph)
    return sorted(runs.items(), key=lambda item: position[item[1][0]])


def _position(graph: fx.Graph) -> dict[fx.Node, int]:
    return {node: i for i, node in enumerate(graph.nodes)}


# --- in-place writes -------------------------------------------------------------------------------

def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s value may alias its first argument (view ops, ``getitem`` of a tuple)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


_BATCH_NORMS = ("aten::batch_norm", "aten::native_batch_norm", "aten::_native_batch_norm_legit",
                "aten::cudnn_batch_norm", "aten::miopen_batch_norm", "aten::instance_norm")


def _written_args(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The arguments ``node`` writes into in place: by its schema, LoRA groups' base outputs, batch norm's
    running statistics."""
    if node.op == "call_module" and node.target.startswith(lora_fused.SIBLINGS_ATTR + "."):
        count = len(gm.get_submodule(node.target).layers)
        return [a for a in node.args[1 : 1 + count] if isinstance(a, fx.Node)]
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return []
    written = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            written.append(node.args[i] if i < len(node.args) else node.kwargs.get(argument.name))
    if schema.name in _BATCH_NORMS:
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        if training:
            written.extend(node.args[3:5])  # running_mean, running_var
    return [w for w in written if isinstance(w, fx.Node)]


def _root(node: fx.Node, inside: set[fx.Node]) -> fx.Node:
    """The node whose memory ``node`` views (followed while inside the region)."""
    while node in inside and _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _writes_outside(gm: fx.GraphModule, region: list[fx.Node]) -> bool:
    """Whether the region writes in place into memory it did not allocate (its recompute would write again)."""
    inside = set(region)
    return any(_root(arg, inside) not in inside for node in region for arg in _written_args(node, gm))


# --- the selective policy ----------------------------------------------------------------------------

# Ops whose outputs the selective policy keeps, by schema name, as they reach the dispatcher (``linear``,
# ``matmul`` and ``einsum`` arrive as mm / addmm / bmm, ``scaled_dot_product_attention`` as its kernel).
KEPT_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::_scaled_mm",
    "aten::convolution", "aten::_convolution", "aten::cudnn_convolution", "aten::mkldnn_convolution",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward", "adaptc::quant_linear",
})


def _storages(value: Any) -> set[int]:
    found = set()
    for leaf in torch.utils._pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            try:
                found.add(leaf.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # no storage (a subclass, a meta tensor)
                continue
    found.discard(0)  # empty storages share the null pointer
    return found


class _SelectivePolicy:
    """One block call's policy: keep the outputs of :data:`KEPT_OPS`, recompute everything else.

    A kept output that an op then writes into in place (a LoRA group adds its update into the base GEMM's
    output; attention's math path adds the mask into its scores) is kept with the write: the in-place op is
    kept too, so the recompute takes the final value and writes nothing. That is exact only when nothing
    read the value between the GEMM and the write, which the policy checks (views do not count as reads);
    otherwise it raises rather than compute wrong gradients.
    """

    def __init__(self) -> None:
        self.kept: dict[int, bool] = {}  # storage of a kept output -> whether a recomputed op has read it

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        policy = torch_checkpoint.CheckpointPolicy
        schema = getattr(op, "_schema", None)
        out = _storages(ctx.op_output)
        written: set[int] = set()
        if schema is not None and schema.is_mutable:
            for i, argument in enumerate(schema.arguments):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    written |= _storages(args[i] if i < len(args) else kwargs.get(argument.name))
        # Random ops are recomputed from the replayed RNG state, like every other random op of the block.
        random = torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())
        touched = written & self.kept.keys()
        if touched:
            if random or any(self.kept[p] for p in touched):
                raise RuntimeError(
                    f"selective activation checkpointing cannot keep the output of a matmul or attention op that "
                    f"{op} then writes into in place after another op read it; use policy='full'"
                )
            return policy.MUST_SAVE  # kept with the write (an op that is not recomputed reads nothing again)
        if schema is not None and schema.name in KEPT_OPS and not schema.is_mutable and not random:
            for p in out:
                self.kept[p] = False
            return policy.MUST_SAVE
        for p in _storages((args, kwargs)) & self.kept.keys():
            if p not in out:  # a view of a kept output reads nothing
                self.kept[p] = True
        return policy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    # allow_cache_entry_mutation: the writes into kept outputs are the ones _SelectivePolicy kept (see there).
    return torch_checkpoint.create_selective_checkpoint_contexts(_SelectivePolicy(), allow_cache_entry_mutation=True)


_CHECKPOINT_OPTIONS = inspect.signature(torch_checkpoint.checkpoint).parameters
# SAC's kept tensors pass through the caller's saved-tensors hooks (save_on_cpu, a memory count) where torch can.
_RESPECTS_HOOKS = "respect_saved_tensors_hooks" in _CHECKPOINT_OPTIONS
SELECTIVE_SUPPORTED = "op_output" in inspect.signature(torch_checkpoint.SelectiveCheckpointContext).parameters


# --- the block module --------------------------------------------------------------------------------

_STATE = ("training", "active", "_rows")


class CheckpointedBlock(nn.Module):
    """One block of a training graph, run under ``torch.utils.checkpoint``.

    ``body`` computes the block (a GraphModule reaching the graph module's own adapter modules); the
    region as captured is kept for :func:`inline`. Neither is registered: the parameters belong to the
    graph module and the adapters already.
    """

    def __init__(self, path: str, body: fx.GraphModule, region: fx.Graph, settings: CheckpointSettings) -> None:
        super().__init__()
        self.path = path
        self.settings = settings
        self._body = [body]
        self._region = region
        self._state = [(m, name) for m in _stateful_modules(body) for name in _STATE if hasattr(m, name)]

    @property
    def body(self) -> fx.GraphModule:
        return self._body[0]

    @property
    def region(self) -> fx.Graph:
        return self._region

    def extra_repr(self) -> str:
        return f"{self.path}, {self.settings.describe()}"

    def adapted_uses(self) -> int:
        """The adapted op uses inside (for the pass manager's debug check)."""
        from .manager import adapted_uses

        return adapted_uses(self.body)

    def forward(self, *args: Any) -> Any:
        body = self.body
        if not torch.is_grad_enabled():
            return body(*args)
        state = [(m, name, getattr(m, name)) for m, name in self._state]
        run = functools.partial(_recorded_state_call, body, state)
        settings = self.settings
        if settings.use_reentrant:
            # A requires-grad input makes the output need a gradient even when no input does (frozen
            # embeddings): the backward then reaches the adapters inside. Its own gradient is None.
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            anchor = torch.empty(0, device=device, requires_grad=True)
            return torch_checkpoint.checkpoint(functools.partial(_drop_last, run), *args, anchor, use_reentrant=True,
                                               preserve_rng_state=settings.preserve_rng_state)
        options: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": settings.preserve_rng_state}
        if settings.policy == "selective":
            options["context_fn"] = _selective_contexts
            if _RESPECTS_HOOKS:
                options["respect_saved_tensors_hooks"] = True
        return torch_checkpoint.checkpoint(run, *args, **options)


def _drop_last(fn: Any, *args: Any) -> Any:
    return fn(*args[:-1])


def _recorded_state_call(body: fx.GraphModule, state: list, *args: Any) -> Any:
    """``body(*args)`` with the adapter state the forward saw: a no-op in the forward, put back around the
    recompute (and the present state restored after it)."""
    changed = [(m, name, then, getattr(m, name)) for m, name, then in state if getattr(m, name) is not then]
    for m, name, then, _ in changed:
        setattr(m, name, then)
    try:
        return body(*args)
    finally:
        for m, name, _, now in changed:
            setattr(m, name, now)


def _stateful_modules(body: fx.GraphModule) -> list[nn.Module]:
    """The modules the body calls whose flags decide what a call computes (adapters and their dropout)."""
    found: dict[int, nn.Module] = {}
    for node in body.graph.nodes:
        if node.op != "call_module":
            continue
        module = body.get_submodule(node.target)
        owners = [module, *[m for m in getattr(module, "layers", []) if isinstance(m, nn.Module)]]
        for owner in owners:
            for m in owner.modules():
                found.setdefault(id(m), m)
    return list(found.values())


# --- wrap and inline -------------------------------------------------------------------------------

def _blocks_dict(gm: fx.GraphModule) -> nn.ModuleDict:
    owner = getattr(gm, BLOCKS_ATTR, None)
    if owner is None:
        owner = nn.ModuleDict()
        gm.add_module(BLOCKS_ATTR, owner)
    return owner


def _block_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(BLOCKS_ATTR + ".")]


def has_blocks(graph: fx.Graph) -> bool:
    """Whether ``graph`` calls checkpointed blocks."""
    return any(n.op == "call_module" and n.target.startswith(BLOCKS_ATTR + ".") for n in graph.nodes)


def wrap(gm: fx.GraphModule, settings: CheckpointSettings) -> int:
    """Move each block of ``gm.graph`` (every ``settings.every_n_layers``-th) into a checkpointed call;
    returns how many were wrapped."""
    made = 0
    for index, (path, run) in enumerate(find_blocks(gm.graph)):
        if index % settings.every_n_layers:
            continue
        span = [n for n in run if n.op != "get_attr"]
        region = _with_getitems(span)
        if not span or _writes_outside(gm, region):
            continue
        _wrap_region(gm, path, span[-1], region, settings)
        made += 1
    return made


def _with_getitems(region: list[fx.Node]) -> list[fx.Node]:
    """The region plus the ``getitem`` nodes that unpack its multi-output nodes (the block returns tensors)."""
    inside = set(region)
    extra = [u for n in region for u in n.users if u not in inside and u.op == "call_function"
             and u.target is operator.getitem and u.args[0] is n]
    return region + [u for u in dict.fromkeys(extra)]


def _wrap_region(gm: fx.GraphModule, path: str, last: fx.Node, region: list[fx.Node],
                 settings: CheckpointSettings) -> None:
    """Replace ``region`` (a run of consecutive nodes ending at ``last``, plus getitems of its tuples) by a call.

    The call goes where ``last`` was: everything the region reads comes before it, and everything that
    reads the region's values comes after it (after the run, or after a getitem that came after the run).
    """
    graph = gm.graph
    inside = set(region)
    inputs: list[fx.Node] = []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    original = _copy_region(region, inputs, outputs)
    body = fx.GraphModule(gm, _copy_region(region, inputs, outputs), class_name="CheckpointedBlockBody")
    owner = _blocks_dict(gm)
    index = len(owner)
    while f"b{index}" in owner:
        index += 1
    key = f"b{index}"
    owner[key] = CheckpointedBlock(path, body, original, settings)
    with graph.inserting_after(last):
        call = graph.call_module(f"{BLOCKS_ATTR}.{key}", tuple(inputs))
    call.meta["adaptc_checkpoint_block"] = path
    previous = call
    for i, out in enumerate(outputs):
        with graph.inserting_after(previous):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta = {k: v for k, v in out.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
        out.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
        previous = item
    position = _position(graph)
    for node in sorted(region, key=position.__getitem__, reverse=True):
        graph.erase_node(node)


def _copy_region(region: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = copy.placeholder(node.name)
        env[node].meta = {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")}
    for node in region:
        env[node] = copy.node_copy(node, env.__getitem__)
    copy.output(tuple(env[n] for n in outputs))
    return copy


def inline(gm: fx.GraphModule) -> bool:
    """Put every checkpointed block's nodes back into ``gm.graph``; returns whether there were any."""
    calls = _block_nodes(gm)
    if not calls:
        return False
    graph = gm.graph
    owner = getattr(gm, BLOCKS_ATTR)
    for call in calls:
        block = gm.get_submodule(call.target)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in block.region.nodes if n.op == "placeholder"]
        for placeholder, arg in zip(placeholders, call.args):
            env[placeholder] = arg
        results: tuple = ()
        with graph.inserting_before(call):
            for node in block.region.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    results = node.args[0]
                    continue
                env[node] = graph.node_copy(node, env.__getitem__)
        for user in list(call.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(env[results[user.args[1]]])
                graph.erase_node(user)
        graph.erase_node(call)
        del owner[call.target.split(".", 1)[1]]
    return True


class CheckpointPass(GraphPass):
    """Activation checkpointing of a training graph's repeated blocks (``run``), reversible (``undo``)."""

    name = "activation-checkpointing"
    modes = frozenset({True})
    needs_frozen_ops = False

    def __init__(self, settings: CheckpointSettings | None = None) -> None:
        self.settings = settings or CheckpointSettings()

    def run(self, gm: fx.GraphModule) -> bool:
        inline(gm)
        # The LoRA groups take their frozen ops in before the blocks are cut (the manager's absorb-bases
        # pass; done here too when this pass runs again after a pass that needed the frozen ops).
        lora_fused.absorb_bases(gm)
        return wrap(gm, self.settings) > 0

    def undo(self, gm: fx.GraphModule) -> bool:
        return inline(gm)

    def __repr__(self) -> str:
        return f"<CheckpointPass {self.settings.describe()}>"
