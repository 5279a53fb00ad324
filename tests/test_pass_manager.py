"""The pass manager: the order it runs passes in, mode gating, and its debug checks."""

from __future__ import annotations

import pytest
import torch
from adaptc.passes.manager import ADAPTERS_ATTR, GraphPass, PassManager, adapted_uses
from model_zoo import tiny_gpt2
from torch import fx
from transformers import GPT2LMHeadModel

import adaptc


def _gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2(n_positions=1024)


class _Recorder(GraphPass):
    def __init__(self, name: str, log: list, modes=frozenset({True, False})) -> None:
        self.name, self.log, self.modes = name, log, frozenset(modes)

    def run(self, gm: fx.GraphModule) -> bool:
        self.log.append((self.name, gm._adaptc_active))
        return False


def test_passes_run_in_order_and_only_on_the_modes_they_declare():
    ids = torch.randint(0, 64, (2, 6))
    am = adaptc.inject(_gpt2().eval(), "lora", example_inputs={"input_ids": ids}, r=2)
    log: list = []
    manager = PassManager(before=[_Recorder("first", log)], after=[_Recorder("train-only", log, {True})])
    graph = am.graph_module
    manager.run(graph, [_Recorder("method", log)])
    assert log == [("first", False), ("method", False)]  # an eval graph: the training-only pass skipped
    graph.train()
    log.clear()
    manager.run(graph, [_Recorder("method", log)])
    assert log == [("first", True), ("method", True), ("train-only", True)]


class _DropAdapterNode(GraphPass):
    name = "drops-an-adapter"

    def run(self, gm: fx.GraphModule) -> bool:
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target.startswith(ADAPTERS_ATTR + "."):
                node.replace_all_uses_with(node.args[1])
                gm.graph.erase_node(node)
                return True
        return False


def test_debug_mode_catches_a_pass_that_drops_an_adapted_use():
    ids = torch.randint(0, 64, (2, 6))
    am = adaptc.inject(_gpt2().eval(), "lora", example_inputs={"input_ids": ids}, r=2, fuse_siblings=False)
    graph = am.graph_module
    before = adapted_uses(graph)
    assert before == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 layers
    with pytest.raises(adaptc.AdaptcError, match="drops-an-adapter.*8 -> 7"):
        PassManager(debug=True).run_one(graph, _DropAdapterNode())
    assert adapted_uses(graph) == 7  # without debug the drop would have gone unnoticed
    PassManager(debug=True).run_one(graph, _DropAdapterNode(), removal=True)  # a removal may drop uses
    assert adapted_uses(graph) == 6


def test_debug_mode_runs_a_whole_injection_with_fused_groups(monkeypatch):
    monkeypatch.setenv("ADAPTC_DEBUG_PASSES", "1")
    ids = torch.randint(0, 64, (2, 6))
    am = adaptc.inject(_gpt2(), "lora", example_inputs={"input_ids": ids, "labels": ids}, r=2)
    assert am._passes.debug
    am.train()
    am(input_ids=ids, labels=ids).loss.backward()  # the training graph is captured (and checked) here
    am.add_adapter("second", "lora", targets=["c_attn"], r=2)
    assert adapted_uses(am.graph_module) == 2 * 4 + 2
