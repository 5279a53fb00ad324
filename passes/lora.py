"""The LoRA pass: a low-rank update beside every selected linear, conv and embedding op.

One :class:`LoraLayer` per site serves every op kind: the pass replaces each use
``y = op(x, W, b)`` of a selected weight with ``y' = lora(x, y, W, b)``, which adds
``scale * B(A(x))`` (and, with DoRA, rescales by the learned magnitude). The original
op stays in the graph untouched, so the frozen path is exactly the base model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.config import LoraConfig
from adaptc.errors import ConfigError, InputError
from adaptc.warn import warn_user

from .sites import Site
from .wrap import route_weight_uses

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def lora_shapes(site: Site, r: int, use_dora: bool = False) -> dict[str, tuple[int, ...]]:
    """The shapes of the parameters a rank-``r`` LoRA adds at ``site``, by parameter name (PEFT's names).

    The single source of truth for both :class:`LoraLayer` and :func:`lora_param_count`.
    """
    if site.kind == "linear":
        shapes = {"lora_A": (r, site.in_features), "lora_B": (site.out_features, r)}
    elif site.kind == "experts":  # one rank-r update per expert, in PEFT's layout (passes/experts.py)
        shapes = {"lora_A": (r * site.experts, site.in_features), "lora_B": (site.out_features, r * site.experts)}
    elif site.kind == "conv":
        # A is a grouped conv with the site's kernel (r channels per group), B a 1x1 conv back up.
        groups, dims = site.conv["groups"], site.conv["dims"]
        shapes = {
            "lora_A": (r * groups, site.in_features // groups, *site.weight_shape[2:]),
            "lora_B": (site.out_features, r, *([1] * dims)),
        }
    else:
        shapes = {"lora_embedding_A": (r, site.in_features), "lora_embedding_B": (site.out_features, r)}
    if use_dora:
        shapes["lora_magnitude_vector"] = (site.out_features,)
    return shapes


def lora_param_count(site: Site, r: int, use_dora: bool = False) -> int:
    """How many parameters a rank-``r`` LoRA (with DoRA, its magnitude too) adds at ``site``."""
    return sum(math.prod(shape) for shape in lora_shapes(site, r, use_dora).values())


# A rank above a site's max_rank() only adds parameters; past this many at one site it is a typo
# (r=10**9), not a choice, and allocating it would exhaust memory.
MAX_SITE_PARAMS = 2**31


class RankDeficientWarning(UserWarning):
    """A LoRA rank above what the site's weight can take: valid (PEFT allows it), but the update is rank-deficient."""


def rank_deficient(site: Site, r: int) -> bool:
    """Whether ``B A`` at ``site`` has rank below ``r`` whatever A and B hold (r > min of the weight's dims)."""
    return r > site.max_rank()


def rank_error(site: Site, r: int, init: str = "default") -> str | None:
    """Why a rank-``r`` LoRA cannot go at ``site`` (None when it can).

    A rank above ``site.max_rank()`` can: PEFT allows it, and the update then has rank
    ``max_rank()`` at most. It cannot with ``init="pissa"``, which moves the top-r singular
    directions of the weight into A and B (PEFT silently makes A and B smaller than ``r`` there,
    so its config no longer states their shapes), nor where the adapter would be absurdly large.
    """
    if not rank_deficient(site, r):
        return None
    hint = f"lower r or set rank_pattern={{{site.name.rsplit('.', 1)[-1]!r}: ...}}"
    if init == "pissa" and site.kind == "linear":  # (embeddings ignore it; convs refuse it)
        return (
            f"r={r} is larger than {site.name} allows with init='pissa': PiSSA takes the top-r singular "
            f"directions of its {site.kind} weight {site.shapes()}, which has {site.max_rank()}; {hint}"
        )
    count = lora_param_count(site, r)
    if count > MAX_SITE_PARAMS:
        return (
            f"r={r} is larger than {site.name} allows: its {site.kind} weight {site.shapes()} has rank at most "
            f"{site.max_rank()}, and a rank-{r} LoRA there would add {count:,} parameters; {hint}"
        )
    return None


class LoraRows:
    """The rows of a mixed batch (``adapter_names``) one adapter applies to, for its LoraLayers.

    ``positions`` are row numbers among the batch's ``count`` rows (adaptc/mixed_batch.py makes them).
    A site's input may hold more rows than that along its first axis: generate's beams and
    ``num_return_sequences`` repeat each row k times consecutively, and a flattened
    ``[batch * tokens, features]`` input (GPT-2's Conv1D) holds each row's tokens consecutively.
    Either way row i owns the i-th of ``count`` equal blocks, so :meth:`index` expands the positions
    to them. The index tensors are made once per leading size and device.
    """

    def __init__(self, positions: list[int], count: int) -> None:
        self.positions = list(positions)
        self.count = count
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def index(self, rows: int, device: torch.device) -> torch.Tensor:
        """The indices along the first axis, of ``rows``, that this adapter's rows own (a LongTensor on ``device``)."""
        key = (rows, device)
        found = self._index.get(key)
        if found is None:
            if rows % self.count:
                raise InputError(
                    f"adapter_names gives {self.count} rows, but an adapted op's input has {rows} along its first "
                    "axis, not a multiple of them: a mixed batch needs the batch on the first axis of every "
                    "adapted op (a model that puts the sequence first cannot take adapter_names)"
                )
            block = rows // self.count
            found = torch.tensor(self.positions, dtype=torch.long, device=device)
            if block > 1:
                found = (found[:, None] * block + torch.arange(block, device=device)).reshape(-1)
            self._index[key] = found
        return found

    def __repr__(self) -> str:
        return f"LoraRows({self.positions} of {self.count})"


class LoraLayer(nn.Module):
    """Adapter parameters of one site and the computation that applies them."""

    # A mixed batch (adaptc/mixed_batch.py) sets this for the length of a call: the update then goes
    # to those rows only. A class attribute too, so that layers pickled before it existed still run.
    _rows: LoraRows | None = None

    def __init__(self, site: Site, r: int, alpha: float, dropout: float, rslora: bool, use_dora: bool) -> None:
        super().__init__()
        self.kind = site.kind
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.fan_in_fan_out = site.fan_in_fan_out
        self.use_dora = use_dora
        self.active = True  # switched by AdaptedModel.set_adapter / disable_adapters
        self._rows = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = dict(site.conv) if site.conv else None
        self.weight_shape = site.weight_shape
        if site.kind == "embedding" and use_dora:
            raise ConfigError(f"DoRA is supported on linear and conv sites; {site.name} is an embedding")
        for name, shape in lora_shapes(site, r, use_dora).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:g}, dora={self.use_dora}"

    # -- initialisation ---------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, init: str, weight: torch.Tensor) -> None:
        """Set A, B (and the DoRA magnitude) so that the adapted op equals the base op.

        ``pissa`` moves the top-r singular directions of ``weight`` into A and B and
        subtracts them from ``weight`` in place.
        """
        if self.kind == "embedding":
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        if init == "pissa":
            self._init_pissa(weight)
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self._weight_norm(weight).reshape(-1))

    def _init_pissa(self, weight: torch.Tensor) -> None:
        if self.kind != "linear":
            raise ConfigError("init='pissa' is supported on linear sites only")
        w = self._oriented(weight).float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        sqrt_s = torch.sqrt(S[: self.r] / self.scaling)
        self.lora_A.copy_(sqrt_s[:, None] * Vh[: self.r])
        self.lora_B.copy_(U[:, : self.r] * sqrt_s[None, :])
        residual = w - self.scaling * (self.lora_B @ self.lora_A)
        weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))

    # -- the update -----------------------------------------------------------------------------

    def _oriented(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as [out, in, ...] whatever its storage order."""
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self) -> torch.Tensor:
        """``scale * B A`` shaped like the stored weight (the update merge folds in)."""
        if self.kind == "embedding":
            return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling
        if self.kind == "linear":
            delta = self.lora_B @ self.lora_A
            return (delta.T if self.fan_in_fan_out else delta) * self.scaling
        groups = self.conv["groups"]
        out_channels = self.lora_B.shape[0]
        b = self.lora_B.reshape(groups, out_channels // groups, self.r)
        a = self.lora_A.reshape(groups, self.r, -1)
        return torch.bmm(b, a).reshape(self.weight_shape) * self.scaling

    def merge_into(self, current: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """``current`` (the weight with the adapters inside this one merged) with this adapter folded in.

        ``stored`` is the weight as the model holds it: DoRA's forward normalises by ``||W0 + dW||``,
        the norm of the *stored* weight plus this adapter's update.
        """
        delta = self.delta_weight().to(current.dtype)
        if not self.use_dora:
            return current + delta
        norm = self._weight_norm(stored.to(current.dtype)).reshape(-1)
        channel_scale = self.lora_magnitude_vector.to(current.dtype) / norm
        oriented = self._oriented(current + delta)
        oriented = oriented * channel_scale.reshape((-1,) + (1,) * (oriented.dim() - 1))
        return self._oriented(oriented)  # back to the stored orientation (a transpose is its own inverse)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-output-channel norm of the adapted weight: [out] for linear, [out, 1, ...] for conv."""
        w = self._oriented(weight) + self._oriented(self.delta_weight().to(weight.dtype))
        if self.kind == "linear":
            return w.norm(p=2, dim=1)
        return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True)

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(F.linear(x, self.lora_A), self.lora_B)
        conv_fn, c = _CONV_FN[self.conv["dims"]], self.conv
        hidden = conv_fn(x, self.lora_A, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        return conv_fn(hidden, self.lora_B, None, 1, 0, 1, c["groups"])

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, self._oriented(weight))
        c = self.conv
        return _CONV_FN[c["dims"]](x, weight, None, c["stride"], c["padding"], c["dilation"], c["groups"])

    def forward(
        self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.active:  # an inactive adapter (set_adapter, disable_adapters) leaves the op as it was
            return base
        if self._rows is not None:  # a mixed batch: this adapter's rows only
            return self._rows_forward(x, base, weight, bias)
        return self._adapted(x, base, weight, bias)

    def _adapted(
        self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.kind == "embedding":
            hidden = F.embedding(x, self.lora_embedding_A.T)
            return base + (hidden @ self.lora_embedding_B.T * self.scaling).to(base.dtype)
        dropped = self.dropout(x).to(self._adapter_dtype())
        delta = self._low_rank(dropped) * self.scaling
        if not self.use_dora:
            return base + delta.to(base.dtype)
        return self._dora(dropped, base, weight, bias, delta)

    def _rows_forward(
        self, x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The update on this adapter's rows of the batch (first axis), the other rows as ``base``.

        A new tensor: ``base`` may be read elsewhere (the next adapter's rows start from it).
        """
        index = self._rows.index(base.shape[0], base.device)
        picked = self._adapted(x.index_select(0, index), base.index_select(0, index), weight, bias)
        return base.index_copy(0, index, picked)

    def _adapter_dtype(self) -> torch.dtype:
        return (self.lora_A if self.kind != "embedding" else self.lora_embedding_A).dtype

    def _dora(self, x, base, weight, bias, delta):
        # y = m / ||W + sBA|| * (W x + s B A x) + b, with the norm detached (DoRA paper, sec. 4.3).
        norm = self._weight_norm(weight).detach()
        channel_shape = (-1,) if self.kind == "linear" else (1, -1) + (1,) * self.conv["dims"]
        magnitude_scale = (self.lora_magnitude_vector / norm.reshape(-1)).reshape(channel_shape)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            plain = base if bias is None else base - bias.reshape(channel_shape)
        else:
            plain = self._base_op(x, weight.to(x.dtype))
        update = (magnitude_scale - 1) * plain + magnitude_scale * delta
        return base + update.to(base.dtype)


# --- the pass ----------------------------------------------------------------------------------

def build_layers(sites: list[Site], config: LoraConfig, model: nn.Module) -> dict[str, LoraLayer]:
    """Create and initialise one LoraLayer per selected site; checks ranks first.

    A rank above a site's ``max_rank()`` is allowed, as in PEFT, with one
    :class:`RankDeficientWarning` naming those sites.
    """
    ranks = {}
    for site in sites:
        r = config.rank_for(site.name)
        problem = rank_error(site, r, config.init)
        if problem is not None:
            raise ConfigError(problem)
        if config.init == "pissa" and site.kind == "conv":  # here, before PiSSA changes any weight
            raise ConfigError(f"init='pissa' is supported on linear sites only; {site.name} is a conv")
        ranks[site.name] = r
    params = dict(model.named_parameters(remove_duplicate=False))
    for site in sites:
        if not params[site.weight].is_floating_point() and (config.use_dora or config.init == "pissa"):
            raise ConfigError(
                f"{site.name} has a quantized (or integer) weight: DoRA and init='pissa' need the full-precision "
                "weight; use plain LoRA on a quantized base"
            )
    deficient = [site for site in sites if rank_deficient(site, ranks[site.name])]
    if deficient:
        named = ", ".join(
            f"{s.name} (r={ranks[s.name]}, {s.kind} weight {s.shapes()}: rank at most {s.max_rank()})"
            for s in deficient[:4]
        ) + (f" and {len(deficient) - 4} more" if len(deficient) > 4 else "")
        warn_user(
            f"the LoRA rank is above what the weight allows at {len(deficient)} site(s), so the update B A there is "
            f"rank-deficient (valid, as in PEFT; the extra rank adds parameters but no capacity): {named}",
            RankDeficientWarning,
        )
    layers = {}
    for site in sites:
        layer = LoraLayer(
            site, ranks[site.name], config.alpha_for(site.name), config.dropout, config.rslora, config.use_dora
        )
        weight = params[site.weight]
        layer.to(dtype=torch.float32 if not weight.is_floating_point() else weight.dtype, device=weight.device)
        layer.initialize(config.init, weight.data)
        site.params_added = sum(p.numel() for p in layer.parameters())
        layers[site.name] = layer
    return layers


def insert(gm: fx.GraphModule, model: nn.Module, layers: dict[str, LoraLayer], prefix: str) -> int:
    """Route every use of a selected weight in ``gm.graph`` through its LoraLayer; returns the count."""
    return route_weight_uses(gm, model, layers, prefix)
