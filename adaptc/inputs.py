"""Example inputs: normalising the accepted forms and describing their structure.

Accepted forms: a dict of keyword inputs, a tuple (or list) of positional inputs, a
single tensor, or ``(args, kwargs)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import InputError


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword inputs of one call."""

    args: tuple
    kwargs: dict

    def flat(self) -> list[Any]:
        """Leaves in the order a graph captured from these inputs numbers its placeholders."""
        return pytree.tree_leaves((self.args, self.kwargs))

    def in_order_of(self, other: Inputs) -> Inputs:
        """The same inputs with keywords ordered as in ``other`` (the capture's order)."""
        order = [k for k in other.kwargs if k in self.kwargs] + [k for k in self.kwargs if k not in other.kwargs]
        return Inputs(self.args, {k: self.kwargs[k] for k in order})

    def dense(self) -> Inputs:
        """The same inputs with every tensor a contiguous tensor of its own (not a view).

        torch.export specialises a graph on the layout of the tensors it traces: a slice of a batch
        gives guards on the view's base (a later contiguous input then fails them), and a
        ``reshape`` traced on a contiguous tensor becomes a ``view`` that strided inputs break. So
        graphs are captured from dense copies and called with contiguous inputs (see capture.py).
        """
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        if not any(isinstance(leaf, torch.Tensor) and not is_dense(leaf) for leaf in leaves):
            return self
        args, kwargs = pytree.tree_unflatten([_densify(leaf) for leaf in leaves], spec)
        return Inputs(tuple(args), dict(kwargs))

    def rebuilt(self) -> Inputs:
        """The same tensors in new containers. A model may update a container it is given in place
        (transformers' caches grow by the new keys and values); each capture traces fresh ones."""
        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return Inputs(tuple(args), dict(kwargs))

    def structure_key(self) -> tuple:
        """What a captured graph is specialised on: nesting, tensor dtypes and ranks, other values."""
        ordered = Inputs(self.args, dict(sorted(self.kwargs.items())))
        leaves, spec = pytree.tree_flatten((ordered.args, ordered.kwargs))
        return (str(spec), tuple(_leaf_key(leaf) for leaf in leaves))

    def describe(self) -> str:
        parts = [_describe_leaf(a) for a in self.args]
        parts += [f"{k}={_describe_leaf(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def foreign_container(value: Any) -> bool:
    """Whether ``value`` is another library's container registered with torch's pytree (transformers'
    ``DynamicCache`` once generation registered it): its tensors are not laid out like the model's
    inputs and outputs, so code that walks those stops at it."""
    return type(value) in pytree.SUPPORTED_NODES and not isinstance(value, (list, tuple, dict))


def is_dense(tensor: torch.Tensor) -> bool:
    """Contiguous, and not a view of a larger tensor."""
    return tensor._base is None and tensor.is_contiguous()


def _densify(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor) and not is_dense(leaf):
        return leaf.clone(memory_format=torch.contiguous_format)
    return leaf


def contiguous_call(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``args`` and ``kwargs`` with every tensor contiguous, or None when they all are already (the
    common case on every call: nothing is rebuilt)."""
    leaves = pytree.tree_leaves((args, kwargs))
    if all(leaf.is_contiguous() for leaf in leaves if isinstance(leaf, torch.Tensor)):
        return None

    def fix(leaf: Any) -> Any:
        return leaf.contiguous() if isinstance(leaf, torch.Tensor) else leaf

    return tuple(pytree.tree_map(fix, list(args))), pytree.tree_map(fix, kwargs)


def _leaf_key(leaf: Any) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", str(leaf.dtype), leaf.dim(), str(leaf.device))
    try:
        hash(leaf)
        return ("value", leaf)
    except TypeError:
        return ("object", repr(leaf))


def _describe_leaf(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe_leaf(v) for v in value) + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_describe_leaf(v)}" for k, v in value.items()) + "}"
    return repr(value)


def normalize_inputs(example_inputs: Any, *, what: str = "example_inputs") -> Inputs:
    """Turn any accepted form of example inputs into :class:`Inputs`."""
    if example_inputs is None:
        raise InputError(
            f"{what} is missing: adaptc captures the model by running it once, so pass the inputs "
            "of a typical call, e.g. example_inputs={'input_ids': ids} or example_inputs=(images,)"
        )
    if isinstance(example_inputs, Inputs):
        return example_inputs.dense()
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,), {}).dense()
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise InputError(f"{what}: keyword input names must be strings, got {bad!r}")
        return Inputs((), dict(example_inputs)).dense()
    if isinstance(example_inputs, (tuple, list)):
        if (
            len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list))
            and isinstance(example_inputs[1], Mapping)
        ):
            return Inputs(tuple(example_inputs[0]), dict(example_inputs[1])).dense()
        return Inputs(tuple(example_inputs), {}).dense()
    raise InputError(
        f"{what} must be a dict of keyword inputs, a tuple of positional inputs, a tensor or "
        f"(args, kwargs); got {type(example_inputs).__name__}"
    )


def check_has_tensor(inputs: Inputs, *, what: str = "example_inputs") -> None:
    if not any(isinstance(leaf, torch.Tensor) for leaf in inputs.flat()):
        raise InputError(f"{what} {inputs.describe()} contains no tensor; pass at least one input tensor")
