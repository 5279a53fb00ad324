"""Activation checkpointing as a graph pass (adaptc/passes/checkpoint.py).

The reference is the same AdaptedModel without checkpointing (and, for LoRA, PEFT-independent: the plain
graph adaptc tests elsewhere against PEFT): with either policy the loss and the gradient of every trainable
parameter are the plain ones, dropout included when the RNG state is replayed, and autograd keeps fewer
bytes for the backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` (storages, weights left
out, as bench/bench_lora_train.py counts them).
"""

from __future__ import annotations

import pytest
import torch
from adaptc.passes import checkpoint
from adaptc.passes.manager import adapted_uses
from model_zoo import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

import adaptc
from adaptc.api import adapt
from adaptc.errors import ConfigError
from adaptc.inputs import Inputs

POLICIES = ("full", "selective")
NO_DROPOUT = {
    "llama": dict(attention_dropout=0.0),
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vit": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer", "vit": "vit.encoder.layer"}


def batch_for(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    if name == "vit":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=gen), "labels": torch.tensor([0, 4, 2])}
    ids = torch.randint(0, 64, (3, 12), generator=gen)
    if name == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1])}
    return {"input_ids": ids, "labels": ids}


def build(name: str, **config):
    builders = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "vit": tiny_vit}
    return builders[name](seed=0, **{**NO_DROPOUT[name], **config})


def lora(name: str, dropout: float = 0.0, **config) -> adaptc.AdaptedModel:
    am = adaptc.inject(build(name, **config), "lora", example_inputs=batch_for(name), r=4, alpha=8,
                       init="gaussian", dropout=dropout)
    with torch.no_grad():  # non-zero B: A's gradients are not zero
        for key, p in am.adapters.named_parameters():
            if key.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    am.train()
    return am


def loss_and_grads(am, batch, seed=0, **call):
    am.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = am(**batch, **call).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in am.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_same(reference, got, atol=1e-6):
    (loss0, grads0), (loss1, grads1) = reference, got
    assert torch.allclose(loss0, loss1, atol=atol, rtol=0), (loss0, loss1)
    assert grads0.keys() == grads1.keys()
    worst = max((grads0[k] - grads1[k]).abs().max().item() for k in grads0)
    assert worst <= atol, worst


