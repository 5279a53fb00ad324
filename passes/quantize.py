"""Quantized frozen base weights for QLoRA: NF4 (4-bit NormalFloat) and int8, in pure PyTorch.

Module-level replacement, before capture: every eligible ``nn.Linear`` of the base model
becomes a :class:`QuantLinear` that stores its weight packed and computes
``linear(x, dequantize(W), b)`` through one custom op, ``adaptc::quant_linear``. Why
replacement rather than a pass over the captured graph: adaptc re-captures the model for
each training mode and for new input shapes, and every capture runs the model eagerly,
so the model itself must hold the quantized weights (and no longer the fp32 ones, or
nothing is saved). Why one custom op: its backward dequantizes the weight again instead
of letting autograd keep every layer's dequantized fp32 weight alive until the backward
pass (bitsandbytes' ``MatMul4Bit`` does the same), and the graph shows one node whose
arguments name the packed weight parameter, which the site matcher (``passes/sites.py``)
reads as a linear site, so LoRA goes on top unchanged.

Formats (``QuantConfig``):

- ``nf4``: the 16-value NormalFloat codebook of the QLoRA paper (Dettmers et al. 2023,
  sec. 3), blockwise absmax scaling over the flattened weight in blocks of 64 (the last
  block zero-padded, so any input size works), two codes per byte. ``double_quant``
  stores the per-block scales as 8-bit codes too (symmetric around their mean, one fp32
  scale per 256 of them), about 0.127 bytes per parameter instead of 0.133.
- ``int8``: symmetric per-output-channel scales, ``round(w / (absmax / 127))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptc.errors import ConfigError

FORMATS = ("nf4", "int8")
COMPUTE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DQ_BLOCK = 256  # scales per second-level block (the QLoRA paper's choice)


# --- the NF4 codebook ---------------------------------------------------------------------------

def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, ascending, from their definition (QLoRA paper, sec. 3 and appendix).

    Quantiles of N(0, 1) at evenly spaced probabilities: 8 for the positive half and 7 for
    the negative half (so that 0 is represented exactly and both ends reach +-1), with the
    outermost probability ``delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2`` instead of 1 (whose
    quantile is infinite), then scaled to [-1, 1].
    """
    delta = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).to(torch.float32)


# --- quantize / dequantize tensors ---------------------------------------------------------------

def _check_block(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ConfigError(f"block_size must be a positive even integer (64 in QLoRA), got {block_size!r}")


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes, fp32 absmax per block) of ``weight`` flattened and zero-padded to whole blocks."""
    _check_block(block_size)
    flat = weight.detach().reshape(-1).float()
    pad = -flat.numel() % block_size
    blocks = F.pad(flat, (0, pad)).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    code = nf4_codebook().to(flat.device)
    # Nearest code: bucketize against the midpoints between neighbouring codes.
    index = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).to(torch.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]  # first value in the high nibble (bitsandbytes' order)
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, ...],
                   block_size: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``quantize_nf4`` packed, reshaped to ``shape`` (padding dropped), in ``dtype``."""
    # One gather per byte from a 256 x 2 table of code pairs (high nibble first) instead of one per value.
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([code.float()[byte >> 4], code.float()[byte & 0xF]], dim=-1)
    values = pairs[packed.int()].reshape(-1, block_size) * absmax.float()[:, None]
    return values.reshape(-1)[: math.prod(shape)].reshape(shape).to(dtype)


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output row): symmetric, ``w ~ q * scale``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


