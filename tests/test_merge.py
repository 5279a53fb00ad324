"""am.merge(): adapters folded into the user's own weights; outputs equal the adapted model's."""

from __future__ import annotations

import copy

import model_zoo
import pytest
import torch
from model_zoo import VOCAB
from torch import nn
from transformers import GPT2LMHeadModel

import adaptc
from adaptc.errors import MergeError


def tiny_gpt2() -> GPT2LMHeadModel:
    return model_zoo.tiny_gpt2(n_positions=32, bos_token_id=0, eos_token_id=0).eval()


class ConvEmbedNet(nn.Module):
    """Embedding -> grouped conv1d -> conv2d (stride) -> linear: every site kind merge handles."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.grouped = nn.Conv1d(16, 32, kernel_size=3, padding=1, groups=4)
        self.conv2d = nn.Conv2d(1, 8, kernel_size=3, stride=2)
        self.head = nn.Linear(8 * 15 * 3, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.grouped(self.embed(ids).transpose(1, 2))  # [b, 32, 8]
        h = self.conv2d(h.unsqueeze(1))  # [b, 8, 15, 3]
        return self.head(h.flatten(1))


def randomize(am: adaptc.AdaptedModel) -> None:
    """Give every adapter parameter (zero-initialised B included) a non-trivial value."""
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def gpt2_inputs(batch: int = 2, length: int = 8) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (batch, length)), "use_cache": False}


@pytest.mark.parametrize(
    "options",
    [
        {"r": 4, "alpha": 8},
        {"r": 4, "alpha": 8, "rslora": True},
        {"r": 4, "alpha": 8, "use_dora": True},
    ],
    ids=["lora", "rslora", "dora"],
)
def test_gpt2_conv1d_merge_equals_adapted(options: dict) -> None:
    model = tiny_gpt2()
    original = copy.deepcopy(model)
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), **options)
    randomize(am)
    check = gpt2_inputs(3, 11)  # another batch and length than the capture's
    with torch.no_grad():
        adapted = am(**check).logits
        base = original(**check).logits
    merged = am.merge()
    assert merged is model  # the user's own object, changed in place
    assert len(am.adapters) == 0
    with torch.no_grad():
        out = merged(**check).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter does change the outputs
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=0)
    assert not list(am.adapters.parameters())  # the merged adapter left the AdaptedModel
    # The merged transformers model still generates and saves.
    generated = merged.generate(check["input_ids"][:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7)


def test_gpt2_merge_save_pretrained_round_trip(tmp_path) -> None:
    model = tiny_gpt2()
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), r=4)
    randomize(am)
    check = gpt2_inputs(2, 6)
    with torch.no_grad():
        adapted = am(**check).logits
    am.merge().save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**check).logits, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_groups_and_embedding_merge(use_dora: bool) -> None:
    model = ConvEmbedNet().eval()
    ids = torch.randint(0, 50, (2, 8))
    targets = ["grouped", "conv2d", "head"] if use_dora else ["embed", "grouped", "conv2d", "head"]
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=targets, r=2, alpha=4, use_dora=use_dora)
    assert {s.kind for s in am.sites} >= {"conv", "linear"}
    randomize(am)
    check = torch.randint(0, 50, (5, 8))
    with torch.no_grad():
        adapted = am(check)
        merged = am.merge()(check)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


class SharedLayer(nn.Module):
    """One Linear applied twice (ALBERT-style sharing): one site with two uses, safe to merge."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def test_one_module_used_twice_merges() -> None:
    model = SharedLayer().eval()
    x = torch.randn(2, 16)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["layer"], r=2)
    assert [s.uses for s in am.sites] == [2]
    randomize(am)
    check = torch.randn(5, 16)
    with torch.no_grad():
        adapted = am(check)
        merged = am.merge(safe=True)(check)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_merge_only_active_adapter() -> None:
    model = ConvEmbedNet().eval()
    ids = torch.randint(0, 50, (2, 8))
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=["head"], r=2)
    am.add_adapter("other", targets=["grouped"], r=2)
    randomize(am)
    am.set_adapter("default")
    with torch.no_grad():
        adapted = am(ids)
        grouped_before = model.grouped.weight.clone()
        merged = am.merge()(ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert torch.equal(model.grouped.weight, grouped_before)  # the inactive adapter was not folded in
    assert list(am.adapters) == ["other"]  # and it stays, unmerged, like PEFT's merge_adapter of one adapter


def test_tied_weight_is_refused_and_nothing_changes() -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), targets=["transformer.h.0.attn.c_attn", "lm_head"], r=4)
    randomize(am)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(MergeError, match="shared by lm_head, transformer.wte"):
        am.merge()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert len(am.adapters) == 1  # the adapter is still there


def test_safe_merge_refuses_nan_and_changes_nothing() -> None:
    model = ConvEmbedNet().eval()
    ids = torch.randint(0, 50, (2, 8))
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=["grouped", "head"], r=2)
    with torch.no_grad():
        am.adapters["default"]["head"].lora_B.fill_(float("nan"))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(MergeError, match="NaN or inf into head.weight"):
        am.merge(safe=True)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    am.merge(safe=False)  # unsafe merge writes what it computed
    assert torch.isnan(model.head.weight).all()


