"""Prompt methods all the way: PEFT-format checkpoints both ways, merge to constants, ONNX export, generate.

References: PEFT itself (it loads adaptc's files and adaptc loads PEFT's; outputs compared),
the unmerged adapted model (merge and export parity), and a hand-written greedy loop.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from model_zoo import images, tiny_bert, tiny_gpt2, tiny_vit, token_ids

import adaptc

V = 4


def _randomize(am) -> None:
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
@pytest.mark.parametrize("method,options", [
    pytest.param("prompt", {}, id="prompt"),
    pytest.param("ptuning", {"encoder_hidden_size": 16}, id="ptuning", marks=pytest.mark.slow),
    pytest.param("prefix", {}, id="prefix", marks=pytest.mark.slow),
    pytest.param("prefix", {"prefix_projection": True, "encoder_hidden_size": 16}, id="prefix-projection"),
])
def test_save_load_and_peft_reads_it(tmp_path, method, options):
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = token_ids(2, 8)
    am = adaptc.inject(model, method, example_inputs={"input_ids": ids}, num_virtual_tokens=V, **options)
    _randomize(am)
    with torch.no_grad():
        expected = am(input_ids=ids).logits
    am.save_adapter(tmp_path)
    again = adaptc.load_adapter(model, tmp_path, example_inputs={"input_ids": ids})
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, expected, atol=0, rtol=0)
    # the encoder travels too, so training resumes with the same trainable parameters
    assert sum(p.numel() for p in again.adapters.parameters()) == sum(p.numel() for p in am.adapters.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(model, tmp_path).eval()
    with torch.no_grad():
        logits = theirs(input_ids=ids).logits
    torch.testing.assert_close(logits if method == "prefix" else logits[:, V:], expected, atol=1e-5, rtol=0)


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
@pytest.mark.parametrize("method", ["prompt", "ptuning", pytest.param("prefix", marks=pytest.mark.slow)])
def test_loads_peft_checkpoints(tmp_path, method):
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = token_ids(2, 8)
    config = {
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V),
        "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=V, encoder_hidden_size=16),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V),
    }[method]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            expected = theirs(input_ids=ids).logits
            expected = expected if method == "prefix" else expected[:, V:]
        theirs.save_pretrained(tmp_path)
        theirs.base_model  # noqa: B018 - PEFT's prompt wrappers leave the base model's modules unchanged
        am = adaptc.load_adapter(model, tmp_path, example_inputs={"input_ids": ids})
    with torch.no_grad():
        torch.testing.assert_close(am(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_merge_folds_to_constants_and_exports(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    pixels = images(2, 32)
    am = adaptc.inject(model, "ptuning", example_inputs={"pixel_values": pixels}, num_virtual_tokens=V)
    _randomize(am)
    with torch.no_grad():
        expected = am(pixel_values=pixels).logits
        base = model(pixel_values=pixels).logits
    assert (expected - base).abs().max() > 1e-3
    merged = am.merge()
    assert not any(p.requires_grad for p in merged.parameters())
    assert not list(merged.adapters.parameters())  # the encoder was evaluated once and dropped
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, expected, atol=1e-5, rtol=0)
    report = adaptc.export_onnx(merged, tmp_path / "vit.onnx")
    assert max(report.parity.values()) <= 1e-4
    assert (tmp_path / "vit.onnx").is_file()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method,build", [("prefix", tiny_gpt2), ("prompt", tiny_bert)], ids=["gpt2-prefix", "bert-prompt"])
def test_text_models_export(tmp_path, method, build):
    torch.manual_seed(0)
    model = build().eval()
    ids = token_ids(2, 8)
    am = adaptc.inject(model, method, example_inputs={"input_ids": ids}, num_virtual_tokens=V)
    _randomize(am)
    report = adaptc.export_onnx(am.merge(), tmp_path / "m.onnx")
    assert max(report.parity.values()) <= 1e-4


@pytest.mark.integration  # by time (make test-unit under 2 minutes): a tokenizer-sized run
def test_prompt_init_from_vocabulary_and_text():
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    table = model.transformer.wte.weight
    ids = token_ids(2, 8)
    am = adaptc.inject(model, "prompt", example_inputs={"input_ids": ids}, num_virtual_tokens=5, init="vocab")
    prompt = am.adapters["default"]["prompt"].embedding.weight
    assert all(any(torch.equal(row, t) for t in table) for row in prompt)  # every row is a token's embedding
    text_ids = [7, 3]  # a tokenizer: text -> ids; the text's embeddings repeat to fill the prompt
    am = adaptc.inject(model, "prompt", example_inputs={"input_ids": ids}, num_virtual_tokens=5,
                       init="hello world", tokenizer=lambda text: text_ids)
    prompt = am.adapters["default"]["prompt"].embedding.weight
    torch.testing.assert_close(prompt, table[[7, 3, 7, 3, 7]], atol=0, rtol=0)


def test_unmerged_export_is_refused_for_prompt_methods(tmp_path):
    model = tiny_gpt2().eval()
    am = adaptc.inject(model, "prefix", example_inputs={"input_ids": token_ids(2, 8)}, num_virtual_tokens=V)
    with pytest.raises(adaptc.ExportError, match="merge=False"):
        adaptc.export_onnx(am, tmp_path / "m.onnx", merge=False)
    assert not list(tmp_path.iterdir())


def _greedy(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.integration  # by time (make test-unit under 2 minutes): transformers' generate
def test_generate_with_a_prompt():
    torch.manual_seed(0)
    model = tiny_gpt2().eval()
    ids = token_ids(2, 5)
    am = adaptc.inject(model, "prompt", example_inputs={"input_ids": ids}, num_virtual_tokens=V)
    _randomize(am)
    out = adaptc.generate(am, ids, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    assert torch.equal(out, _greedy(am, ids, 6))
    with pytest.raises(adaptc.InputError, match="max_new_tokens"):
        adaptc.generate(am, ids, max_new_tokens=-1)
