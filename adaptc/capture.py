"""Capture any ``nn.Module`` as a ``torch.fx.GraphModule``.

``torch.export.export(strict=False)`` with every tensor axis left for export to decide
(``Dim.AUTO``: batch and sequence/time axes come out dynamic, channel and hidden axes
static); static shapes when that fails; ``torch.fx.symbolic_trace`` as the last resort.
Capture-time rewrites (:mod:`adaptc.rewrites`) are applied around each attempt.

A captured graph bakes in the training mode (dropout, batch norm, Python branches on
``self.training``), so :class:`CapturedGraphModule` keeps one graph per mode, captured on
first use, all reading the model's own parameter and buffer objects.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import logging
import os
import re
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import rewrites
from .errors import CaptureError, InputError
from .inputs import Inputs, check_has_tensor, contiguous_call, foreign_container, normalize_inputs

GraphHook = Callable[["CapturedGraphModule"], None]

_TORCH_DIR = os.path.dirname(torch.__file__)
_PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ADAPTC_DIRS = tuple(os.path.join(_PROJECT_DIR, d) + os.sep for d in ("adaptc", "passes", "targets"))


# --- one capture attempt ------------------------------------------------------------------

def fixed_image_size(model: nn.Module) -> bool:
    """Whether the spatial axes of image inputs are captured (and exported) at the example's size.

    Vision models with attention fix their token grid (position embeddings, windows, a spatial
    reduction): other image sizes are not meant to run, and a symbolic height and width make
    torch.export reason about every window and padding expression (measured: a 2-stage Swin took
    171 s to capture and longer to export, against seconds with a static size). Convolutional
    models keep dynamic height and width.
    """
    return any("attention" in type(m).__name__.lower() for m in model.modules())


def auto_dims(value: Any, fixed_image: bool = False) -> dict[int, Any] | None:
    """``Dim.AUTO`` for every axis of a tensor (export decides), but the spatial axes of a
    [batch, channels, height, width] float input when ``fixed_image``."""
    if not isinstance(value, torch.Tensor):
        return None
    axes = range(value.dim())
    if fixed_image and value.dim() == 4 and value.is_floating_point():
        axes = range(2)
    return {axis: torch.export.Dim.AUTO for axis in axes} or None


def _dynamic_shapes(model: nn.Module, inputs: Inputs) -> Any:
    """Dim.AUTO on every axis of every tensor input (see auto_dims), keyed like export wants it."""
    fixed = fixed_image_size(model)

    def dims(value: Any) -> Any:
        if foreign_container(value):
            # Another library's registered container (transformers' DynamicCache): torch.export wants
            # the list of its children's shapes. Its 4-D tensors are not images (a cache's
            # [batch, heads, sequence, head_dim]): every axis is left to export.
            children, _context = pytree.SUPPORTED_NODES[type(value)].flatten_fn(value)
            return [_map_shapes(auto_dims, child) for child in children]
        return auto_dims(value, fixed)

    try:
        bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    except (TypeError, ValueError):
        return _map_shapes(dims, (inputs.args, inputs.kwargs))
    return {name: _map_shapes(dims, value) for name, value in bound.arguments.items()}


def _map_shapes(dims: Callable[[Any], Any], value: Any) -> Any:
    """``dims`` over the leaves of ``value``, stopping at containers that are not built in."""
    return pytree.tree_map(dims, value, is_leaf=foreign_container)


_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export", "torch._dynamo")


@contextlib.contextmanager
def _quiet_torch_logs():
    """Failed attempts are reported by adaptc; torch's own log lines (graph dumps) would only add noise."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def _export(model: nn.Module, inputs: Inputs, training: bool, dynamic: bool) -> torch.fx.GraphModule:
    shapes = _dynamic_shapes(model, inputs) if dynamic else None
    with _mode(model, training), rewrites.applied(model, training), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # torch.export prints the partial graph of a failed attempt to stderr; adaptc reports failures itself.
        with contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=shapes, strict=False)
    gm = ep.module()
    gm.meta["adaptc_static_dims"] = _static_dims(ep)
    return gm


