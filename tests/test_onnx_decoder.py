"""The text-generation export: a decoder with a key/value cache that ONNX Runtime (a plain session loop) and
onnxruntime-genai run token for token like ``am.generate``, adapters switched per request.

The reference is ``am.generate`` (transformers' generate with its cache, through the adapted graphs) and, for
the base model, the unadapted transformers model itself. CI exports Llama (grouped-query attention, two
adapters, unmerged) and GPT-2 (merged, with a tokenizer); the other families run under ``slow``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from adaptc.targets import onnx_decoder as dec
from adaptc.targets import ort as rt
from adaptc.targets.decoder_loop import greedy
from model_zoo import CAUSAL_LMS

import adaptc
from adaptc.errors import AdaptcError, ExportError, InputError
from adaptc.ort import OrtGenerator, genai_available

pytestmark = pytest.mark.integration  # ONNX export and ONNX Runtime

ROOT = Path(__file__).resolve().parents[1]
NEW = 32
genai = pytest.mark.skipif(not genai_available(), reason="onnxruntime-genai is not installed")


def _adapted(family: str, adapters: tuple[str, ...] = ("default",)) -> adaptc.AdaptedModel:
    """A zoo causal LM with LoRA adapters of random (non-zero) weights: each changes the tokens."""
    torch.manual_seed(0)
    model = CAUSAL_LMS[family]().eval()
    vocab = model.config.vocab_size
    eos = model.generation_config.eos_token_id
    if not isinstance(eos, int) or not 0 <= eos < vocab:  # GPT-2's 50256, Phi-3's 32000: outside the vocabulary
        # onnxruntime-genai needs an EOS in the vocabulary (else it stops at the pad token): give one to both sides
        model.config.eos_token_id = model.generation_config.eos_token_id = vocab - 1
    ids = torch.randint(0, vocab, (2, 6))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=4, alpha=8, targets="all-linear",
                       adapter_name=adapters[0])
    for name in adapters[1:]:
        am.add_adapter(name, adaptc.LoraConfig(r=2, alpha=4, targets="all-linear"))
    generator = torch.Generator().manual_seed(1)
    for name, param in am.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    return am.eval()


def _prompt(am, length: int = 6, batch: int = 1, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, am.base_model.config.vocab_size, (batch, length), generator=generator)


def _reference(am, prompt: torch.Tensor, adapter: str | None) -> tuple[list[int], list[np.ndarray]]:
    """am.generate's greedy tokens (adapter active, or none) and each step's logits."""
    if adapter is None:
        with am.disable_adapters():
            out = am.generate(prompt, max_new_tokens=NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    else:
        am.set_adapter(adapter)
        out = am.generate(prompt, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    return out.sequences[0].tolist(), [step[0].float().numpy() for step in out.logits]


def _assert_matches(folder: Path, am, adapters: list[str | None], engines: tuple[str, ...],
                    merged: bool = False) -> None:
    """ORT's tokens and logits = am.generate's with each adapter (merged: the folder's model is that adapter)."""
    session = rt.open_session(folder / dec.MODEL_FILE)
    generators = {engine: OrtGenerator(folder, engine) for engine in engines}
    for adapter in adapters:
        prompt = _prompt(am)
        tokens, logits = _reference(am, prompt, adapter)
        in_folder = None if merged else adapter
        for engine, generator in generators.items():
            got = generator.generate(prompt, adapter=in_folder, max_new_tokens=NEW)[0].tolist()
            assert got == tokens, (engine, adapter)
        loaded = [rt.load_adapter(folder / f"{in_folder}.onnx_adapter")] if in_folder else []
        _, steps = greedy(session, prompt.numpy(), len(logits), loaded)
        worst = max(float(np.abs(s[0] - r).max()) for s, r in zip(steps, logits))
        assert worst <= 1e-4, (adapter, worst)


# --- Llama (grouped-query attention): two adapters kept apart, switched per request ----------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    am = _adapted("llama", ("default", "second"))
    am.set_adapter("default")
    folder = tmp_path_factory.mktemp("llama") / "out"
    report = adaptc.export_onnx(am, folder, task="text-generation", merge=False)
    return am, folder, report


def test_llama_folder_holds_the_decoder_its_adapters_and_genai_config(llama):
    am, folder, report = llama
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.onnx", "genai_config.json", "default.onnx_adapter", "second.onnx_adapter"}
    assert report.parity_max_abs_diff <= 1e-4 and set(report.parity) == {"default", "no adapter"}
    graph = onnx.load(str(folder / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]  # 2 kv heads of 4: grouped
    outs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.output}
    assert outs["logits"] == ["batch", "sequence", 96]
    assert outs["present.0.key"] == ["batch", 2, "total_sequence", 16]
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert config["search"]["past_present_share_buffer"] is False


def test_llama_session_loop_matches_am_generate_for_each_adapter_and_none(llama):
    am, folder, _ = llama
    _assert_matches(folder, am, ["default", "second", None], ("session",))
    # no adapter active is the transformers model itself, run by transformers alone
    prompt = _prompt(am, seed=11)
    want = am.base_model.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert adaptc.ort.generate(folder, prompt, max_new_tokens=NEW, engine="session").tolist() == want.tolist()


@genai
def test_llama_onnxruntime_genai_switches_adapters_per_request(llama):
    import onnxruntime_genai as og

    am, folder, _ = llama
    _assert_matches(folder, am, ["second", None, "default"], ("genai",))
    # onnxruntime-genai's own API, as a user writes it: one model, adapters loaded once, one per generator
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    adapters.load(str(folder / "second.onnx_adapter"), "second")
    prompt = _prompt(am)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + 8)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "second")
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    am.set_adapter("second")
    assert list(generator.get_sequence(0)) == am.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()