def saved_bytes(am, batch, seed=0) -> int:
    """Bytes of the storages autograd keeps for the backward of one step (parameters and buffers left out)."""
    weights = {t.untyped_storage().data_ptr() for t in [*am.parameters(), *am.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = am(**batch).loss
    loss.backward()
    am.zero_grad(set_to_none=True)
    return sum(saved.values())


def training_graph(am, batch):
    assert am.training
    return am.graph_for(Inputs((), dict(batch)))


def block_paths(am, batch) -> list[str]:
    gm = training_graph(am, batch)
    return [gm.get_submodule(n.target).path for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith(checkpoint.BLOCKS_ATTR + ".")]


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert", "vit"])
def model(request):
    name = request.param
    am = lora(name)
    batch = batch_for(name)
    reference = loss_and_grads(am, batch)
    plain_bytes = saved_bytes(am, batch)
    yield name, am, batch, reference, plain_bytes
    am.gradient_checkpointing_disable()


@pytest.mark.parametrize("policy", POLICIES)
def test_gradients_and_loss_are_the_plain_ones(model, policy):
    name, am, batch, reference, _ = model
    am.gradient_checkpointing_enable({"policy": policy})
    try:
        assert am.is_gradient_checkpointing
        assert block_paths(am, batch) == [f"{BLOCKS[name]}.0", f"{BLOCKS[name]}.1"]
        assert_same(reference, loss_and_grads(am, batch))
    finally:
        am.gradient_checkpointing_disable()


def test_fewer_bytes_are_saved_and_disable_restores_the_plain_figure(model):
    name, am, batch, reference, plain = model
    figures = {}
    for policy in POLICIES:
        am.gradient_checkpointing_enable({"policy": policy})
        figures[policy] = saved_bytes(am, batch)
    am.gradient_checkpointing_disable()
    assert not am.is_gradient_checkpointing and block_paths(am, batch) == []
    assert figures["full"] < figures["selective"] < plain, (name, figures, plain)
    assert saved_bytes(am, batch) == plain
    assert_same(reference, loss_and_grads(am, batch), atol=0.0)  # the plain graph again, bit for bit


def test_dropout_draws_the_same_masks_in_the_recompute():
    # Dropout everywhere: embeddings, attention, residuals, and the LoRA branches (one mask per group).
    am = lora("gpt2", dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    batch = batch_for("gpt2")
    reference = loss_and_grads(am, batch, seed=7)
    other = loss_and_grads(am, batch, seed=8)
    assert (reference[0] - other[0]).abs() > 1e-4  # dropout is on: another seed, another loss
    for policy in POLICIES:
        am.gradient_checkpointing_enable({"policy": policy})
        assert_same(reference, loss_and_grads(am, batch, seed=7))
    am.gradient_checkpointing_enable({"policy": "full", "use_reentrant": True})
    assert_same(reference, loss_and_grads(am, batch, seed=7))


def test_without_preserved_rng_the_recompute_draws_other_masks():
    am = lora("gpt2", dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    batch = batch_for("gpt2")
    reference = loss_and_grads(am, batch, seed=7)
    am.gradient_checkpointing_enable({"preserve_rng_state": False})
    loss, grads = loss_and_grads(am, batch, seed=7)
    assert torch.equal(loss, reference[0])  # the forward is the same; the backward's masks are not
    assert max((grads[k] - reference[1][k]).abs().max().item() for k in grads) > 1e-4


def test_reentrant_variant_gives_the_adapters_their_gradients():
    # Frozen embeddings: no input of the first block requires grad, yet its adapters get gradients.
    am = lora("llama")
    batch = batch_for("llama")
    reference = loss_and_grads(am, batch)
    am.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert_same(reference, loss_and_grads(am, batch))
    assert saved_bytes(am, batch) < saved_bytes_plain(am, batch)


def saved_bytes_plain(am, batch):
    current = am._checkpoint_pass()
    am.gradient_checkpointing_disable()
    try:
        return saved_bytes(am, batch)
    finally:
        am._set_checkpointing(current)


def test_every_n_layers_checkpoints_every_nth_block():
    am = lora("llama", num_hidden_layers=4)
    batch = batch_for("llama")
    reference = loss_and_grads(am, batch)
    am.activation_checkpointing_enable(every_n_layers=2)  # transformers' name and option
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.2"]
    assert_same(reference, loss_and_grads(am, batch))


def test_prefix_tuning():
    model = build("llama")
    batch = batch_for("llama")
    am = adaptc.inject(model, "prefix", example_inputs=batch, num_virtual_tokens=4)
    am.train()
    reference = loss_and_grads(am, batch)
    plain = saved_bytes(am, batch)
    for policy in POLICIES:
        am.gradient_checkpointing_enable({"policy": policy})
        assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
        assert_same(reference, loss_and_grads(am, batch))
        assert saved_bytes(am, batch) < plain


def test_prompt_tuning():
    batch = batch_for("gpt2")
    am = adaptc.inject(build("gpt2"), "prompt", example_inputs=batch, num_virtual_tokens=4)
    am.train()
    reference = loss_and_grads(am, batch)
    am.gradient_checkpointing_enable()
    assert block_paths(am, batch) == ["transformer.h.0", "transformer.h.1"]
    assert_same(reference, loss_and_grads(am, batch))


@pytest.mark.parametrize("policy", POLICIES)
def test_lora_on_an_nf4_base(policy):
    batch = batch_for("llama")
    am = adaptc.inject(build("llama"), "lora", example_inputs=batch, quantize="nf4", r=4, alpha=8, init="gaussian")
    with torch.no_grad():
        for key, p in am.adapters.named_parameters():
            if key.endswith("lora_B"):
                p.normal_(0, 0.1)
    am.train()
    reference = loss_and_grads(am, batch)
    plain = saved_bytes(am, batch)
    am.gradient_checkpointing_enable({"policy": policy})
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    assert_same(reference, loss_and_grads(am, batch))
    assert saved_bytes(am, batch) < plain


def test_adapters_added_and_removed_while_enabled():
    am = lora("llama")
    batch = batch_for("llama")
    am.gradient_checkpointing_enable({"policy": "selective"})
    uses = adapted_uses(training_graph(am, batch))
    am.add_adapter("second", r=2, alpha=4, init="gaussian")  # the pass sees the graph as captured
    am.set_adapter(["default", "second"])
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    assert adapted_uses(training_graph(am, batch)) > uses  # the debug count sees inside the blocks
    got = loss_and_grads(am, batch)
    am.gradient_checkpointing_disable()
    assert_same(loss_and_grads(am, batch), got)
    am.gradient_checkpointing_enable()
    am.delete_adapter("second")
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    got = loss_and_grads(am, batch)
    am.gradient_checkpointing_disable()
    assert_same(loss_and_grads(am, batch), got)


def test_prefix_added_while_enabled():
    batch = batch_for("llama")
    am = adapt(build("llama"), Inputs((), batch), training=True)  # no adapter yet
    am.gradient_checkpointing_enable()
    am.add_adapter("default", "prefix", num_virtual_tokens=4)  # reads the attention ops of the plain graph
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    got = loss_and_grads(am, batch)
    am.gradient_checkpointing_disable()
    assert_same(loss_and_grads(am, batch), got)


def test_the_recompute_sees_the_adapter_state_of_the_forward():
    # One adapter per row (adapter_names) is set for the call only; the backward runs after it.
    am = lora("llama")
    am.add_adapter("other", r=4, alpha=8, init="gaussian")
    batch = batch_for("llama")
    rows = dict(adapter_names=["default", "other", "__base__"])
    am.set_adapter(["default", "other"])
    reference = loss_and_grads(am, batch, **rows)
    am.gradient_checkpointing_enable()
    assert_same(reference, loss_and_grads(am, batch, **rows))


def test_eval_graphs_and_no_grad_calls_are_untouched():
    am = lora("gpt2")
    batch = batch_for("gpt2")
    am.gradient_checkpointing_enable()
    with torch.no_grad():
        train_logits = am(**batch).logits
    am.gradient_checkpointing_disable()
    with torch.no_grad():
        assert torch.equal(am(**batch).logits, train_logits)
    am.gradient_checkpointing_enable()
    am.eval()
    assert block_paths_of_mode(am, batch) == []


def block_paths_of_mode(am, batch):
    gm = am.graph_for(Inputs((), dict(batch)))
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(checkpoint.BLOCKS_ATTR + ".")]


def test_graphs_captured_later_are_checkpointed():
    am = lora("llama")
    am.gradient_checkpointing_enable()
    longer = {"input_ids": torch.randint(0, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    longer["labels"] = longer["input_ids"]
    assert block_paths(am, longer) == ["model.layers.0", "model.layers.1"]  # another input structure


def test_adaptc_train_with_checkpointing():
    batches = [batch_for("llama")] * 4
    runs = {}
    for on in (False, True):
        am = lora("llama")
        if on:
            am.gradient_checkpointing_enable({"policy": "selective"})
        result = adaptc.train(am, batches, steps=4, lr=1e-2, progress=False, seed=0)
        runs[on] = (result, [p.detach().clone() for p in am.adapters.parameters()])
    assert runs[True][0].last_loss < runs[True][0].first_loss
    assert abs(runs[True][0].last_loss - runs[False][0].last_loss) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(runs[True][1], runs[False][1])) < 1e-5


def test_inject_option():
    batch = batch_for("llama")
    am = adaptc.inject(build("llama"), "lora", example_inputs=batch, gradient_checkpointing="selective")
    am.train()
    assert am.is_gradient_checkpointing and am._checkpoint_pass().settings.policy == "selective"
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ConfigError, match="policy"):
        adaptc.inject(build("llama"), "lora", example_inputs=batch, gradient_checkpointing="some")


def test_settings_are_validated():
    am = lora("llama")
    with pytest.raises(ConfigError, match="'full' or 'selective'"):
        am.gradient_checkpointing_enable({"policy": "all"})
    with pytest.raises(ConfigError, match="'determinism'"):
        am.gradient_checkpointing_enable({"determinism": "none"})
    with pytest.raises(ConfigError, match="non-reentrant"):
        am.gradient_checkpointing_enable({"policy": "selective", "use_reentrant": True})
    with pytest.raises(ConfigError, match="offload"):
        am.activation_checkpointing_enable(offload=True)
    assert not am.is_gradient_checkpointing


def test_enable_input_require_grads_is_harmless():
    # transformers / PEFT call it for reentrant checkpointing; on the base model it would register a hook
    # on an embedding module that the captured graphs never call.
    am = lora("llama")
    embeddings = am.base_model.get_input_embeddings()
    am.enable_input_require_grads()
    am.disable_input_require_grads()
    assert not embeddings._forward_hooks


def test_a_model_without_repeated_blocks_warns():
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    am = adaptc.inject(Small(), "lora", example_inputs=(torch.randn(2, 8),), r=2)
    am.train()
    am.graph_for(Inputs((torch.randn(2, 8),), {}))
    with pytest.warns(UserWarning, match="no repeated blocks"):
        am.gradient_checkpointing_enable()


def test_blocks_of_a_custom_module_list():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.nn.functional.gelu(self.fc(self.norm(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Linear(4, 8)
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x).sum()

    x = torch.randn(5, 4)
    am = adaptc.inject(Net(), "lora", example_inputs=(x,), r=2, init="gaussian", targets=".*")
    am.train()
    reference = _custom_grads(am, x)
    am.gradient_checkpointing_enable({"policy": "selective"})
    gm = am.graph_for(Inputs((x,), {}))
    assert [gm.get_submodule(n.target).path for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith(checkpoint.BLOCKS_ATTR)] == [f"blocks.{i}" for i in range(3)]
    assert_same(reference, _custom_grads(am, x))


def _custom_grads(am, x):
    am.zero_grad(set_to_none=True)
    out = am(x)
    out.backward()
    return out.detach(), {k: p.grad.clone() for k, p in am.named_parameters() if p.requires_grad}