def _static_dims(ep: torch.export.ExportedProgram) -> list[dict[int, int]]:
    """Per user input (flattened), the axes export specialised and their sizes (or, for a dynamic axis
    export bounded, ``(low, high)``, either None when unbounded).

    A dimension stays symbolic in the placeholder metadata even when export specialised it;
    it is dynamic only if its symbol is among the program's range constraints.
    """
    dynamic_symbols = set(ep.range_constraints)
    user_inputs = set(ep.graph_signature.user_inputs)
    dims = []
    for node in ep.graph.find_nodes(op="placeholder"):
        if node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        static = {}
        if isinstance(val, torch.Tensor):
            for axis, size in enumerate(val.shape):
                if isinstance(size, int):
                    static[axis] = size
                elif not (size.node.expr.free_symbols & dynamic_symbols):
                    static[axis] = int(size.node.hint if size.node.hint is not None else size)
                elif size.node.expr in dynamic_symbols:
                    # Dynamic, but export may have bounded it (a guard such as x.size(2) <= 32 where a
                    # small image makes a feature map 1x1). Outside the bounds the graph's guard fails:
                    # accepts() says no, and a graph is captured for those inputs instead.
                    bounds = ep.range_constraints[size.node.expr]
                    low, high = _bound(bounds.lower), _bound(bounds.upper)
                    low = low if low is not None and low > 2 else None  # 0/1 specialisation is the default
                    if low is not None or high is not None:
                        static[axis] = (low, high)
        dims.append(static)
    return dims


def _bound(value: Any) -> int | None:
    """A finite integer bound, or None for an infinite one (sympy's oo, torch's int_oo)."""
    try:
        bound = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return bound if abs(bound) < 2**62 else None


def _fx_trace(model: nn.Module, inputs: Inputs, training: bool) -> torch.fx.GraphModule:
    # Tensors become placeholders; every other argument is baked in as a constant.
    signature = inspect.signature(model.forward)
    bound = signature.bind(*inputs.args, **inputs.kwargs)
    concrete = {}
    for name, param in signature.parameters.items():
        if name in bound.arguments:
            if not isinstance(bound.arguments[name], torch.Tensor):
                concrete[name] = bound.arguments[name]
        elif param.default is not inspect.Parameter.empty:
            concrete[name] = param.default
    with _mode(model, training), rewrites.applied(model, training):
        return torch.fx.symbolic_trace(model, concrete_args=concrete or None)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The deepest frame of the failure outside torch and adaptc: the model's own source line."""
    frames: list[traceback.FrameSummary] = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames.extend(traceback.extract_tb(exc.__traceback__))
        exc = exc.__cause__ or exc.__context__
    candidates = [
        f
        for f in frames
        if not f.filename.startswith(_TORCH_DIR)
        and not f.filename.startswith(_ADAPTC_DIRS)
        and not f.filename.startswith("<")
        and "contextlib" not in f.filename
    ]
    return candidates[-1] if candidates else None


def describe_failure(exc: BaseException) -> str:
    """One paragraph: the op (when torch names it), the model's source line, the first error lines."""
    message = str(exc).strip() or type(exc).__name__
    lines = [line for line in message.splitlines() if line.strip()]
    head = " ".join(lines[:2])[:400]
    op = re.search(r"torch\.ops\.(aten\.\w+)", message) or re.search(r"\b(aten\.\w+)", message)
    frame = _user_frame(exc)
    where = ""
    if frame is not None:
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        where = f" at {frame.filename}:{frame.lineno} ({frame.name}): `{code}`"
        if not op:
            op = re.search(r"(\.item\(\)|\.tolist\(\)|\.numpy\(\)|torch\.\w+|F\.\w+)", code)
    op_name = op.group(1) if op else None
    if "data-dependent" in message and not op_name:
        op_name = "a tensor value read in Python (bool()/.item())"
    op_text = f" [op: {op_name}]" if op_name else ""
    return f"{type(exc).__name__}{op_text}{where}: {head}"


def _check_runs_eagerly(model: nn.Module, inputs: Inputs) -> None:
    """Make sure the inputs suit the model; raises InputError naming the failing line if not."""
    try:
        with _mode(model, False), torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    except Exception as exc:
        raise InputError(
            f"{type(model).__name__} fails when called on the example inputs {inputs.describe()}: "
            f"{describe_failure(exc)}. Pass inputs the model accepts (shapes, dtypes, keyword names)."
        ) from None
    raise _RunsEagerly


class _RunsEagerly(Exception):
    pass


