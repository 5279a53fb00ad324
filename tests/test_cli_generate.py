"""`adaptc generate`: streamed text equal to the merged model's greedy generate, adapter choice, seeds, errors."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

import adaptc
from adaptc.cli import main

# A model file: a 2-layer Llama over a word-level tokenizer of 64 words (ids 0-3 are the special tokens).
MODEL_FILE = '''
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]


def tokenizer():
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def build_model():
    with open(Path(__file__).with_name("built.log"), "a") as log:  # the tests check when the model is built
        log.write("built\\n")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.arange(4, 12)[None], "use_cache": False}
'''
PROMPT = "w5 w17 w3 w42"
NEW = 12


def _write_model(folder: Path, *, with_tokenizer: bool = True) -> Path:
    source = MODEL_FILE if with_tokenizer else MODEL_FILE.replace("def tokenizer():", "def _no_tokenizer():")
    path = folder / "lm.py"
    path.write_text(source)
    return path


def _import(path: Path):
    spec = importlib.util.spec_from_file_location("lm_for_generate_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _greedy_text(module, model) -> str:
    """The reference: transformers' own greedy generate on a plain (merged or base) model, decoded."""
    tokenizer = module.tokenizer()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model file and a folder with two adapters: ``default`` in it, ``task_b`` in its subfolder; the texts
    that the base model and each adapter, merged, generate greedily."""
    root = tmp_path_factory.mktemp("generate")
    path = _write_model(root)
    module = _import(path)
    torch.manual_seed(1)
    am = adaptc.inject(module.build_model(), "lora", example_inputs=module.example_inputs(), r=4)
    am.add_adapter("task_b", adaptc.LoraConfig(r=4))
    with torch.no_grad():
        for name, p in am.named_parameters():
            if "lora_B" in name:  # zero at init: randomised so that each adapter changes the output
                p.normal_(0, 0.5)
    adapters = root / "adapters"
    am.save_adapter(adapters)
    assert (adapters / "adapter_config.json").is_file() and (adapters / "task_b" / "adapter_config.json").is_file()

    am.set_adapter("default")
    texts = {"base": _greedy_text(module, module.build_model()), "default": _greedy_text(module, am.merge())}
    loaded = adaptc.load_adapter(module.build_model(), adapters, example_inputs=module.example_inputs(),
                                 adapter_name="task_b")
    texts["task_b"] = _greedy_text(module, loaded.merge())
    assert len(set(texts.values())) == 3, texts  # the adapters matter
    assert all(len(text.split()) >= 4 for text in texts.values()), texts
    return path, adapters, texts


def _generate(capsys, *args: str) -> str:
    assert main(["generate", *args]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def _assert_one_line_error(capsys, rc: int, *parts: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptc: error: "), err
    for part in parts:
        assert part in lines[0], err


def test_greedy_text_is_the_merged_models_and_not_the_base_models(capsys, saved):
    path, adapters, texts = saved
    got = _generate(capsys, str(path), "--adapter", str(adapters), "--prompt", PROMPT, "--max-new-tokens", str(NEW))
    assert got == texts["default"]  # the new tokens only: the prompt is not repeated
    # --temperature 0 is greedy too; without --adapter the base model generates.
    base = _generate(capsys, str(path), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--temperature", "0")
    assert base == texts["base"] != got


def test_adapter_name_picks_the_adapter_in_its_subfolder(capsys, saved):
    path, adapters, texts = saved
    got = _generate(capsys, str(path), "--adapter", str(adapters), "--adapter-name", "task_b", "--prompt", PROMPT,
                    "--max-new-tokens", str(NEW))
    assert got == texts["task_b"]


def test_sampling_with_a_seed_is_reproducible(capsys, saved):
    path, _, texts = saved  # the base model: seeding is the command's, and it runs in a second, not four
    args = [str(path), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--temperature", "1.5", "--top-p", "0.95"]
    first = _generate(capsys, *args, "--seed", "7")
    assert first and first != texts["base"]  # sampled, not greedy
    assert _generate(capsys, *args, "--seed", "7") == first
    assert _generate(capsys, *args, "--seed", "8") != first


def test_a_model_file_without_tokenizer_fails_before_the_model_is_built(capsys, tmp_path):
    path = _write_model(tmp_path, with_tokenizer=False)
    rc = main(["generate", str(path), "--prompt", PROMPT])
    _assert_one_line_error(capsys, rc, "defines no tokenizer()", "def tokenizer()")
    assert not (tmp_path / "built.log").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0.9"], "give --temperature"),
    (["--temperature", "-0.5"], "--temperature must be a number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--adapter-name", "task_b"], "give --adapter too"),
])
def test_bad_options_fail_before_the_model_is_built(capsys, tmp_path, args, message):
    path = _write_model(tmp_path)
    rc = main(["generate", str(path), "--prompt", PROMPT, *args])
    _assert_one_line_error(capsys, rc, message)
    assert not (tmp_path / "built.log").exists()


def test_an_ambiguous_or_unknown_adapter_name_fails_before_the_model_is_built(capsys, tmp_path, saved):
    _, adapters, _ = saved
    path = _write_model(tmp_path)
    several = tmp_path / "several"
    for name in ("a", "b"):  # adapters in subfolders only
        shutil.copytree(adapters / "task_b", several / name)
    rc = main(["generate", str(path), "--adapter", str(several), "--prompt", PROMPT])
    _assert_one_line_error(capsys, rc, "holds several adapters (a, b)", "--adapter-name")
    rc = main(["generate", str(path), "--adapter", str(adapters), "--adapter-name", "task_c", "--prompt", PROMPT])
    _assert_one_line_error(capsys, rc, "no adapter named 'task_c'", "task_b")
    assert not (tmp_path / "built.log").exists()


def test_help_and_the_example_model_file(capsys):
    assert main(["generate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the options' help
    assert "adaptc generate examples/tiny_gpt2.py" in help_text and "without it the base model generates" in help_text
    tiny = Path(__file__).resolve().parents[1] / "examples" / "tiny_gpt2.py"  # it defines tokenizer() too
    words = _generate(capsys, str(tiny), "--prompt", "The cat sat on", "--max-new-tokens", "4").split()
    assert len(words) == 4 and "<unk>" not in words
