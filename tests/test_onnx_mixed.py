"""Mixed-adapter batches in one ONNX graph (``export_onnx(..., mixed_adapters=True)``): every LoRA adapter
stacked, an ``adapter_index`` input per row.

The reference for each row is independent of the stacked graph: that row run alone in PyTorch with its
adapter made the active one (``am.set_adapter``), and the base rows against the model as it was before
any adapter was injected (a copy). Adapters differ in rank; GPT-2 has a DoRA adapter, Llama an adapter on
the embedding. Inputs are sliced views (not contiguous) at batch sizes the export never saw.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from adaptc.targets.onnx_mixed import ADAPTER_INDEX, stacked_adapters_graph
from model_zoo import VOCAB, EmbedConvNet, tiny_bert, tiny_gpt2, tiny_llama

import adaptc
from adaptc.errors import ConfigError, ExportError
from adaptc.mixed_batch import BASE

pytestmark = pytest.mark.integration  # ONNX export and ONNX Runtime sessions


@torch.no_grad()
def randomize(am: adaptc.AdaptedModel, seed: int) -> None:
    """Random B and magnitudes: with B = 0 every adapter would equal the base model, and each other."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in am.adapters.named_parameters():
        if "magnitude" in name:
            p.mul_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=generator))
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.4)


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


# Three adapters per model, of ranks 2, 4 and 8, on partly different sites.
CASES = {
    "gpt2": (lambda: tiny_gpt2(seed=0, bos_token_id=0, eos_token_id=0),
             [dict(targets="all-linear", r=2, alpha=4), dict(targets=["c_attn"], r=4, alpha=4),
              dict(targets="all-linear", r=8, alpha=16, use_dora=True)]),
    "llama": (lambda: tiny_llama(seed=0),
              [dict(targets="all-linear", r=2, alpha=4), dict(targets=["q_proj", "v_proj", "embed_tokens"], r=4, alpha=4),
               dict(targets=["gate_proj", "down_proj"], r=8, alpha=16)]),
    "bert": (lambda: tiny_bert(seed=0),
             [dict(targets="all-linear", r=2, alpha=4), dict(targets=["query", "value"], r=4, alpha=4),
              dict(targets=["dense"], r=8, alpha=16)]),
}
NAMES = ["default", "b", "c"]


@functools.cache  # one per family for the whole module: the tests only read it (set_adapter is restored)
def adapted(family: str) -> tuple[adaptc.AdaptedModel, torch.nn.Module]:
    build, configs = CASES[family]
    model = build().eval()
    pristine = copy.deepcopy(model)
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))}
    am = adaptc.inject(model, "lora", example_inputs=inputs, **configs[0])
    for name, config in zip(NAMES[1:], configs[1:]):
        am.add_adapter(name, **config)
    randomize(am, seed=len(family))
    am.set_adapter("default")
    return am.eval(), pristine


