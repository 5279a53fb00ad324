"""adaptc.capture: a GraphModule that runs like the model at new shapes and in both modes."""

import model_zoo
import pytest
import torch
from torch import fx, nn

import adaptc


def tiny_gpt2():
    return model_zoo.tiny_gpt2(vocab_size=50, n_positions=32)


def test_gpt2_graph_keeps_output_structure_and_runs_at_new_shapes():
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 50, (2, 7))
    graph = adaptc.capture(model, {"input_ids": ids, "labels": ids})
    assert isinstance(graph, fx.GraphModule)
    assert graph.captured_with == {"eval": "export"}
    for batch, length in [(2, 7), (3, 11), (1, 4)]:
        ids2 = torch.randint(0, 50, (batch, length))
        out, ref = graph(input_ids=ids2, labels=ids2), model(input_ids=ids2, labels=ids2)
        assert type(out) is type(ref)
        assert out.logits.shape == (batch, length, 50)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)


def test_capture_shares_parameters_and_leaves_the_model_as_it_was():
    model = tiny_gpt2().train()
    use_cache = model.config.use_cache
    graph = adaptc.capture(model, {"input_ids": torch.randint(0, 50, (2, 5))})
    model_params = {id(p) for p in model.parameters()}
    graph_params = list(graph.parameters())
    assert graph_params and all(id(p) in model_params for p in graph_params)  # the same objects, not copies
    assert model.training and model.config.use_cache == use_cache


def test_train_and_eval_switch_dropout_like_the_model():
    model = model_zoo.tiny_bert(vocab_size=60, max_position_embeddings=512, hidden_dropout_prob=0.3,
                                attention_probs_dropout_prob=0.3).train()
    ids = torch.randint(0, 60, (4, 9))
    graph = adaptc.capture(model, {"input_ids": ids})
    a, b = graph(input_ids=ids).logits, graph(input_ids=ids).logits
    assert not torch.equal(a, b)  # dropout in training
    graph.eval()
    model.eval()
    torch.testing.assert_close(graph(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert graph.captured_with == {"train": "export", "eval": "export"}
    graph.train()
    assert not torch.equal(graph(input_ids=ids).logits, graph(input_ids=ids).logits)


def test_adapted_model_captures_again_for_new_keywords():
    model = tiny_gpt2().eval()
    ids = torch.randint(0, 50, (2, 6))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=2)
    out = am(input_ids=ids, labels=ids)  # labels were not in the example inputs
    ref = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)
    assert len(am._graphs) == 2


class StaticOnly(nn.Module):
    """Reshapes with a size read from Python: export with dynamic dims specialises the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x).reshape(int(x.shape[0]) * 2, 3)


def test_static_graph_is_captured_again_for_a_new_shape():
    model = StaticOnly().eval()
    am = adaptc.inject(model, "lora", example_inputs=(torch.randn(4, 6),), targets=["fc"], r=2)
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.normal_()
    for batch in (4, 5, 4):
        x = torch.randn(batch, 6)
        layer = am.adapters["default"]["fc"]
        expected = (model.fc(x) + 4.0 * (x @ layer.lora_A.T) @ layer.lora_B.T).reshape(batch * 2, 3)
        torch.testing.assert_close(am(x), expected, atol=1e-5, rtol=0)


def test_capture_rejects_a_non_module():
    with pytest.raises(adaptc.InputError, match="torch.nn.Module"):
        adaptc.capture(lambda x: x, (torch.randn(2),))
