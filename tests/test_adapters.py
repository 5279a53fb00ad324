"""Several adapters on one model: add, switch, disable, delete."""

import pytest
import torch
from model_zoo import tiny_gpt2
from torch import nn

import adaptc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def randomize(params):
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)


def reference(model, x, deltas):
    """The model with extra weight deltas {module name: dW} added by hand."""
    def lin(name, h):
        layer = getattr(model, name)
        return nn.functional.linear(h, layer.weight + deltas.get(name, 0), layer.bias)
    return lin("out", torch.relu(lin("b", torch.relu(lin("a", x)))))


def delta(am, adapter, site):
    layer = am.adapters[adapter][site]
    return layer.scaling * layer.lora_B @ layer.lora_A


def test_add_switch_disable_delete():
    model = Net().eval()
    x = torch.randn(4, 6)
    base = model(x).detach()
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["a"], r=2, alpha=2)
    randomize(am.adapter_parameters("default"))
    am.add_adapter("task_b", targets=["a", "b"], r=3, alpha=6)
    assert am.active_adapter == "task_b"
    randomize(am.adapter_parameters("task_b"))
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.task_b.") for n in trainable)

    expected_b = reference(model, x, {"a": delta(am, "task_b", "a"), "b": delta(am, "task_b", "b")})
    torch.testing.assert_close(am(x), expected_b, atol=1e-5, rtol=0)

    am.set_adapter("default")
    torch.testing.assert_close(am(x), reference(model, x, {"a": delta(am, "default", "a")}), atol=1e-5, rtol=0)

    am.set_adapter(["default", "task_b"])  # both active: the updates add up
    both = {"a": delta(am, "default", "a") + delta(am, "task_b", "a"), "b": delta(am, "task_b", "b")}
    torch.testing.assert_close(am(x), reference(model, x, both), atol=1e-5, rtol=0)

    with am.disable_adapters():
        assert torch.equal(am(x), base)
    torch.testing.assert_close(am(x), reference(model, x, both), atol=1e-5, rtol=0)

    am.delete_adapter("task_b")
    assert list(am.adapters) == ["default"] and am.active_adapters == ["default"]
    torch.testing.assert_close(am(x), reference(model, x, {"a": delta(am, "default", "a")}), atol=1e-5, rtol=0)
    assert not any("task_b" in str(n.target) for n in am.graph_module.graph.nodes)


def test_new_graphs_get_every_adapter():
    model = Net().train()
    x = torch.randn(4, 6)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["a"], r=2)
    am.add_adapter("second", targets=["b"], r=2)
    am.set_adapter(["default", "second"])
    randomize(p for name in am.adapters for p in am.adapter_parameters(name))
    am.eval()  # the eval graph is captured now, and both adapters are inserted there
    deltas = {"a": delta(am, "default", "a"), "b": delta(am, "second", "b")}
    torch.testing.assert_close(am(x), reference(model, x, deltas), atol=1e-5, rtol=0)


def test_adapter_name_errors():
    am = adaptc.inject(Net(), "lora", example_inputs=(torch.randn(2, 6),), r=2)
    with pytest.raises(adaptc.ConfigError, match="already exists"):
        am.add_adapter("default", r=2)
    with pytest.raises(adaptc.ConfigError, match="must be an identifier"):
        am.add_adapter("bad name", r=2)
    with pytest.raises(adaptc.ConfigError, match="unknown adapter"):
        am.set_adapter("nope")
    with pytest.raises(adaptc.TargetError):
        am.add_adapter("other", targets=["missing"])
    assert list(am.adapters) == ["default"]  # the failed add left nothing behind


@pytest.mark.integration  # by time (make test-unit under 2 minutes): a GPT-2 end to end
def test_deleting_lora_under_a_prefix_adapter_keeps_the_prefix():
    """LoRA, then prefix tuning on top (its graphs are captured with the LoRA parameters in the
    model), then LoRA deleted. Reference: the same model with only the prefix adapter active."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=50, n_positions=32)
    ids = torch.randint(0, 50, (2, 8))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=4).eval()
    randomize(p for n, p in am.named_parameters() if "lora_B" in n)
    am.add_adapter("pre", "prefix", num_virtual_tokens=3)
    randomize(am.adapters["pre"].parameters())
    am.set_adapter("pre")
    with torch.no_grad():
        expected = am(input_ids=ids).logits
        am.set_adapter(["default", "pre"])
        assert not torch.allclose(am(input_ids=ids).logits, expected, atol=1e-4)  # LoRA does something
        am.delete_adapter("default")
        torch.testing.assert_close(am(input_ids=ids).logits, expected)