def test_llama_batch_with_left_padding_matches_am_generate(llama):
    am, folder, _ = llama
    ids = _prompt(am, length=7, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: a 4-token prompt, left-padded
    am.set_adapter("default")
    want = am.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = OrtGenerator(folder, "session").generate(ids, attention_mask=mask, adapter="default", max_new_tokens=12)
    assert got.tolist() == want.tolist()


def test_unknown_adapter_and_overlong_requests_are_refused_before_running(llama):
    am, folder, _ = llama
    with pytest.raises(InputError, match=r"unknown adapter 'nope'.*'default', 'second'"):
        adaptc.ort.generate(folder, _prompt(am), adapter="nope", engine="session")
    with pytest.raises(InputError, match="context length"):
        adaptc.ort.generate(folder, _prompt(am), max_new_tokens=10_000, engine="session")
    with pytest.raises(InputError, match="token ids"):
        adaptc.ort.generate(folder, [[500]], engine="session")


def test_sampling_is_reproducible_with_a_seed(llama):
    am, folder, _ = llama
    generator = OrtGenerator(folder, "session")
    first = generator.generate(_prompt(am), adapter="second", do_sample=True, top_k=20, top_p=0.9, seed=5)
    again = generator.generate(_prompt(am), adapter="second", do_sample=True, top_k=20, top_p=0.9, seed=5)
    greedy = generator.generate(_prompt(am), adapter="second")
    assert first.tolist() == again.tolist() and first.shape == greedy.shape


# --- GPT-2 merged, with a tokenizer, through the command line ---------------------------------------------

def _tiny_gpt2():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import tiny_gpt2
    finally:
        sys.path.pop(0)
    return tiny_gpt2


def test_cli_task_text_generation_writes_a_folder_genai_runs_with_the_tokenizer(tmp_path, capsys):
    from adaptc.cli import main

    out = tmp_path / "out"
    code = main(["export", str(ROOT / "examples" / "tiny_gpt2.py"), "--task", "text-generation", "-o", str(out),
                 "--init", "gaussian", "--no-optimize"])  # the unoptimized path; the others test the optimized one
    assert code == 0, capsys.readouterr().err
    assert "decoder with a key/value cache, merged" in capsys.readouterr().out
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tiny = _tiny_gpt2()
    ids = tiny.tokenizer()("the cat sat on the", return_tensors="np")["input_ids"]
    base = tiny.build_model()  # merged init="gaussian" LoRA: compare the two engines with each other, and
    got = adaptc.ort.generate(out, ids, max_new_tokens=12, engine="session")  # the base model's own shape
    assert got.shape[0] == 1 and got[0, : ids.shape[1]].tolist() == ids[0].tolist()
    assert base.config.vocab_size == json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"]
    from transformers import PreTrainedTokenizerFast

    saved = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert saved("the cat sat on the")["input_ids"] == ids[0].tolist()
    if genai_available():
        assert adaptc.ort.generate(out, ids, max_new_tokens=12, engine="genai").tolist() == got.tolist()


def _bpe_tokenizer():
    """A byte-level BPE tokenizer trained here on two sentences (GPT-2's kind, which onnxruntime-genai reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran in the park"] * 10, trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_gpt2_merged_with_a_bpe_tokenizer_matches_am_generate_and_genai_reads_the_tokenizer(tmp_path):
    am = _adapted("gpt2")
    folder = tmp_path / "gpt2"
    tokenizer = _bpe_tokenizer()
    report = adaptc.export_onnx(am, folder, task="text-generation", tokenizer=tokenizer)
    assert report.merged and not report.adapters and not report.warnings
    assert {"tokenizer.json", "tokenizer_config.json"} <= {Path(f).name for f in report.tokenizer_files}
    engines = ("session", "genai") if genai_available() else ("session",)
    _assert_matches(folder, am, ["default"], engines, merged=True)
    if genai_available():  # onnxruntime-genai's own tokenizer reads the saved files
        import onnxruntime_genai as og

        text = "the cat sat in the park"
        assert list(og.Tokenizer(og.Model(str(folder))).encode(text)) == tokenizer(text)["input_ids"]


def test_cli_refuses_a_model_file_as_output_before_building(tmp_path, capsys):
    from adaptc.cli import main

    code = main(["export", str(ROOT / "examples" / "tiny_gpt2.py"), "--task", "text-generation",
                 "-o", str(tmp_path / "model.onnx")])
    assert code != 0 and "writes a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_names_a_failing_tokenizer_in_the_model_file(tmp_path, capsys):
    from adaptc.cli import main

    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import torch, transformers\n"
        "def build_model():\n"
        "    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))\n"
        "def example_inputs():\n"
        "    return {'input_ids': torch.zeros(2, 4, dtype=torch.long)}\n"
        "def tokenizer():\n"
        "    raise ValueError('no vocabulary file')\n"
    )
    code = main(["export", str(model_file), "--task", "text-generation", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "tokenizer() in" in err and "no vocabulary file" in err
    assert not (tmp_path / "out").exists()


# --- clear errors before anything is written ---------------------------------------------------------------

class OwnLM(torch.nn.Module):
    """A causal LM of the user's own (no transformers cache): am.generate cannot keep a cache for it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def test_genai_config_of_a_model_without_an_eos_in_its_vocabulary_names_its_pad_token():
    from adaptc.targets import genai_config

    model = CAUSAL_LMS["phi3"]()  # eos 32000 in a vocabulary of 96, pad 0
    layout = dec.Layout(2, 2, 16, 16, [None, None], "past_key_values", ["input_ids", "attention_mask"])
    config = genai_config.build(model, layout, "model.onnx")["model"]
    assert (config["eos_token_id"], config["pad_token_id"]) == (0, 0)
    assert "position_ids" not in config["decoder"]["inputs"]  # only the inputs the forward takes
    assert "stops there" in genai_config.missing_eos(model)
    model.config.eos_token_id = model.generation_config.eos_token_id = 5
    assert genai_config.build(model, layout, "model.onnx")["model"]["eos_token_id"] == 5
    assert genai_config.missing_eos(model) is None


def test_a_model_without_a_cache_is_refused_with_the_reason(tmp_path):
    am = adaptc.inject(OwnLM(), "lora", example_inputs=(torch.zeros(2, 4, dtype=torch.long),), targets="head")
    with pytest.raises(ExportError, match="OwnLM is not a transformers model.*task=None"):
        adaptc.export_onnx(am, tmp_path / "out", task="text-generation")
    assert not list(tmp_path.iterdir())


def test_bad_options_are_refused_before_any_capture(tmp_path):
    am = _adapted("gpt2")
    with pytest.raises(ExportError, match="writes a folder"):
        adaptc.export_onnx(am, tmp_path / "model.onnx", task="text-generation")
    with pytest.raises(ExportError, match="merge=True"):
        adaptc.export_onnx(am, tmp_path / "out", task="text-generation", merge=False, quantize="int8")
    with pytest.raises(ExportError, match="task must be None"):
        adaptc.export_onnx(am, tmp_path / "out", task="summarization")
    with pytest.raises(ExportError, match="quantize must be"):
        adaptc.export_onnx(am, tmp_path / "out", task="text-generation", quantize="int3")
    with pytest.raises(AdaptcError, match="tokenizer= is for task"):
        adaptc.export_onnx(am, tmp_path / "m.onnx", tokenizer=object())
    with pytest.raises(InputError, match="no genai_config.json"):
        OrtGenerator(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_prefix_adapter_is_refused(tmp_path):
    torch.manual_seed(0)
    model = CAUSAL_LMS["gpt2"]().eval()
    am = adaptc.inject(model, "prefix", example_inputs={"input_ids": torch.randint(0, 96, (2, 6))},
                       num_virtual_tokens=2)
    with pytest.raises(ExportError, match="'prefix' adapter.*LoRA"):
        adaptc.export_onnx(am, tmp_path / "out", task="text-generation")


# --- mixed-adapter batches in one decoder graph (targets/onnx_mixed.py's rewrite) -----------------------

def test_mixed_adapter_decoder_gives_each_row_its_own_adapters_tokens(tmp_path):
    am = _adapted("llama", ("default", "second"))
    report = adaptc.export_onnx(am, tmp_path, task="text-generation", mixed_adapters=True)
    assert report.mixed_adapters == ["default", "second"] and report.parity_max_abs_diff <= 1e-4
    prompts = torch.cat([_prompt(am, seed=s) for s in (3, 4, 5)])
    rows = ["second", None, "default"]
    expected = [_reference(am, prompts[row:row + 1], adapter)[0] for row, adapter in enumerate(rows)]
    # onnxruntime-genai gets the rows' adapter_index through set_model_input; the session loop feeds it each step
    for engine in ("genai", "session") if genai_available() else ("session",):
        generator = OrtGenerator(tmp_path, engine=engine)
        got = generator.generate(prompts, adapter=rows, max_new_tokens=NEW)
        for row, tokens in enumerate(expected):  # each row equals its adapter alone under am.generate
            assert got[row, :len(tokens)].tolist() == tokens, (engine, row, rows[row])  # padded after an EOS
    with pytest.raises(InputError, match="unknown adapter 'third'"):
        generator.generate(prompts, adapter=["third", None, None])


# --- the other families, and quantization (slow) -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen3", "falcon", "phi3"])
def test_family_matches_am_generate_for_its_adapter_and_none(family, tmp_path):
    am = _adapted(family)
    report = adaptc.export_onnx(am, tmp_path, task="text-generation", merge=False)
    assert report.parity_max_abs_diff <= 1e-4
    engines = ("session", "genai") if genai_available() else ("session",)
    _assert_matches(tmp_path, am, ["default", None], engines)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_folder_reports_its_token_agreement(kind, tmp_path):
    am = _adapted("llama")
    report = adaptc.export_onnx(am, tmp_path, task="text-generation", quantize=kind)
    q = report.quantized
    assert q["kind"] == kind and 0.0 <= q["token_agreement"] <= 1.0 and q["tokens"] == 32
    ops = rt.op_counts(tmp_path / "model.onnx", rt.CONTRIB_DOMAIN)
    assert ("MatMulNBits" in ops) if kind == "int4" else any("Integer" in op or "Quant" in op for op in
                                                              rt.op_counts(tmp_path / "model.onnx"))
    print(f"{kind}: greedy agreement {q['token_agreement']:.0%}, max logit change {q['max_abs_change']:.3e}")
    got = adaptc.ort.generate(tmp_path, _prompt(am), max_new_tokens=8, engine="session")
    assert got.shape == (1, 14)
