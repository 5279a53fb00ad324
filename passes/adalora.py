"""AdaLoRA's layer and rank allocator: an SVD-form update ``B diag(E) A`` whose rank budget shrinks in training.

Each site gets ``y = W x + b + B (E * (A x)) * scaling / (ranknum + 1e-5)`` (PEFT's formula, so that
outputs and checkpoints match PEFT's to rounding): ``A`` [r, in] the right singular vectors, ``E`` [r, 1]
the singular values, ``B`` [out, r] the left ones. ``ranknum`` is the initial rank and stays so when
ranks are pruned (the scale does not jump when a triplet is masked or dropped).

:class:`RankAllocator` is the budget schedule of the AdaLoRA paper as PEFT implements it: after each
optimizer step the importance of every parameter entry ``|p * grad|`` is smoothed (``beta1``) and
its uncertainty tracked (``beta2``); a triplet's score is its E entry's plus the mean of its A row's
and B column's; between ``tinit`` and ``total_step - tfinal`` the total rank budget falls on a cubic
curve from ``init_r`` per site to ``target_r`` per site, and every ``deltaT`` steps the triplets
below the budget's threshold get ``E = 0``. The mask in force is the adapter's ``rank_pattern``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sites import Site

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
RANKNUM_EPS = 1e-5  # PEFT's: scaling / (ranknum + 1e-5)


def adalora_shapes(site: Site, r: int) -> dict[str, tuple[int, ...]]:
    """PEFT's shapes of one site's AdaLoRA parameters (a conv's A covers its whole kernel)."""
    fan_in = site.in_features * math.prod(site.weight_shape[2:]) if site.kind == "conv" else site.in_features
    return {"lora_A": (r, fan_in), "lora_E": (r, 1), "lora_B": (site.out_features, r)}


class AdaLoraLayer(nn.Module):
    """One site's SVD-form update; ``forward(x, output, weight, bias)`` as every routed module."""

    def __init__(self, site: Site, r: int, alpha: float, dropout: float, ranknum: int | None = None) -> None:
        super().__init__()
        self.kind = site.kind
        self.r = r
        self.alpha = alpha
        self.scaling = alpha if alpha > 0 else float(r)  # PEFT's rule
        self.ranknum = float(r if ranknum is None else ranknum)
        self.fan_in_fan_out = site.fan_in_fan_out
        self.conv = dict(site.conv) if site.conv else None
        self.weight_shape = tuple(site.weight_shape)
        self.active = True  # switched by AdaptedModel.set_adapter / disable_adapters
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for name, shape in adalora_shapes(site, r).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, ranknum={self.ranknum:g}, scaling={self.scaling:g}"

    @torch.no_grad()
    def initialize(self) -> None:
        """PEFT's init: E = 0 (the adapted model starts as the base model), A and B ~ N(0, 0.02)."""
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def _scale(self) -> float:
        return self.scaling / (self.ranknum + RANKNUM_EPS)

    def delta_weight(self) -> torch.Tensor:
        """The update in the stored weight's layout (what merge folds in)."""
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self._scale()
        if self.kind == "conv":
            return delta.reshape(self.weight_shape)
        return delta.T if self.fan_in_fan_out else delta

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return current + self.delta_weight().to(current.dtype)

    def forward(
        self, x: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.active or self.r == 0:
            return output
        dropped = self.dropout(x).to(self.lora_A.dtype)
        if self.kind == "linear":
            update = F.linear(F.linear(dropped, self.lora_A * self.lora_E), self.lora_B) * self._scale()
        else:  # PEFT's SVDConv2d: a conv with the whole update as its kernel
            c = self.conv
            kernel = (self.lora_B @ (self.lora_A * self.lora_E) * self._scale()).reshape(self.weight_shape)
            update = _CONV_FN[c["dims"]](dropped, kernel, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        return output + update.to(output.dtype)

    @torch.no_grad()
    def prune(self, keep: list[bool]) -> None:
        """Keep only the triplets ``keep`` marks (``ranknum``, hence the scale, unchanged)."""
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.lora_A.device)
        self.lora_A = nn.Parameter(self.lora_A.index_select(0, index), requires_grad=self.lora_A.requires_grad)
        self.lora_E = nn.Parameter(self.lora_E.index_select(0, index), requires_grad=self.lora_E.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B.index_select(1, index), requires_grad=self.lora_B.requires_grad)
        self.r = int(index.numel())


def orthogonal_regularization(layers: list[AdaLoraLayer]) -> torch.Tensor | None:
    """PEFT's penalty: the mean over A's and B's of ``||P P^T - I||_F`` (rows of A, columns of B)."""
    terms = []
    for layer in layers:
        for p, gram in ((layer.lora_A, layer.lora_A @ layer.lora_A.T), (layer.lora_B, layer.lora_B.T @ layer.lora_B)):
            if p.requires_grad:
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    if not terms:
        return None
    return torch.stack(terms).sum() / len(terms)


class RankAllocator:
    """The budget schedule and importance scores of one AdaLoRA adapter (see the module docstring).

    ``layers`` maps site name -> layer; ``config`` has PEFT's fields (init_r, target_r, tinit, tfinal,
    deltaT, beta1, beta2, total_step) and ``rank_pattern`` ({site name: [bool] * init_r}), which this
    writes. ``step(global_step)`` is PEFT's ``update_and_allocate``: call it after the optimizer step,
    before the gradients are cleared, with the 0-based index of the step just taken.
    """

    def __init__(self, layers: dict[str, AdaLoraLayer], config, total_step: int | None = None) -> None:
        self.layers = dict(sorted(layers.items()))
        self.config = config
        self.total_step = total_step if total_step is not None else config.total_step
        self.init_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset()

    def reset(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask now) at ``step``: PEFT's cubic schedule."""
        c, total = self.config, self.total_step
        if step <= c.tinit:
            return self.init_budget, False
        if step > total - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (total - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def _named(self):
        for site, layer in self.layers.items():
            for param in ("lora_A", "lora_E", "lora_B"):
                yield f"{site}.{param}", getattr(layer, param)

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self._named():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            if key not in self.exp_avg_ipt or self.exp_avg_ipt[key].shape != p.shape:
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
            self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.exp_avg_ipt:
            return torch.zeros_like(like)
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E for the lowest-scoring triplets so that ``budget`` remain; returns the new rank pattern."""
        scores = {}
        for site, layer in self.layers.items():
            a = self._score(f"{site}.lora_A", layer.lora_A).mean(dim=1)
            b = self._score(f"{site}.lora_B", layer.lora_B).mean(dim=0)
            e = self._score(f"{site}.lora_E", layer.lora_E).reshape(-1)
            scores[site] = e + a + b
        every = torch.cat([s.reshape(-1) for s in scores.values()])
        drop = self.init_budget - budget
        threshold = torch.kthvalue(every, k=drop)[0].item() if drop > 0 else -math.inf
        pattern = {}
        for site, layer in self.layers.items():
            keep = scores[site] > threshold
            layer.lora_E.masked_fill_(~keep.reshape(-1, 1), 0.0)
            pattern[site] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for site, layer in self.layers.items():
            keep = pattern.get(site)
            if keep is not None and len(keep) == layer.r:
                mask = torch.tensor(keep, dtype=torch.bool, device=layer.lora_E.device)
                layer.lora_E.masked_fill_(~mask.reshape(-1, 1), 0.0)

    def step(self, global_step: int) -> None:
        """PEFT's ``update_and_allocate(global_step)``."""
        final = self.total_step - self.config.tfinal
        if global_step < final:
            self.update_importance()
            budget, mask = self.budget(global_step)
            if mask:
                self.config.rank_pattern = self.mask_to_budget(budget)
        elif global_step == final:  # the final allocation, on the scores so far (PEFT's force_mask)
            budget, _ = self.budget(global_step)
            self.config.rank_pattern = self.mask_to_budget(budget)
            self.reset()
        elif self.config.rank_pattern:
            self.apply_pattern(self.config.rank_pattern)