# BERT (post-norm encoder, sequence classification) under -m slow: the CI tier keeps its time for GPT-2 and Llama.
@pytest.fixture(scope="module", params=["gpt2", "llama", pytest.param("bert", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    am, pristine = adapted(request.param)
    path = tmp_path_factory.mktemp(request.param) / "mixed.onnx"
    report = adaptc.export_onnx(am, path, mixed_adapters=True, latency_runs=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return am, pristine, report, session


@torch.no_grad()
def row_by_row(am, pristine, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    rows = []
    for i, name in enumerate(names):
        row = ids[i : i + 1]
        if name == BASE:
            rows.append(logits(pristine(input_ids=row)))
        else:
            am.set_adapter(name)
            rows.append(logits(am(input_ids=row)))
    am.set_adapter("default")
    return torch.cat(rows)


def sliced_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """A view of a larger tensor: every other row and column (not contiguous)."""
    whole = torch.randint(0, VOCAB, (2 * batch, 2 * length), generator=torch.Generator().manual_seed(seed))
    return whole[::2, 1::2]


@pytest.mark.parametrize("batch, length, order", [(5, 7, [2, -1, 0, 1, 0]), (3, 12, [3, 1, 2])])
def test_each_row_equals_its_adapter_alone(exported, batch, length, order):
    am, pristine, report, session = exported
    assert report.mixed_adapters == NAMES and not report.merged
    ids = sliced_ids(batch, length, seed=batch)
    assert not ids.is_contiguous()
    index = np.array(order, dtype=np.int64)
    got = session.run(None, {"input_ids": ids.numpy(), ADAPTER_INDEX: index})[0]
    names = [NAMES[i] if 0 <= i < len(NAMES) else BASE for i in order]  # -1 and 3 (= len) are the base
    expected = row_by_row(am, pristine, ids, names)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    # Every adapter changes its rows: the check above would not pass with the adapters ignored.
    base = logits(pristine(input_ids=ids.contiguous())).detach().numpy()
    for row, name in enumerate(names):
        assert (np.abs(got[row] - base[row]).max() > 1e-3) == (name != BASE), (row, name)


def test_report_and_graph_inputs(exported):
    _, _, report, session = exported
    inputs = {i.name: i for i in session.get_inputs()}
    assert inputs[ADAPTER_INDEX].type == "tensor(int64)"
    assert inputs[ADAPTER_INDEX].shape == inputs["input_ids"].shape[:1] == ["batch"]
    assert set(report.parity) == {"mixed rows", "every row -1 (base)"} and report.parity_max_abs_diff < 1e-4
    assert "adapter_index: 0=default, 1=b, 2=c, -1=base" in report.summary()


def test_index_out_of_range_is_onnx_runtimes_error(exported):
    _, _, _, session = exported
    with pytest.raises(Exception, match="(?i)out of (bounds|range)|invalid"):
        session.run(None, {"input_ids": np.zeros((2, 4), np.int64), ADAPTER_INDEX: np.array([0, 7], np.int64)})


# --- the fx rewrite alone, and what it refuses ---------------------------------------------------------

@torch.no_grad()
def test_stacked_graph_in_pytorch_matches_adapter_names():
    am, _ = adapted("gpt2")
    stacked = stacked_adapters_graph(am, am.graph_for(am.example_inputs))
    assert stacked.adapters == NAMES and stacked.base_index == 3
    ids = torch.randint(0, VOCAB, (4, 6))
    names = ["c", BASE, "default", "b"]
    with stacked.rows(stacked.index_for(names)):
        got = stacked.module(input_ids=ids)
    torch.testing.assert_close(logits(got), logits(am(input_ids=ids, adapter_names=names)), atol=1e-5, rtol=0)
    # the captured graph itself is unchanged: it still runs the active adapter alone
    torch.testing.assert_close(logits(am(input_ids=ids)), row_by_row(am, am, ids, ["default"] * 4), atol=1e-5, rtol=0)


@torch.no_grad()
def test_stacked_graph_where_one_adapted_op_feeds_the_next():
    """Linear into linear: a site's input is another site's adapted output, which the rewrite replaces too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).eval()
    am = adaptc.inject(model, "lora", example_inputs=(torch.randn(2, 8),), targets=["0", "1", "2"], r=2)
    am.add_adapter("b", targets=["1", "2"], r=3)
    randomize(am, seed=1)
    am.eval()
    stacked = stacked_adapters_graph(am, am.graph_for(am.example_inputs))
    x = torch.randn(3, 8)
    names = ["b", BASE, "default"]
    with stacked.rows(stacked.index_for(names)):
        got = stacked.module(x)
    expected = []
    for row, name in zip(x, names):
        if name == BASE:
            expected.append(model(row[None]))
        else:
            am.set_adapter(name)
            expected.append(am(row[None]))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=0)
    assert (got[1] - got[0]).abs().max() > 1e-3 and (got[2] - got[1]).abs().max() > 1e-3
    # only "b" stacked: "default" leaves the graph, its rows would be the base model's
    only_b = stacked_adapters_graph(am, am.graph_for(am.example_inputs), adapters=["b"])
    with only_b.rows(torch.tensor([0, -1])):
        got = only_b.module(x[:2])
    torch.testing.assert_close(got[1:], model(x[1:2]), atol=1e-5, rtol=0)


def test_refuses_prompt_methods_and_conv_sites(tmp_path):
    ids = {"input_ids": torch.randint(0, VOCAB, (2, 8))}
    prompt = adaptc.inject(tiny_gpt2(seed=0).eval(), "lora", example_inputs=ids, r=2)
    prompt.add_adapter("soft", "prompt", num_virtual_tokens=2)
    with pytest.raises(ExportError, match="'soft' is a 'prompt' adapter.*LoRA adapters only"):
        adaptc.export_onnx(prompt.eval(), tmp_path / "p.onnx", mixed_adapters=True)
    conv = adaptc.inject(EmbedConvNet().eval(), "lora", example_inputs=(torch.randint(0, 20, (2, 9)),),
                         targets=["conv", "fc1"], r=2)
    with pytest.raises(ExportError, match="conv site conv: mixed-adapter graphs stack LoRA on linear and embedding"):
        adaptc.export_onnx(conv.eval(), tmp_path / "c.onnx", mixed_adapters=True)
    with pytest.raises(ExportError, match="quantize='int8'"):
        adaptc.export_onnx(prompt, tmp_path / "q.onnx", mixed_adapters=True, quantize="int8")
    with pytest.raises(ExportError, match="mixed_adapters must be True or False"):
        adaptc.export_onnx(prompt, tmp_path / "q.onnx", mixed_adapters="yes")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        stacked_adapters_graph(prompt, prompt.graph_for(prompt.example_inputs), adapters=["nope"])
