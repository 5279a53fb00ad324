"""passes/narrow.py: a classifier that reads one token gets a last block that computes one token.

Reference: PEFT on the eager model (every token through every block), with the same adapter weights:
the loss and every LoRA gradient must agree. And the pass must have fired: the narrowed ops are
checked by the shape of what the last block's MLP reads.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from adaptc.passes.narrow import narrow_rows
from adaptc.passes.sites import site_key
from model_zoo import tiny_bert, tiny_timm_vit

import adaptc

peft = pytest.importorskip("peft")


def _vit():
    model = tiny_timm_vit(img_size=48, num_classes=5, seed=0)
    batch = (torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1)),)
    target = torch.tensor([0, 3, 4])
    return model, batch, lambda out: torch.nn.functional.cross_entropy(out, target)


def _bert(classifier: bool = True):
    from transformers import BertModel

    torch.manual_seed(0)
    config = dict(num_attention_heads=2, max_position_embeddings=32, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the attention mask's query rows are narrowed with the query
    if classifier:
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}
        return tiny_bert(**config), batch, lambda out: out.loss
    return tiny_bert(BertModel, **config), {"input_ids": ids, "attention_mask": mask}, None


def _run(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(*batch)


def _adapted(model, batch, targets):
    am = adaptc.inject(copy.deepcopy(model), "lora", example_inputs=batch, targets=targets, r=4, alpha=8,
                       init="gaussian").train()
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return am


def _peft_twin(model, am, tmp_path):
    am.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True).train()


def _assert_grads_match(am, theirs) -> int:
    checked = 0
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            site = name.removeprefix("base_model.model.").split(".lora_")[0]
            layer = am.adapters["default"][site_key(site)]
            mine = layer.lora_A if ".lora_A." in name else layer.lora_B
            torch.testing.assert_close(mine.grad, p.grad, atol=1e-5, rtol=1e-4)
            checked += 1
    return checked


def _rows_read_by(am, weight_name: str) -> int:
    """The row count (dim 1) of the input of the frozen op that reads ``weight_name``, in the training graph."""
    graph = am.graph_module.graph
    for node in graph.nodes:
        if node.op == "call_function" and len(node.args) > 1 and getattr(node.args[1], "target", None) == weight_name:
            return node.args[0].meta["val"].shape[1]
    raise AssertionError(f"no op reads {weight_name}")


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
@pytest.mark.parametrize("family", ["vit", "bert"])
def test_one_token_classifier_trains_like_peft_with_a_narrowed_last_block(family, tmp_path):
    if family == "vit":
        model, batch, loss_of = _vit()
        am = _adapted(model, batch, ["qkv", "proj", "fc1", "fc2"])
        narrowed = "blocks.1.mlp.fc1.weight", "blocks.0.mlp.fc1.weight", 10
    else:
        model, batch, loss_of = _bert()
        am = _adapted(model, batch, "all-linear")
        narrowed = "bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.0.intermediate.dense.weight", 9
    mine = loss_of(_run(am, batch))
    last, first, tokens = narrowed
    assert _rows_read_by(am, last) == 1  # the pass fired: the last MLP computes one token
    assert _rows_read_by(am, first) == tokens  # and only where the tokens no longer mix

    theirs = _peft_twin(model, am, tmp_path)
    expected = loss_of(_run(theirs, batch))
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
    mine.backward()
    expected.backward()
    assert _assert_grads_match(am, theirs) > 0


def test_a_model_that_returns_every_token_is_not_narrowed():
    """BertModel returns the last hidden state as well as the pooled first token: nothing to narrow.
    Reference: the unadapted model in training mode (dropout 0), with the adapter's B at zero."""
    model, batch, _ = _bert(classifier=False)
    am = adaptc.inject(copy.deepcopy(model), "lora", example_inputs=batch, targets="all-linear", r=4).train()
    assert _rows_read_by(am, "encoder.layer.1.intermediate.dense.weight") == 9
    out, expected = _run(am, batch), _run(model.train(), batch)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


def test_causal_attention_keeps_its_query_rows():
    """A last-token read through causal SDPA: the query cannot be narrowed (row i attends to keys <= i)."""
    from torch import fx, nn

    class LastToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.out = nn.Linear(8, 8)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 1, 8)).permute(2, 0, 3, 1, 4).unbind(0)
            h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            return self.out(h)[:, 2]

    torch.manual_seed(0)
    model, x = LastToken(), torch.randn(2, 5, 8)
    gm = torch.export.export(model, (x,), strict=False).module()
    gm = fx.GraphModule(gm, gm.graph)
    assert narrow_rows(gm) == 3  # the output projection, the reshape and the transpose; not the attention
    gm.recompile()
    sdpa = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
    assert sdpa.meta["val"].shape[2] == 5
    torch.testing.assert_close(gm(x), model(x))
