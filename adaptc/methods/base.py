"""What a method is, and the registry that holds them.

A method (LoRA, prompt tuning, ...) is one :class:`Method` object, registered by name. It declares
everything the rest of adaptc asks of it, so no code outside ``adaptc/methods/`` asks which method
an adapter has:

- ``config_class``: its options (a dataclass with ``method``, ``from_options``, ``validate``,
  ``to_dict``);
- :meth:`Method.build`: its layers and how it edits graphs (a graph pass, a capture-time edit);
- :meth:`Method.save` / :meth:`Method.load`: its checkpoint (PEFT's format where PEFT has the method);
- ``merge``: ``"weights"`` (each layer folds into the weight of its site: ``layer.merge_into(weight)``),
  ``"constants"`` (the adapter's layers become constants: ``layer.fold()``) or ``None`` (not mergeable);
- ``unmerged_export``: whether ``export_onnx(merge=False)`` can keep it as ORT adapter inputs;
- ``edits_sequence``: whether it changes the token sequence (one such adapter per model).
- ``mixed_batch``: whether one batch can give each row its own adapter of this method
  (``am(..., adapter_names=[...])``, adaptc/mixed_batch.py): its layers take ``_rows``.

Users add their own with :func:`register_method` (docs/extending.md has a complete one).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

from adaptc.errors import CheckpointError, ConfigError
from adaptc.passes.manager import ADAPTERS_ATTR


def adapter_prefix(adapter_name: str) -> str:
    """The dotted path, in a captured graph, of adapter ``adapter_name``'s modules (keyed by site key)."""
    return f"{ADAPTERS_ATTR}.{adapter_name}"


@dataclasses.dataclass
class AdapterBuild:
    """What a method contributes to a model: its config, sites, layers, and how it edits graphs."""

    config: Any
    sites: list
    layers: dict[str, nn.Module]  # by site key (a module name: dots become "__")
    graph_pass: Any = None  # a GraphPass (adaptc.passes.manager) applied to every captured graph
    edit: Any = None  # a capture-time edit: ``edit.applied(model)`` is a context that installs hooks


