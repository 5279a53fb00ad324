"""One cell of the conformance matrix: an architecture x a method, every stage checked.

Stages, in order (the first that fails is the cell's outcome):
  capture   the graph capture inside inject (a CaptureError)
  inject    adaptc.inject (a prompt method on a model without attention must raise TargetError:
            that is the expected outcome, recorded as ``n/a``)
  train     one Adam step on a fixed batch lowers the loss; every base parameter and buffer is
            bit-identical, every adapter parameter that got a gradient changed
  save/load save_adapter, then load_adapter onto the model: bit-identical outputs
  onnx      export_onnx (which checks ORT on fresh inputs itself), then our own ORT session at a
            new batch size and length against the adapted model in PyTorch: <= 1e-4
  merge     am.merge(): the merged model's output vs the adapted model's: <= 1e-5 (last, since
            a LoRA merge writes into the model's own weights)

The reference throughout is independent of the stage under test: the adapted model run unmerged in
PyTorch. Adapters start randomized so that a merge or a load that dropped them would show.
PEFT is tried on a fresh copy of the same model (``peft_support``) for the comparison in docs/conformance.md.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from zoo import Arch

import adaptc

V = 4  # virtual tokens
MERGE_ATOL = 1e-5
ONNX_ATOL = 1e-4
STAGES = ("capture", "inject", "train", "save/load", "onnx", "merge")


@dataclass
class CellResult:
    arch: str
    method: str
    outcome: str = "fail"  # pass | n/a (the clear error, expected) | fail
    stage: str = ""  # the stage that failed (or raised the expected error)
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    peft: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# Each column's method: its adaptc options (inject's keywords) and the PEFT config with the same settings.
# A method's column is one entry in each table (and its name in zoo.METHODS).
OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"targets": "all-linear", "r": 4, "alpha": 8},
    "prompt": {"num_virtual_tokens": V},
    "ptuning": {"num_virtual_tokens": V, "encoder_hidden_size": 16},
    "prefix": {"num_virtual_tokens": V},
    "adalora": {"targets": "all-linear", "init_r": 4, "target_r": 2, "total_step": 10},
    "oft": {"targets": "all-linear", "oft_block_size": 4},
    "ia3": {"targets": "all-linear"},
    "ln_tuning": {},
    "bottleneck": {"placement": "houlsby", "reduction_factor": 4},
    "loha": {"target_modules": "all-linear", "r": 4, "alpha": 8},
    "lokr": {"target_modules": "all-linear", "r": 4, "alpha": 8},
    "vera": {"target_modules": "all-linear", "r": 8},
}
PEFT_CONFIGS: dict[str, Callable[[Arch], Any]] = {
    "lora": lambda arch: peft.LoraConfig(r=4, target_modules="all-linear"),
    "prompt": lambda arch: peft.PromptTuningConfig(task_type=arch.peft_task or "FEATURE_EXTRACTION", num_virtual_tokens=V),
    "ptuning": lambda arch: peft.PromptEncoderConfig(
        task_type=arch.peft_task or "FEATURE_EXTRACTION", num_virtual_tokens=V, encoder_hidden_size=16),
    "prefix": lambda arch: peft.PrefixTuningConfig(task_type=arch.peft_task or "FEATURE_EXTRACTION", num_virtual_tokens=V),
    "adalora": lambda arch: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules="all-linear"),
    "oft": lambda arch: peft.OFTConfig(oft_block_size=4, target_modules="all-linear"),
    "ia3": lambda arch: peft.IA3Config(target_modules="all-linear", feedforward_modules=[]),
    "ln_tuning": lambda arch: peft.LNTuningConfig(),  # PEFT's defaults by model type, as adaptc's
    "bottleneck": lambda arch: _not_in_peft("bottleneck adapters (AdapterHub's Houlsby / Pfeiffer)"),
    "loha": lambda arch: peft.LoHaConfig(r=4, alpha=8, target_modules="all-linear"),
    "lokr": lambda arch: peft.LoKrConfig(r=4, alpha=8, target_modules="all-linear"),
    "vera": lambda arch: peft.VeraConfig(r=8, target_modules="all-linear"),
}
SEQUENCE_METHODS = ("prompt", "ptuning", "prefix")  # need attention; the rest adapt weights
UNMERGEABLE = ("bottleneck",)  # no merged form: the merge stage expects the clear MergeError


def _not_in_peft(what: str) -> Any:
    raise NotImplementedError(f"PEFT has no {what}")


def options(method: str) -> dict[str, Any]:
    return dict(OPTIONS[method])


def call(module: Any, inputs: Any) -> Any:
    return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def tensors(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor of an output (logits, hidden states; not integer lengths)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def main(out: Any) -> torch.Tensor:
    return tensors(out)[0]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), f"{len(a)} outputs vs {len(b)}"
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


class StageFailed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage, self.message = stage, message


def _check(stage: str, ok: bool, message: str) -> None:
    if not ok:
        raise StageFailed(stage, message)


def _randomize(am: adaptc.AdaptedModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# What each weight method's refusal says (adaptc/methods/*.py), so that another TargetError is a failure.
_REFUSALS = {"ln_tuning": "no norm with a learned weight", "bottleneck": "residual addition", "vera": "found no linear op"}


def expected_na(arch: Arch, method: str) -> bool:
    """Whether the method does not apply to the model, so that inject must refuse it: a prompt method on a model
    without attention (but prompt tuning / P-tuning on a state-space model, whose token sequence they extend),
    prompt tuning / P-tuning on a model that fixes its sequence length, and the weight methods the zoo declares
    the model has no site for (``Arch.refuses``)."""
    if method not in SEQUENCE_METHODS:
        return method in arch.refuses
    if not arch.attention:
        return method == "prefix" or not arch.state_space
    return arch.fixed_sequence and method in ("prompt", "ptuning")


def not_applicable(arch: Arch, method: str, error: str) -> bool:
    """True for the refusals the matrix expects: the method does not apply (``expected_na``) and inject said so
    with the method's own TargetError."""
    if not expected_na(arch, method):
        return False
    if method in _REFUSALS:
        return _REFUSALS[method] in error
    return arch.attention or "no attention" in error  # a fixed sequence length: the prompt methods' own error


