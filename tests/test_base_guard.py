"""Nothing reached through an AdaptedModel runs the base model without the adapters, silently.

``am.generate`` is transformers' generate with every step through the adapted graphs: its tokens
equal those of the merged model's own ``generate`` (transformers' code, with its KV cache: an
independent reference) for greedy and beam search, and PEFT's for prompt tuning. Any other method
found on the base model that runs the base model's modules raises instead of skipping the adapters.
"""

from __future__ import annotations

import pytest
import torch
from model_zoo import tiny_gpt2, tiny_llama, tiny_t5
from peft import PeftModel
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import adaptc
from adaptc import AdaptcError


def _randomize(am: adaptc.AdaptedModel, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.normal_(0, std)


def _llama() -> LlamaForCausalLM:
    return tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=96, max_position_embeddings=2048,
                      pad_token_id=0).eval()


def _gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2(n_embd=64, vocab_size=100, n_positions=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0).eval()


@pytest.mark.integration  # by time (make test-unit under 2 minutes): transformers' generate
@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_generate_runs_the_adapters_and_equals_the_merged_model(build):
    ids = torch.randint(3, 90, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    am = adaptc.inject(build(), "lora", example_inputs={"input_ids": ids[:2, :8]}, r=4)
    _randomize(am)
    options = {"attention_mask": mask, "max_new_tokens": 6, "pad_token_id": 0}
    greedy = am.generate(input_ids=ids, do_sample=False, **options)
    beams = am.generate(ids, num_beams=3, do_sample=False, **options)  # input_ids positionally
    with am.disable_adapters():
        base = am.generate(input_ids=ids, do_sample=False, **options)
    merged = am.merge()
    assert torch.equal(greedy, merged.generate(input_ids=ids, do_sample=False, **options))
    assert torch.equal(beams, merged.generate(input_ids=ids, num_beams=3, do_sample=False, **options))
    assert not torch.equal(greedy, base), "the adapters changed nothing: the check above could not fail"


@pytest.mark.integration  # by time (make test-unit under 2 minutes): PEFT as the reference
def test_generate_with_prompt_tuning_equals_greedy_decoding_of_peft(tmp_path):
    """The reference is a greedy loop over PEFT's forward: PEFT's own generate for prompt tuning (with
    its cache) gives other tokens than its forward does under transformers 5.24, so it is no reference."""
    ids = torch.randint(3, 90, (2, 7))
    model = _llama()
    am = adaptc.inject(model, "prompt", example_inputs={"input_ids": ids}, num_virtual_tokens=5)
    _randomize(am, std=2.0)
    got = am.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    with am.disable_adapters():
        base = am.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    am.save_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(_llama_like(model), tmp_path).eval()
    want = ids
    with torch.no_grad():
        for _ in range(5):
            next_token = peft_model(input_ids=want).logits[:, -1].argmax(-1, keepdim=True)
            want = torch.cat([want, next_token], dim=1)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)


def _llama_like(model: LlamaForCausalLM) -> LlamaForCausalLM:
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_generate_on_an_encoder_decoder_model_is_refused_with_what_to_do():
    ids = torch.randint(1, 64, (2, 6))
    am = adaptc.inject(tiny_t5(num_layers=1, num_decoder_layers=1).eval(), "lora",
                       example_inputs={"input_ids": ids, "decoder_input_ids": ids}, r=2)
    with pytest.raises(AdaptcError, match="encoder-decoder.*merge"):
        am.generate(input_ids=ids, max_new_tokens=3)


class _WithFeatures(nn.Module):
    """A model with a second entry point, like timm's ``forward_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def width(self) -> int:
        return self.body.in_features


def test_a_base_method_that_runs_the_model_raises_instead_of_skipping_the_adapters():
    model = _WithFeatures()
    x = torch.randn(4, 8)
    am = adaptc.inject(model, "lora", example_inputs=(x,), targets=["body"], r=2)
    _randomize(am)
    with pytest.raises(AdaptcError, match=r"am\.features\(\) runs the base model \(its module 'body'\)"):
        am.features(x)
    assert am.width() == 8  # methods that run no module still work
    with am.disable_adapters():  # the base model is what is asked for here
        torch.testing.assert_close(am.features(x), model.body(x).relu())
    am.delete_adapter("default")
    torch.testing.assert_close(am.features(x), model.body(x).relu())  # no adapter left: nothing skipped


def test_generate_on_a_model_without_generate_says_what_to_use():
    am = adaptc.inject(_WithFeatures(), "lora", example_inputs=(torch.randn(2, 8),), targets=["body"], r=2)
    with pytest.raises(AdaptcError, match=r"adaptc\.generate"):
        am.generate(torch.randn(2, 8))


@pytest.mark.integration  # by time (make test-unit under 2 minutes): transformers' pipeline
def test_text_generation_pipeline_generates_with_the_adapters():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w1", pad_token="w0", eos_token="w2")
    am = adaptc.inject(_llama(), "lora", example_inputs={"input_ids": torch.randint(3, 90, (2, 7))}, r=4)
    _randomize(am)
    text = "w5 w6 w7 w8 w9"
    got = pipeline("text-generation", model=am, tokenizer=tokenizer)(
        text, max_new_tokens=5, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = tokenizer(text, return_tensors="pt")
    want = am.merge().generate(**prompt, max_new_tokens=5, do_sample=False)[0]
    assert list(got) == want.tolist()