@torch.no_grad()
def quantize_scales(absmax: torch.Tensor, block: int = DQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (int8 codes, fp32 scale per ``block`` codes, fp32 mean) of the absmax values."""
    offset = absmax.mean()
    centered = F.pad(absmax - offset, (0, -absmax.numel() % block)).reshape(-1, block)
    scale = centered.abs().amax(dim=1) / 127
    q = torch.round(centered / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1), scale, offset


def dequantize_scales(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, count: int) -> torch.Tensor:
    return (q.float().reshape(scale.shape[0], -1) * scale[:, None]).reshape(-1)[:count] + offset


# --- the op -----------------------------------------------------------------------------------------

def _dequantize(fmt: str, qweight: torch.Tensor, scales: torch.Tensor, code: torch.Tensor,
                out_features: int, in_features: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    if fmt == "nf4":
        return dequantize_nf4(qweight, scales, code, (out_features, in_features), block_size, dtype)
    return dequantize_int8(qweight, scales, dtype)


@torch.library.custom_op("adaptc::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, code: torch.Tensor,
                 bias: torch.Tensor | None, fmt: str, out_features: int, in_features: int,
                 block_size: int) -> torch.Tensor:
    """``linear(x, dequantize(qweight), bias)`` in ``x``'s dtype."""
    weight = _dequantize(fmt, qweight, scales, code, out_features, in_features, block_size, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@quant_linear.register_fake
def _(x, qweight, scales, code, bias, fmt, out_features, in_features, block_size):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, code, bias, fmt, out_features, in_features, block_size = inputs
    ctx.save_for_backward(qweight, scales, code)  # the packed weight, not a dequantized copy
    ctx.meta = (fmt, out_features, in_features, block_size)


def _backward(ctx, grad):
    qweight, scales, code = ctx.saved_tensors
    fmt, out_features, in_features, block_size = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = _dequantize(fmt, qweight, scales, code, out_features, in_features, block_size, grad.dtype)
        grad_x = grad @ weight
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, out_features).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None


quant_linear.register_autograd(_backward, setup_context=_setup_context)

QUANT_LINEAR_OPS = (torch.ops.adaptc.quant_linear.default, torch.ops.adaptc.quant_linear)


# --- the module -------------------------------------------------------------------------------------

@dataclass
class QuantConfig:
    """How to quantize the frozen linear weights. ``compute_dtype``: None keeps each layer's weight dtype.

    ``skip``: module names (exact or dotted suffix) left in full precision; the model's output
    head (``get_output_embeddings()``) and weights shared by several modules are always left.
    """

    format: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: Any = None
    skip: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"quantize must be one of {', '.join(FORMATS)} (or None), got {self.format!r}")
        _check_block(self.block_size)
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant must be True or False, got {self.double_quant!r}")
        self.compute_dtype = resolve_dtype(self.compute_dtype)
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        if not all(isinstance(s, str) for s in self.skip):
            raise ConfigError(f"skip must be a list of module names, got {self.skip!r}")


def resolve_dtype(value: Any) -> torch.dtype | None:
    if value is None or value in (torch.float32, torch.bfloat16):
        return value
    if isinstance(value, str) and value.lower() in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value.lower()]
    raise ConfigError(f"compute_dtype must be 'fp32' or 'bf16' (or torch.float32 / torch.bfloat16), got {value!r}")


def make_quant_config(quantize: Any, lora: Any = None, **options: Any) -> QuantConfig | None:
    """``inject``'s ``quantize`` argument: None, a format name, or a QuantConfig; validated (with ``lora``,
    the LoRA config it goes under)."""
    if quantize is None:
        if options:
            raise ConfigError(f"quantization options {sorted(options)} given without quantize='nf4' or 'int8'")
        return None
    if isinstance(quantize, QuantConfig):
        if options:
            raise ConfigError(f"got a QuantConfig and options {sorted(options)}; put the options in the config")
        config = quantize
    elif isinstance(quantize, str):
        try:
            config = QuantConfig(format=quantize.lower(), **options)
        except TypeError:
            known = "block_size, double_quant, compute_dtype, skip"
            raise ConfigError(f"unknown quantization option in {sorted(options)}; known: {known}") from None
    else:
        raise ConfigError(f"quantize must be 'nf4', 'int8', a QuantConfig or None, got {type(quantize).__name__}")
    config.validate()
    if lora is not None and (getattr(lora, "use_dora", False) or getattr(lora, "init", None) == "pissa"):
        raise ConfigError("quantize needs plain LoRA: DoRA and init='pissa' read the full-precision base weights")
    return config