class Method:
    """One parameter-efficient method. Subclass it, set the class attributes, implement :meth:`build`.

    The default :meth:`save` / :meth:`load` write the adapter's parameters by name and its config as
    adaptc's own; override them to follow another format (PEFT's, for the built-in methods).
    """

    name: str = ""
    config_class: type = object
    aliases: tuple[str, ...] = ()  # other names accepted by inject (PEFT's peft_type spellings)
    peft_types: tuple[str, ...] = ()  # the ``peft_type`` values of the checkpoints this method loads
    edits_sequence: bool = False
    mixed_batch: bool = False  # per-row adapters in one batch (adapter_names): layers honour ``_rows``
    merge: str | None = None  # "weights", "constants" or None
    unmerged_export: bool = False
    site_table: bool = True  # `adaptc inspect` shows the table of sites (and --plot plots it)

    # -- building -------------------------------------------------------------------------------

    def build(self, am: Any, adapter_name: str, config: Any) -> AdapterBuild:
        raise NotImplementedError(f"method {self.name!r} does not implement build()")

    def remove(self, graph: torch.fx.GraphModule, adapter_name: str) -> None:
        """Undo this method's own graph edits for ``adapter_name``. Afterwards AdaptedModel routes every
        remaining ``call_module`` node of the adapter (args ``(x, base output, ...)``) back to its base output."""

    def fold(self, am: Any, adapter_name: str) -> None:
        """``merge == "constants"``: turn the adapter into constants (each layer's ``fold()``); nothing trains."""
        for layer in am.adapters[adapter_name].values():
            if hasattr(layer, "fold"):
                layer.fold()

    def describe(self, am: Any, adapter_name: str) -> list[str]:
        """Lines ``adaptc inject`` prints: the settings, where the adapter acts (printed after the model's
        name), then any details."""
        config = am.adapter_configs()[adapter_name]
        settings = " ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if k != "method")
        return [f"{self.name}: {settings}", f"{len(am.adapter_sites(adapter_name))} sites adapted"]

    def inspect(self, graph: Any, model: nn.Module, inputs: Any, config: Any) -> list[str]:
        """Lines ``adaptc inspect --method <name>`` prints when ``site_table`` is False: where the method acts."""
        return []

    # ``adaptc inspect``'s site table (site_table True): a method that can say what an adapter of ``config``
    # adds at a site gets a parameter column; one that does not (site_params None) gets none.

    def site_params(self, site: Any, config: Any) -> int | None:
        """The parameters an adapter of ``config`` adds at ``site``; None: this method does not say."""
        return None

    def site_cell(self, site: Any, config: Any) -> str:
        """The parameter column's cell at ``site``: the count, or why ``inject`` would refuse ``config`` there."""
        count = self.site_params(site, config)
        return "" if count is None else f"{count:,}"

    def site_column(self, config: Any) -> str:
        """The heading of the parameter column."""
        return f"{self.name} params"

    def default_sites(self, sites: list, config: Any) -> list:
        """The sites among ``sites`` an adapter of ``config`` would take (inspect's total)."""
        return list(sites)

    def site_notes(self, sites: list, config: Any) -> list[str]:
        """Notes printed under the table (e.g. a rank above some weights' rank)."""
        return []

    # -- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoint_type(self) -> str:
        return self.peft_types[0] if self.peft_types else self.name.upper()

    def save(self, am: Any, adapter_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(config fields, tensors by key) of adapter ``adapter_name``; the checkpoint module adds the rest."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in am.adapters[adapter_name].state_dict().items()}
        return {"peft_type": self.checkpoint_type}, tensors

    def recognizes(self, checkpoint_config: dict[str, Any]) -> bool:
        return checkpoint_config.get("peft_type") in (*self.peft_types, self.checkpoint_type)

    def load(self, am: Any, checkpoint: Any, adapter_name: str) -> None:
        """Add the checkpoint's adapter to ``am`` as ``adapter_name`` (default: adaptc's own config and
        the parameters by name; the model is left as it was on any error)."""
        own = (checkpoint.config.get("adaptc") or {}).get("config")
        if not isinstance(own, dict):
            raise CheckpointError(f"{checkpoint.config_path} has no adaptc config for method {self.name!r}")
        options = {k: _from_json(v) for k, v in own.items() if k != "method"}
        am.add_adapter(adapter_name, self.config_class.from_options(**options))
        try:
            am.adapters[adapter_name].load_state_dict(checkpoint.tensors, strict=True)
        except RuntimeError as exc:
            am.delete_adapter(adapter_name)
            raise CheckpointError(f"{checkpoint.weights_path} does not fit this model: {exc}") from None


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# --- the registry ----------------------------------------------------------------------------------

_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(method: Method | type[Method], *, replace: bool = False) -> Method:
    """Add ``method`` (an instance or a Method subclass) to the registry; returns the instance.

    Usable as a class decorator. Its name and aliases become method names ``inject`` accepts.
    """
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method) or not instance.name or not instance.name.isidentifier():
        raise ConfigError(f"a method must be a Method with an identifier name, got {method!r}")
    taken = [n for n in (instance.name, *instance.aliases) if n in _METHODS or n in _ALIASES]
    if taken and not replace:
        raise ConfigError(f"method name {taken[0]!r} is already registered; pass replace=True to override it")
    if getattr(instance.config_class, "method", None) != instance.name:
        raise ConfigError(f"{instance.config_class.__name__}.method must be {instance.name!r}, the method's name")
    _METHODS[instance.name] = instance
    for alias in instance.aliases:
        _ALIASES[alias] = instance.name
    return method if isinstance(method, type) else instance


def available_methods() -> list[str]:
    """The registered method names, built-in ones first."""
    return list(_METHODS)


def get_method(name_or_config: Any) -> Method:
    """The method of a name (or alias), a config object, or an adapter's config."""
    if isinstance(name_or_config, str):
        key = name_or_config.lower()
        key = _ALIASES.get(key, key)
        if key in _METHODS:
            return _METHODS[key]
        raise ConfigError(f"unknown method {name_or_config!r}; known methods: {', '.join(_METHODS)}")
    method = _METHODS.get(getattr(type(name_or_config), "method", None))  # a config names its method
    if method is not None and isinstance(name_or_config, method.config_class):
        return method
    raise ConfigError(
        f"method must be a method name ({', '.join(_METHODS)}) or a config object, got {type(name_or_config).__name__}"
    )


def make_config(method_or_config: Any, options: dict[str, Any]) -> Any:
    """The config for ``inject``'s second argument: a method name with options, or a config object."""
    method = get_method(method_or_config)
    if not isinstance(method_or_config, str):
        if options:
            raise ConfigError(
                f"got a {type(method_or_config).__name__} and keyword options {sorted(options)}; put the options in the config"
            )
        method_or_config.validate()
        return method_or_config
    return method.config_class.from_options(**options)


def method_for_checkpoint(config: dict[str, Any], path: str) -> Method:
    for method in _METHODS.values():
        if method.recognizes(config):
            return method
    raise CheckpointError(
        f"{path}: peft_type is {config.get('peft_type')!r}; adaptc loads "
        f"{', '.join(repr(m.checkpoint_type) for m in _METHODS.values())} adapters (register_method adds a method)"
    )


def config_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-safe values (what checkpoints store as adaptc's own config)."""
    return json.loads(json.dumps(config.to_dict(), default=list))