def capture_graph(model: nn.Module, inputs: Inputs, training: bool) -> tuple[torch.fx.GraphModule, str]:
    """Capture ``model`` in one training mode; returns the graph module and how it was captured.

    The capture traces dense copies of the inputs (:meth:`Inputs.dense`), so the graph depends on
    no view or stride of them; CapturedGraphModule makes every call's inputs contiguous to match.
    """
    inputs = inputs.dense()
    failures = []
    for how, attempt in (
        # An eager call first: export and fx can accept inputs the model rejects (dtype mismatches).
        ("check-eager", lambda: _check_runs_eagerly(model, inputs.rebuilt())),
        ("export", lambda: _export(model, inputs.rebuilt(), training, dynamic=True)),
        ("export-static", lambda: _export(model, inputs.rebuilt(), training, dynamic=False)),
        ("fx", lambda: _fx_trace(model, inputs.rebuilt(), training)),
    ):
        try:
            with _quiet_torch_logs():
                return attempt(), how
        except _RunsEagerly:
            continue
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            failures.append((how, exc))
    export_failure = describe_failure(failures[0][1])
    fx_failure = describe_failure(failures[-1][1])
    mode = "train" if training else "eval"
    raise CaptureError(
        f"could not capture {type(model).__name__} in {mode} mode with inputs {inputs.describe()}.\n"
        f"  torch.export: {export_failure}\n"
        f"  torch.fx.symbolic_trace: {fx_failure}\n"
        "What to do: make that line traceable (no .item()/.tolist() sizes, no Python branches on tensor "
        "values, no non-tensor outputs), or register a capture-time rewrite for it in adaptc.rewrites."
    ) from failures[0][1]


# --- the captured module -------------------------------------------------------------------

def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _set_path(root: nn.Module, target: str, value: Any) -> None:
    """Set ``root.a.b.c = value``, creating empty holder modules on the way."""
    *path, leaf = target.split(".")
    module = root
    for atom in path:
        if not hasattr(module, atom):
            module.add_module(atom, nn.Module())
        module = getattr(module, atom)
    if isinstance(value, nn.Parameter):
        module.register_parameter(leaf, value)
    elif isinstance(value, nn.Module):
        module.add_module(leaf, value)
    elif isinstance(value, torch.Tensor):
        if leaf in module._buffers or not hasattr(module, leaf):
            module.register_buffer(leaf, value)
        else:
            setattr(module, leaf, value)
    else:
        setattr(module, leaf, value)


def _graph_attributes(model: nn.Module, gm: torch.fx.GraphModule, prefix: str) -> dict[str, Any]:
    """Objects the graph reads, keyed by (possibly renamed) target; retargets nodes in place.

    Targets that name something on the live model keep their name and resolve to the
    model's own object, so every mode's graph shares parameters and buffers with it.
    Anything else (lifted constants, guard functions) is renamed under ``prefix``.
    """
    attrs: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = node.target
        try:
            attrs[target] = _resolve(model, target)
            continue
        except AttributeError:
            pass
        renamed = f"{prefix}{target.replace('.', '_')}"
        attrs[renamed] = _resolve(gm, target)
        node.target = renamed
    return attrs


def _contiguous_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    return contiguous_call(args, kwargs)


