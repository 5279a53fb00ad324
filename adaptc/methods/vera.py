"""VeRA (vector-based random matrix adaptation): the method's registry entry and its config.

``adaptc.inject(model, "vera", r=256, target_modules=...)``; PEFT's option names, defaults and
checkpoints (``peft_type: "VERA"``: each layer's ``vera_lambda_b`` / ``vera_lambda_d``, and the
shared ``base_model.vera_A`` / ``base_model.vera_B`` with ``save_projection``; without them the
projections are drawn again from ``projection_prng_key``). The layers are :mod:`adaptc.passes.vera`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from adaptc.errors import CheckpointError, ConfigError, TargetError
from adaptc.passes import lycoris, vera
from adaptc.passes.sites import site_key

from .lycoris import LycorisMethod, SelectorOptions, check_bool, check_positive_int, check_probability

_A, _B = "base_model.vera_A", "base_model.vera_B"


@dataclass
class VeraConfig(SelectorOptions):
    """VeRA at every selected linear site: ``lambda_b * B (lambda_d * A x)`` with A, B frozen and shared."""

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True

    method: ClassVar[str] = "vera"
    title: ClassVar[str] = "VeRA"

    def validate(self) -> None:
        super().validate()
        check_positive_int(self.r, "r")
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < 2**64:
            raise ConfigError(f"projection_prng_key must be an integer in [0, 2**64), got {key!r}")
        check_bool(self.save_projection, "save_projection")
        check_bool(self.init_weights, "init_weights")
        check_probability(self.vera_dropout, "vera_dropout")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or \
                not math.isfinite(self.d_initial):
            raise ConfigError(f"d_initial must be a finite number, got {self.d_initial!r}")


class VeraMethod(LycorisMethod):
    """Not a LyCORIS method, but it selects, builds, saves and loads the same way."""

    name = "vera"
    config_class = VeraConfig
    peft_types = ("VERA",)
    param_prefix = "vera_lambda_"
    peft_module_types = ("Linear", "Conv1D")
    shared_keys = (_A, _B)

    @staticmethod
    def supports(site: Any) -> bool:
        return site.kind == "linear"  # PEFT's VeRA: nn.Linear and GPT-2's Conv1D

    def choose_sites(self, am: Any, config: VeraConfig) -> list:
        chosen = config.select(am.all_sites)
        other = [s for s in chosen if not self.supports(s)]
        if config.target_modules in ("all", "all-linear"):  # categories: 1x1 convs and embeddings left out
            chosen = [s for s in chosen if self.supports(s)]
        elif other:
            raise TargetError(
                f"VeRA adapts linear ops (nn.Linear, F.linear, GPT-2's Conv1D, x @ W); target_modules="
                f"{config.target_modules!r} also selected {', '.join(f'{s.name} ({s.kind})' for s in other[:4])}. "
                "Leave those out with exclude_modules or a narrower target_modules."
            )
        if not chosen:
            raise TargetError(
                f"VeRA found no linear op (nn.Linear, F.linear, GPT-2's Conv1D, x @ W) among "
                f"target_modules={config.target_modules!r} ('all-linear' leaves out the output head and 1x1 "
                "convolutions); name the linear modules to adapt"
            )
        return [dataclasses.replace(site) for site in chosen]  # params_added is per adapter

    def build_layers(self, am: Any, sites: list, config: VeraConfig) -> dict[str, torch.nn.Module]:
        """One VeraLayer per site, all holding the same projections module (sized to the largest site)."""
        projections = vera.VeraProjections.for_sites(sites, config.r, config.projection_prng_key)
        weight = am.base_model.get_parameter(sites[0].weight)
        projections.to(device=weight.device)
        layers = lycoris.build_layers(
            sites, am.base_model, lambda site: vera.VeraLayer(site, config.r, config.vera_dropout, projections)
        )
        for layer in layers.values():
            layer.initialize(config.init_weights, config.d_initial)
        return layers

    def make_layer(self, site: Any, config: Any) -> Any:  # VeRA's layers share one projection module
        raise NotImplementedError("VeRA builds its layers together: see build_layers")

    def shapes(self, site: Any, config: VeraConfig) -> dict[str, tuple[int, ...]]:
        return {"vera_lambda_b": (site.out_features,), "vera_lambda_d": (config.r,)}

    def site_rank(self, site: Any, config: VeraConfig) -> int:
        return config.r

    # -- checkpoints: the shared projections --------------------------------------------------------

    def peft_fields(self, config: VeraConfig, sites: list) -> dict[str, Any]:
        return {
            "peft_type": "VERA", "task_type": None, "inference_mode": True, "r": config.r,
            "target_modules": [site.name for site in sites], "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection, "vera_dropout": config.vera_dropout,
            "d_initial": config.d_initial, "fan_in_fan_out": any(site.fan_in_fan_out for site in sites),
            "bias": "none", "modules_to_save": None, "init_weights": config.init_weights,
            "layers_to_transform": None, "layers_pattern": None,
        }

    def shared_tensors(self, am: Any, name: str) -> dict[str, torch.Tensor]:
        if not am.adapter_configs()[name].save_projection:
            return {}
        projections = self._projections(am, name)
        return {_A: projections.vera_A, _B: projections.vera_B}

    def check_peft_fields(self, ckpt: Any) -> None:
        bias = ckpt.config.get("bias", "none")
        if bias != "none":
            raise CheckpointError(f"{ckpt.config_path}: bias={bias!r}; adaptc's VeRA trains no biases (bias='none')")

    def check_shared(self, config: VeraConfig, shared: dict, sites: list, ckpt: Any) -> None:
        if not shared:
            if config.save_projection:
                raise CheckpointError(
                    f"{ckpt.weights_path} has no {_A} / {_B} although its config says save_projection=True"
                )
            return  # drawn again from projection_prng_key, as PEFT does
        if set(shared) != {_A, _B}:
            raise CheckpointError(f"{ckpt.weights_path} holds {few_keys(shared)} but VeRA needs both {_A} and {_B}")
        need_in, need_out = max(s.in_features for s in sites), max(s.out_features for s in sites)
        a, b = shared[_A], shared[_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.r or b.shape[1] != config.r \
                or a.shape[1] < need_in or b.shape[0] < need_out:
            raise CheckpointError(
                f"{ckpt.weights_path}: {_A} {list(a.shape)} and {_B} {list(b.shape)} do not fit r={config.r} and "
                f"the adapted layers (at least {need_in} inputs and {need_out} outputs)"
            )

    def load_shared(self, am: Any, name: str, shared: dict) -> None:
        if shared:
            self._projections(am, name).replace(shared[_A], shared[_B])

    @staticmethod
    def _projections(am: Any, name: str) -> vera.VeraProjections:
        site = am.adapter_sites(name)[0]
        return am.adapters[name][site_key(site.name)].projections


def few_keys(keys: Any) -> str:
    return ", ".join(sorted(keys))
