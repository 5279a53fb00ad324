"""A class per base model whose ``forward`` shows the base model's signature.

The Hugging Face Trainer keeps only the batch keys named in ``inspect.signature(model.forward)``
(``remove_unused_columns``) and finds the label names in the signature of ``type(model).forward``; an
AdaptedModel's ``forward(*args, **kwargs)`` would hide them.
"""

from __future__ import annotations

import inspect
from typing import Any

_CLASSES: dict[tuple[type, type], type] = {}


def signature_class(cls: type, base_cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` has ``base_cls.forward``'s signature (cached per pair).

    Named ``Adapted<Base>`` so that name-based checks still work (the Trainer looks for
    ``QuestionAnswering`` in the class name to pick ``start_positions`` / ``end_positions``).
    """
    key = (cls, base_cls)
    if key in _CLASSES:
        return _CLASSES[key]
    try:
        signature = inspect.signature(base_cls.forward)
    except (TypeError, ValueError):  # a builtin or C forward: keep *args, **kwargs
        _CLASSES[key] = cls
        return cls
    parent_forward = cls.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return parent_forward(self, *args, **kwargs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    forward.__doc__ = parent_forward.__doc__
    name = f"Adapted{base_cls.__name__}"
    sub = type(name, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": name})
    _CLASSES[key] = sub
    return sub