def run_cell(arch: Arch, method: str, workdir: Path) -> CellResult:
    result = CellResult(arch.id, method)
    stage = "capture"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run(arch, method, workdir, result)
        result.outcome, result.stage = "pass", ""
    except StageFailed as exc:
        result.stage, result.message = exc.stage, exc.message
    except adaptc.TargetError as exc:
        stage = result.stage or "inject"
        result.stage, result.message = stage, str(exc)
        if stage == "inject" and not_applicable(arch, method, str(exc)):
            result.outcome = "n/a"
    except Exception as exc:  # noqa: BLE001 - the cell records what went wrong, the test asserts on it
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result.message = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
        result.stage = result.stage or stage
    result.message = " ".join(result.message.split())[:400]
    return result


def _run(arch: Arch, method: str, workdir: Path, result: CellResult) -> None:
    torch.manual_seed(0)
    model = arch.build().eval()
    batch = arch.inputs(*arch.sizes)
    with torch.no_grad():
        base_out = tensors(call(model, batch))

    result.stage = "inject"
    try:  # inject captures the model first: a CaptureError is the capture stage's failure
        am = adaptc.inject(model, method, example_inputs=batch, **options(method))
    except adaptc.CaptureError as exc:
        raise StageFailed("capture", f"CaptureError: {exc}") from None
    if method in SEQUENCE_METHODS and not arch.attention and (method == "prefix" or not arch.state_space):
        raise StageFailed("inject", "a prompt method was injected into a model without attention; expected the "
                                    "clear error")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _check("inject", {id(p) for p in am.parameters() if p.requires_grad} == {id(p) for p in am.adapters.parameters()},
           "parameters outside the adapters require grad")
    am.eval()
    _randomize(am, 1)
    with torch.no_grad():
        start = [p.detach().clone() for p in am.adapters.parameters()]
        _randomize(am, 2)  # a reachable target: the same adapter with other weights
        target = main(call(am, batch)).detach()
        for p, s in zip(am.adapters.parameters(), start):
            p.copy_(s)
        adapted_out = tensors(call(am, batch))
    result.metrics["adapter_effect"] = max_diff(adapted_out, base_out)

    result.stage = "train"
    params = [p for p in am.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    loss = F.mse_loss(main(call(am, batch)), target)
    optimizer.zero_grad()
    loss.backward()
    # A gradient below 1e-12 is rounding noise where the true one is zero (LeViT's last downsampling
    # attends over a single key at this size, so its queries cannot matter: measured 2e-23).
    grads = [p.grad is not None and bool(p.grad.abs().max() > 1e-12) for p in params]
    optimizer.step()
    with torch.no_grad():
        after = F.mse_loss(main(call(am, batch)), target)
    result.metrics["loss_before"], result.metrics["loss_after"] = loss.item(), after.item()
    _check("train", after.item() < loss.item(), f"loss did not go down: {loss.item():.6g} -> {after.item():.6g}")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base_state[k])]
    _check("train", not changed, f"base state changed: {changed[:3]}")
    _check("train", any(grads), "no adapter parameter got a gradient")
    moved = [not torch.equal(p, s) for p, s in zip(params, start)]
    _check("train", all(m for m, g in zip(moved, grads) if g), "an adapter parameter with a gradient did not change")

    result.stage = "save/load"
    with torch.no_grad():
        expected = tensors(call(am, batch))
    am.save_adapter(workdir / "adapter")
    again = adaptc.load_adapter(model, workdir / "adapter", example_inputs=batch).eval()
    with torch.no_grad():
        got = tensors(call(again, batch))
    result.metrics["load_diff"] = max_diff(got, expected)
    _check("save/load", result.metrics["load_diff"] == 0.0, f"loaded adapter differs by {result.metrics['load_diff']:.3e}")
    del again

    result.stage = "onnx"
    report = adaptc.export_onnx(am, workdir / "model.onnx", latency_runs=1)
    result.metrics["onnx_report_diff"] = report.parity_max_abs_diff
    other = arch.inputs(*arch.other)
    with torch.no_grad():
        reference = tensors(call(am, other))
    ort_out = _ort(workdir / "model.onnx", other)
    result.metrics["onnx_diff"] = max_diff([torch.from_numpy(o) for o in ort_out], reference)
    _check("onnx", result.metrics["onnx_diff"] <= ONNX_ATOL,
           f"ORT differs from PyTorch by {result.metrics['onnx_diff']:.3e} at batch/length {arch.other}")

    result.stage = "merge"
    if method in UNMERGEABLE:
        try:
            am.merge()
        except adaptc.MergeError:
            return
        raise StageFailed("merge", f"{method} has no merged form, but merge() did not raise MergeError")
    merged = am.merge()
    with torch.no_grad():
        got = tensors(call(merged, batch))
    result.metrics["merge_diff"] = max_diff(got, expected)
    _check("merge", result.metrics["merge_diff"] <= MERGE_ATOL, f"merged differs by {result.metrics['merge_diff']:.3e}")


def _ort(path: Path, inputs: Any) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(leaves), f"ONNX inputs {names} vs {len(leaves)} tensors"
    outs = session.run(None, {n: t.numpy() for n, t in zip(names, leaves)})
    return [o for o in outs if np.issubdtype(o.dtype, np.floating)]


# --- PEFT, for the comparison column -------------------------------------------------------------

def peft_support(arch: Arch, method: str) -> str:
    """Try PEFT on a fresh copy of the model: 'yes' when get_peft_model and a forward work, else why not."""
    try:
        torch.manual_seed(0)
        model = arch.build().eval()
        batch = arch.inputs(*arch.sizes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, PEFT_CONFIGS[method](arch))
            with torch.no_grad():
                call(pm, batch)
        return "yes"
    except Exception as exc:  # noqa: BLE001 - what PEFT says is the answer
        text = " ".join(str(exc).split())
        return f"no ({type(exc).__name__}: {text[:90]})"