# --- every model family the LoRA pass supports ----------------------------------------------------

from test_models import CASES, Case, call  # noqa: E402  (the cases of the zoo of tests/test_models.py)

INTEGRATION_CASES = {"timm-resnet18", "hf-llama-gqa"}  # by time (make test-unit under 2 minutes)
SLOW_CASES = {"hf-t5", "timm-swin_tiny_patch4_window7_224", "torchaudio-wav2vec2_base", "torchaudio-conformer",
              "timm-convnext_atto", "hf-wav2vec2-ctc"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c.id in SLOW_CASES
     else pytest.param(c, marks=pytest.mark.integration) if c.id in INTEGRATION_CASES else c for c in CASES],
    ids=[c.id for c in CASES],
)
def test_merge_equals_adapted_on_every_model(case: Case) -> None:
    model = case.build().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # convnext's layer scale starts at 1e-6 and would hide the adapter
                p.fill_(1.0)
    am = adaptc.inject(model, "lora", example_inputs=case.inputs(*case.sizes), r=4, alpha=8)
    randomize(am)
    check = case.inputs(*case.other_sizes)
    with torch.no_grad():
        adapted = case.output(call(am, check))
        with am.disable_adapters():
            base = case.output(call(am, check))
        merged_model = am.merge(safe=True)
        merged = case.output(call(merged_model, check))
        after = case.output(call(am, check))  # the AdaptedModel without adapters is the merged model
    assert merged_model is model
    assert (adapted - base).abs().max() > 1e-4  # the adapter matters, so equality below means something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    torch.testing.assert_close(after, merged, atol=0, rtol=0)


def test_resnet18_3x3_and_7x7_convs_merge() -> None:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    am = adaptc.inject(model, "lora", example_inputs=(images,), targets=r"conv1|layer\d\.\d\.conv\d", r=2)
    assert len(am.sites) == 17
    randomize(am)
    check = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        adapted = am(check)
        merged = am.merge()(check)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_two_active_adapters_on_one_site_lora_then_dora() -> None:
    """Stacked adapters fold in the order the graph applies them (DoRA's norm is of the stored weight)."""
    model = ConvEmbedNet().eval()
    ids = torch.randint(0, 50, (2, 8))
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=["grouped", "head"], r=2)
    am.add_adapter("dora", targets=["grouped", "head"], r=2, use_dora=True)
    am.set_adapter(["default", "dora"])
    randomize(am)
    check = torch.randint(0, 50, (4, 8))
    with torch.no_grad():
        adapted = am(check)
        am.set_adapter("dora")
        only_dora = am(check)
        am.set_adapter(["default", "dora"])
        merged = am.merge()(check)
    assert (adapted - only_dora).abs().max() > 1e-3  # both adapters contribute
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert len(am.adapters) == 0


def test_pissa_merge_restores_the_adapted_function() -> None:
    model = tiny_gpt2()
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), r=4, init="pissa")
    randomize(am)
    check = gpt2_inputs(2, 9)
    with torch.no_grad():
        adapted = am(**check).logits
        merged = am.merge()(**check).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_bf16_weights_keep_their_dtype() -> None:
    model = ConvEmbedNet().eval().to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 8))
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=["grouped", "head"], r=2)
    randomize(am)
    with torch.no_grad():
        adapted = am(ids)
        merged = am.merge()(ids)
    assert model.head.weight.dtype == torch.bfloat16 and merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), adapted.float(), atol=0.1, rtol=0.02)  # bf16 rounding of W + dW


def test_merge_refuses_both_uses_of_a_tied_weight_even_when_only_the_embedding_is_adapted() -> None:
    model = tiny_gpt2()
    am = adaptc.inject(model, "lora", example_inputs=gpt2_inputs(), targets=["transformer.wte"], r=4)
    randomize(am)
    before = model.transformer.wte.weight.clone()
    with pytest.raises(MergeError, match="tied weights"):
        am.merge(safe=True)
    assert torch.equal(model.transformer.wte.weight, before)


def test_merged_weights_context_restores_the_user_model_exactly() -> None:
    """export_onnx lowers a merged model through this context without consuming the AdaptedModel."""
    from adaptc.targets.merge import merged_weights

    model = ConvEmbedNet().eval()
    ids = torch.randint(0, 50, (2, 8))
    am = adaptc.inject(model, "lora", example_inputs=(ids,), targets=["embed", "grouped", "head"], r=2)
    randomize(am)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        adapted = am(ids)
        with merged_weights(am):
            inside = model(ids)
            assert not torch.equal(model.head.weight, before["head.weight"])
        after = am(ids)
    torch.testing.assert_close(inside, adapted, atol=1e-5, rtol=0)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert torch.equal(after, adapted) and list(am.adapters) == ["default"]