class CapturedGraphModule(torch.fx.GraphModule):
    """A captured model: a GraphModule with one graph per training mode.

    ``.train()`` / ``.eval()`` switch graphs, capturing a mode on its first use; hooks
    registered with :meth:`transform_graphs` (the adapter passes) are applied to every
    mode's graph, present and future.
    """

    @classmethod
    def build(cls, model: nn.Module, inputs: Inputs, training: bool,
              around: Callable[[], contextlib.AbstractContextManager] | None = None) -> CapturedGraphModule:
        """Capture ``model``; ``around()``, when given, is a context entered around every capture of it
        (capture-time edits: hooks that add virtual tokens, adapter modules the hooks read)."""
        around = around or contextlib.nullcontext
        inputs = inputs.dense()  # kept for capturing the other mode: holds no view of the caller's batch
        with around():
            gm, how = capture_graph(model, inputs, training)
            attrs = _graph_attributes(model, gm, cls._prefix(training))
        self = cls(attrs, gm.graph, class_name=type(model).__name__ + "Graph")
        self._adaptc_around = around
        self._adaptc_model = [model]  # a list: not registered as a submodule
        self._adaptc_inputs = inputs
        self._adaptc_graphs = {training: self.graph}
        self._adaptc_how = {training: how}
        self._adaptc_static = {training: gm.meta.get("adaptc_static_dims", [])}
        self._adaptc_hooks: list[GraphHook] = []
        self._adaptc_active = training
        self.training = training
        # The graph was traced on contiguous tensors (capture_graph): a strided input (a slice of a
        # batch, channels-last images) is made contiguous first, as the traced ops expect.
        self.register_forward_pre_hook(_contiguous_inputs, with_kwargs=True)
        if how == "export-static":
            warnings.warn(
                f"adaptc: {type(model).__name__} captured with static shapes {inputs.describe()}; "
                "other shapes are captured again on first use.",
                stacklevel=3,
            )
        return self

    @staticmethod
    def _prefix(training: bool) -> str:
        return "_adaptc_train_" if training else "_adaptc_eval_"

    @property
    def captured_with(self) -> dict[str, str]:
        """How each captured mode was captured: 'export', 'export-static' or 'fx'."""
        return {("train" if mode else "eval"): how for mode, how in self._adaptc_how.items()}

    def train(self, mode: bool = True) -> CapturedGraphModule:
        super().train(mode)
        self._activate(mode)
        return self

    def _activate(self, mode: bool) -> None:
        if self._adaptc_active == mode:
            return
        if mode not in self._adaptc_graphs:
            self._capture_mode(mode)
        self.graph = self._adaptc_graphs[mode]
        self._adaptc_active = mode

    def _capture_mode(self, mode: bool) -> None:
        model = self._adaptc_model[0]
        with self._adaptc_around():
            gm, how = capture_graph(model, self._adaptc_inputs, mode)
            attrs = _graph_attributes(model, gm, self._prefix(mode))
        for target, value in attrs.items():
            _set_path(self, target, value)
        self._run_hooks(mode, gm.graph, self._adaptc_hooks)
        # Recorded only once every hook succeeded: a failed pass leaves no half-edited graph behind.
        self._adaptc_graphs[mode] = gm.graph
        self._adaptc_how[mode] = how
        self._adaptc_static[mode] = gm.meta.get("adaptc_static_dims", [])

    def _run_hooks(self, mode: bool, graph: torch.fx.Graph, hooks: list[GraphHook]) -> None:
        """Make ``graph`` the active graph, apply ``hooks`` to it, then restore the active mode."""
        # Assigning .graph regenerates the Python code (~0.1 s for a BERT-base graph): only when it changes.
        previous = self._adaptc_active
        if self.graph is not graph:
            self.graph = graph
        self._adaptc_active = mode
        try:
            for hook in hooks:
                hook(self)
                self.graph.lint()
        finally:
            restore = self._adaptc_graphs.get(previous)
            if restore is not None and restore is not self.graph:
                self.graph = restore  # recompiles
            else:
                self.recompile()  # the hooks edited the active graph in place
            self._adaptc_active = previous

    def transform_graphs(self, hook: GraphHook, *, remember: bool = True) -> None:
        """Apply ``hook(self)`` to the graph of every mode captured so far, and, with ``remember``,
        to each mode captured later.

        The hook edits ``self.graph`` (the active mode's graph) in place.
        """
        for mode in list(self._adaptc_graphs):
            self._run_hooks(mode, self._adaptc_graphs[mode], [hook])
        if remember:
            self._adaptc_hooks.append(hook)

    def rebind(self) -> None:
        """Point every attribute the graphs read back at the live model's current objects.

        Needed after the model's buffers were replaced (``.to(device)`` replaces buffers).
        """
        model = self._adaptc_model[0]
        for graph in self._adaptc_graphs.values():
            for node in graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    try:
                        _set_path(self, node.target, _resolve(model, node.target))
                    except AttributeError:
                        pass

    def static_dims(self) -> list[dict[int, int]]:
        """For each flattened input, the axes the active graph was specialised on."""
        return self._adaptc_static[self._adaptc_active]

    def accepts(self, inputs: Inputs) -> bool:
        """Whether the active graph was captured for inputs shaped like these."""
        leaves = inputs.in_order_of(self._adaptc_inputs).flat()
        for leaf, static in zip(leaves, self.static_dims()):
            if isinstance(leaf, torch.Tensor):
                for axis, size in static.items():
                    if axis >= leaf.dim():
                        return False
                    if isinstance(size, tuple):  # (low, high) bounds of a dynamic axis
                        low, high = size
                        if (low is not None and leaf.shape[axis] < low) or (high is not None and leaf.shape[axis] > high):
                            return False
                    elif leaf.shape[axis] != size:
                        return False
        return True


def capture(model: nn.Module, example_inputs: Any, *, training: bool | None = None) -> CapturedGraphModule:
    """Capture ``model`` as a GraphModule that runs at other batch sizes and sequence lengths.

    ``example_inputs``: a dict of keyword inputs, a tuple of positional inputs, or ``(args, kwargs)``.
    The result follows ``.train()`` / ``.eval()`` like the model: each mode has its own graph.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    check_has_tensor(inputs)
    mode = model.training if training is None else training
    return CapturedGraphModule.build(model, inputs, mode)
