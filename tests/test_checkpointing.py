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
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "bert.encoder.layer", "vit": "vit.layers"}


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


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.integration)
                                        for n in ("llama", "gpt2", "bert", "vit")])
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
    uses = adapted_uses(training_graph(am, batch))
    am.gradient_checkpointing_enable({"policy": policy})
    try:
        assert am.is_gradient_checkpointing
        assert adapted_uses(training_graph(am, batch)) == uses  # the debug check counts inside the blocks
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
    assert figures["full"] < 0.25 * plain
    assert saved_bytes(am, batch) == plain
    assert_same(reference, loss_and_grads(am, batch), atol=0.0)  # the plain graph again, bit for bit


@pytest.mark.integration
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


@pytest.mark.integration
def test_without_preserved_rng_the_recompute_draws_other_masks():
    am = lora("gpt2", dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    batch = batch_for("gpt2")
    reference = loss_and_grads(am, batch, seed=7)
    am.gradient_checkpointing_enable({"preserve_rng_state": False})
    loss, grads = loss_and_grads(am, batch, seed=7)
    assert torch.equal(loss, reference[0])  # the forward is the same; the backward's masks are not
    assert max((grads[k] - reference[1][k]).abs().max().item() for k in grads) > 1e-4


@pytest.mark.integration
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


@pytest.mark.integration
def test_every_n_layers_checkpoints_every_nth_block():
    am = lora("llama", num_hidden_layers=4)
    batch = batch_for("llama")
    reference = loss_and_grads(am, batch)
    am.activation_checkpointing_enable(every_n_layers=2)  # transformers' name and option
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.2"]
    assert_same(reference, loss_and_grads(am, batch))


@pytest.mark.integration
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


@pytest.mark.integration
def test_prompt_tuning():
    batch = batch_for("gpt2")
    am = adaptc.inject(build("gpt2"), "prompt", example_inputs=batch, num_virtual_tokens=4)
    am.train()
    reference = loss_and_grads(am, batch)
    am.gradient_checkpointing_enable()
    assert block_paths(am, batch) == ["transformer.h.0", "transformer.h.1"]
    assert_same(reference, loss_and_grads(am, batch))


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_prefix_added_while_enabled():
    batch = batch_for("llama")
    am = adapt(build("llama"), Inputs((), batch), training=True)  # no adapter yet
    am.gradient_checkpointing_enable()
    am.add_adapter("default", "prefix", num_virtual_tokens=4)  # reads the attention ops of the plain graph
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    got = loss_and_grads(am, batch)
    am.gradient_checkpointing_disable()
    assert_same(loss_and_grads(am, batch), got)


@pytest.mark.integration
def test_the_recompute_sees_the_adapter_state_of_the_forward():
    # State that a call sets for its own length (disable_adapters) or that changes before the backward
    # (eval(): LoRA dropout off) is put back around the recompute: the gradients are those of the call made.
    am = lora("llama", dropout=0.2)
    am.add_adapter("other", r=4, alpha=8, init="gaussian")
    with torch.no_grad():
        for p in am.adapters["other"].parameters():
            p.normal_(0, 0.1)
    am.set_adapter(["default", "other"])
    am.train()
    batch = batch_for("llama")

    def run():
        am.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with am.disable_adapters(["other"]):
            loss = am(**batch).loss
        am.eval()  # LoRA dropout would be off in a recompute that read the flags now
        loss.backward()
        am.train()
        grads = {k: p.grad.clone() for k, p in am.named_parameters() if p.grad is not None}
        assert grads and all(".other." not in k for k in grads)
        return loss.detach(), grads

    reference = run()
    for policy in POLICIES:
        am.gradient_checkpointing_enable({"policy": policy})
        assert_same(reference, run())


@pytest.mark.integration
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


@pytest.mark.integration
def test_graphs_captured_later_are_checkpointed():
    am = lora("llama")
    am.gradient_checkpointing_enable()
    am._passes.debug = True  # ADAPTC_DEBUG_PASSES=1: lint and count adapted ops after every pass
    longer = {"input_ids": torch.randint(0, 64, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    longer["labels"] = longer["input_ids"]
    assert block_paths(am, longer) == ["model.layers.0", "model.layers.1"]  # another input structure


@pytest.mark.integration
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


@pytest.mark.integration
def test_inject_option():
    batch = batch_for("llama")
    am = adaptc.inject(build("llama"), "lora", example_inputs=batch, gradient_checkpointing="selective")
    am.train()
    assert am.is_gradient_checkpointing and am._checkpoint_pass().settings.policy == "selective"
    assert block_paths(am, batch) == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ConfigError, match="policy"):
        adaptc.inject(build("llama"), "lora", example_inputs=batch, gradient_checkpointing="some")


def test_settings_are_validated():
    make = checkpoint.make_settings
    assert make(None) == checkpoint.CheckpointSettings("full", False, True, 1)
    assert make({"use_reentrant": True}).use_reentrant and make({"policy": "selective"}).policy == "selective"
    with pytest.raises(ConfigError, match="'full' or 'selective'"):
        make({"policy": "all"})
    with pytest.raises(ConfigError, match="'determinism'"):
        make({"determinism": "none"})
    with pytest.raises(ConfigError, match="non-reentrant"):
        make({"policy": "selective", "use_reentrant": True})
    with pytest.raises(ConfigError, match="offload"):
        make(None, offload=True)
    with pytest.raises(ConfigError, match="every_n_layers"):
        make(None, every_n_layers=0)
    assert checkpoint.checkpoint_kwargs(False) is None and checkpoint.checkpoint_kwargs(True) == {}
    with pytest.raises(ConfigError, match="policy"):  # before the model is captured
        adaptc.inject(Net(), "lora", example_inputs=(torch.randn(2, 5, 4),), gradient_checkpointing="some")


@pytest.mark.integration
def test_enable_input_require_grads_is_harmless():
    # transformers / PEFT call it for reentrant checkpointing; on the base model it would register a hook
    # on an embedding module that the captured graphs never call.
    am = lora("llama")
    embeddings = am.base_model.get_input_embeddings()
    am.enable_input_require_grads()
    am.disable_input_require_grads()
    assert not embeddings._forward_hooks


@pytest.mark.integration
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
    with pytest.warns(UserWarning, match="no block to recompute"):
        am.gradient_checkpointing_enable()


class Block(torch.nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))


class Net(torch.nn.Module):
    """A model of the user's own: a ModuleList of blocks between a stem and a head."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.stem = torch.nn.Linear(4, 16)
        self.blocks = torch.nn.ModuleList([Block(dropout) for _ in range(3)])
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).square().mean()


def custom_lora(dropout=0.0):
    torch.manual_seed(0)
    am = adaptc.inject(Net(dropout), "lora", example_inputs=(torch.randn(2, 5, 4),), r=2, alpha=4, init="gaussian",
                       dropout=dropout)
    with torch.no_grad():
        for key, p in am.adapters.named_parameters():
            if key.endswith("lora_B"):
                p.normal_(0, 0.1)
    am.train()
    return am


def custom_step(am, x, seed=0):
    am.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = am(x)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in am.named_parameters() if p.requires_grad}


def _saved(am, x):
    weights = {t.untyped_storage().data_ptr() for t in [*am.parameters(), *am.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = am(x)
    loss.backward()
    am.zero_grad(set_to_none=True)
    return sum(saved.values())


def test_blocks_of_a_custom_module_list():
    am = custom_lora()
    x = torch.randn(8, 6, 4)
    reference, plain = custom_step(am, x), _saved(am, x)
    figures = {}
    for policy in POLICIES:
        am.gradient_checkpointing_enable({"policy": policy})
        gm = am.graph_for(Inputs((x,), {}))
        assert [gm.get_submodule(n.target).path for n in gm.graph.nodes
                if n.op == "call_module" and n.target.startswith(checkpoint.BLOCKS_ATTR)] == ["blocks.0", "blocks.1",
                                                                                           "blocks.2"]
        assert_same(reference, custom_step(am, x))
        figures[policy] = _saved(am, x)
    assert figures["full"] < figures["selective"] < plain, (figures, plain)
    am.gradient_checkpointing_disable()
    assert _saved(am, x) == plain
    assert_same(reference, custom_step(am, x), atol=0.0)


def test_dropout_in_a_custom_module_list_draws_the_same_masks():
    am = custom_lora(dropout=0.2)  # the blocks' own dropout and the LoRA branches'
    x = torch.randn(8, 6, 4)
    reference = custom_step(am, x, seed=3)
    assert (custom_step(am, x, seed=4)[0] - reference[0]).abs() > 1e-4
    for kwargs in ({"policy": "full"}, {"policy": "selective"}, {"use_reentrant": True}):
        am.gradient_checkpointing_enable(kwargs)
        assert_same(reference, custom_step(am, x, seed=3))


def test_selective_policy_keeps_a_gemm_with_its_in_place_write_and_refuses_a_read_before_it():
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    x, w, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.randn(5)

    def written(x, w):  # a LoRA group's pattern: a GEMM's output, then added into in place
        y = x @ w
        y.add_(b)
        return torch.tanh(y).sum()

    def read_first(x, w):
        y = x @ w
        z = y.sum()  # recomputed: it would read y after the write
        y.add_(b)
        return (torch.tanh(y) + z).sum()

    for fn in (written, read_first):
        want = torch.autograd.grad(fn(x, w), (x, w))
        if fn is written:
            got = torch.autograd.grad(torch_checkpoint(fn, x, w, use_reentrant=False,
                                                       context_fn=checkpoint._selective_contexts), (x, w))
            assert all(torch.allclose(a, g) for a, g in zip(want, got))
        else:
            with pytest.raises(RuntimeError, match="policy='full'"):
                torch_checkpoint(fn, x, w, use_reentrant=False, context_fn=checkpoint._selective_contexts)