class QuantLinear(nn.Module):
    """A frozen linear layer with its weight stored quantized; ``weight`` is the packed parameter.

    ``weight`` stays a (non-trainable) parameter so that the graph reads it by the name
    ``<module>.weight`` as for ``nn.Linear``: the LoRA site keeps its name, PEFT's checkpoint
    keys still match, and any code that uses the weight directly fails loudly on its dtype
    instead of silently computing with something else.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.format, self.block_size, self.double_quant = config.format, config.block_size, config.double_quant
        self.orig_dtype = weight.dtype
        self.compute_dtype = config.compute_dtype or weight.dtype
        device = weight.device
        self.register_buffer("code", nf4_codebook().to(device) if self.format == "nf4" else torch.zeros(0, device=device))
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.load_weight_(weight)

    @classmethod
    def from_module(cls, module: nn.Module, config: QuantConfig) -> QuantLinear:
        """From an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's projections, weight stored [in, out])."""
        weight = module.weight.detach()
        return cls(weight.T if _is_conv1d(module) else weight, module.bias, config)

    @torch.no_grad()
    def load_weight_(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` ([out, in], any float dtype) into this layer, replacing what it held."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"weight shape {tuple(weight.shape)} != ({self.out_features}, {self.in_features})")
        if self.format == "nf4":
            packed, absmax = quantize_nf4(weight, self.block_size)
        else:
            packed, absmax = quantize_int8(weight)
        self.weight.data = packed
        stored = {"absmax": absmax}
        if self.double_quant and self.format == "nf4":
            q, scale, offset = quantize_scales(absmax)
            stored = {"absmax_q": q, "absmax_scale": scale, "absmax_offset": offset}
            self.n_blocks = absmax.numel()
        for name, value in stored.items():
            current = self._buffers.get(name)
            if current is not None and current.dtype == value.dtype:
                current.data = value  # keep the buffer object: captured graphs read this very tensor
            else:
                self.register_buffer(name, value)

    def scales(self) -> torch.Tensor:
        if "absmax" in self._buffers:
            return self.absmax
        return dequantize_scales(self.absmax_q, self.absmax_scale, self.absmax_offset, self.n_blocks)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the forward uses it, [out, in]."""
        with torch.no_grad():
            return _dequantize(self.format, self.weight, self.scales(), self.code, self.out_features,
                               self.in_features, self.block_size, dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (bias excluded)."""
        tensors = [self.weight] + [b for n, b in self._buffers.items() if n != "code" and b is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.adaptc.quant_linear.default(
            x.to(self.compute_dtype), self.weight, self.scales(), self.code, self.bias, self.format,
            self.out_features, self.in_features, self.block_size,
        )
        return y.to(x.dtype)

    def to_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``weight`` (default: this layer's dequantized weight)."""
        w = self.dequantize(torch.float32) if weight is None else weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=self.orig_dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant and self.format == "nf4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"block_size={self.block_size}{dq}, compute_dtype={self.compute_dtype}")


# --- the model-level pass -----------------------------------------------------------------------------

def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return False
    return type(module) is Conv1D


def _eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Linear or _is_conv1d(module)) and module.weight.is_floating_point()


def _skipped(model: nn.Module, config: QuantConfig) -> set[str]:
    """Names of linear modules left in full precision: the output head, tied weights, ``config.skip``."""
    skipped = set()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
        if module is head:
            skipped.add(name)
        if any(name == s or name.endswith("." + s) for s in config.skip):
            skipped.add(name)
    for names in owners.values():
        if len(set(names)) > 1:
            skipped.update(names)
    return skipped


def quantize_model(
    model: nn.Module, quantize: Any = "nf4", *, require: bool = False, **options: Any
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every eligible linear layer of ``model`` in place by a :class:`QuantLinear`.

    Eligible: exactly ``nn.Linear`` or transformers' ``Conv1D`` (subclasses such as ``nn.MultiheadAttention``'s
    ``out_proj`` are used functionally by their parent and are left), not the output head,
    not a shared weight, not in ``skip``. Returns ``(parent, attribute, original)`` for each
    replacement, which :func:`restore` puts back. ``require``: raise ConfigError if the model
    ends up with no quantized layer at all.
    """
    config = make_quant_config(quantize, **options)
    skipped = _skipped(model, config)
    replaced = []
    for name, module in list(model.named_modules()):
        if not _eligible(module) or name in skipped:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_module(module, config))
        replaced.append((parent, attr, module))
    if require and not quantized_modules(model):
        raise ConfigError(
            f"quantize={config.format!r}: {type(model).__name__} has no nn.Linear (or transformers Conv1D) layer "
            "to quantize besides its output head; inject without quantize"
        )
    return replaced


def restore(replaced: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`quantize_model` (used when inject fails after quantizing)."""
    for parent, attr, original in reversed(replaced):
        setattr(parent, attr, original)


def dequantize_model(model: nn.Module) -> int:
    """Replace every QuantLinear of ``model`` in place by an ``nn.Linear`` of its dequantized weight."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.to_linear())
            count += 1
    return count


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def owner_of(model: nn.Module, weight_name: str) -> QuantLinear | None:
    """The QuantLinear whose packed weight is ``weight_name``, if it is one."""
    owner, _, attr = weight_name.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    return module if isinstance(module, QuantLinear) and attr == "weight" else None


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by linear weights: ``quantized`` (QuantLinear storage) and ``full`` (fp linear weights)."""
    quantized = sum(m.storage_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    full = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if _eligible(m))
    return {"quantized": quantized, "full": full}
