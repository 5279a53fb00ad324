"""Two-way checkpoint parity with PEFT (the reference; a test-only dependency).

(1) An adapter randomised in PEFT and saved with ``save_pretrained`` loads into a fresh copy of
the base model with ``adaptc.load_adapter`` and gives PEFT's outputs. (2) An adapter randomised
in adaptc and saved with ``save_adapter`` loads with ``PeftModel.from_pretrained`` and gives
adaptc's outputs. Both within 1e-5 in fp32, on GPT-2 (Conv1D), Llama, BERT, a timm ViT (Conv2d
patch embedding) and a custom model, covering Linear, Conv1D, Conv2d, grouped Conv2d, Embedding,
rsLoRA, DoRA and rank / alpha patterns.
"""

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from model_zoo import EmbedConvNet, tiny_bert, tiny_gpt2, tiny_llama, tiny_timm_vit

import adaptc

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT's fan_in_fan_out notes etc.
    pytest.mark.integration,  # by time (make test-unit under 2 minutes): PEFT as the reference
]


def gpt2():
    model = tiny_gpt2(n_positions=32, n_head=2, bos_token_id=0, eos_token_id=0)
    return model, {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}


def llama():
    model = tiny_llama(max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model, {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}


def bert():
    from transformers import BertModel

    model = tiny_bert(BertModel, num_attention_heads=2, max_position_embeddings=32, num_labels=2)
    return model, {"input_ids": torch.randint(0, 64, (2, 8))}


def vit():
    model = tiny_timm_vit(num_classes=5)
    return model, (torch.randn(2, 3, 32, 32),)


def custom():
    return EmbedConvNet(), (torch.randint(0, 20, (2, 9)),)


@dataclass
class Case:
    build: Any
    options: dict  # PEFT's LoraConfig arguments; adaptc accepts the same names


CASES = {
    "gpt2-conv1d-embedding-rslora-patterns": Case(gpt2, dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"], use_rslora=True,
        rank_pattern={"c_fc": 2}, alpha_pattern={"attn.c_proj": 3},
    )),
    "llama-linear-dora": Case(llama, dict(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
        use_dora=True, rank_pattern={"down_proj": 2},
    )),
    "bert-linear-embedding-regex": Case(bert, dict(
        r=4, lora_alpha=4, target_modules=r".*(query|value|dense|word_embeddings)", alpha_pattern={"value": 12},
    )),
    "vit-conv2d-dora": Case(vit, dict(r=4, lora_alpha=8, target_modules=["proj", "qkv", "fc1"], use_dora=True)),
    "custom-conv-embedding-linear": Case(custom, dict(
        r=2, lora_alpha=6, target_modules=["emb", "conv", "fc1", "fc2"], rank_pattern={"fc1": 4},
    )),
}


def output(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@torch.no_grad()
def randomize(named_params):
    """B = 0 and an untouched magnitude would hide layout mistakes: randomise every adapter tensor."""
    for name, p in named_params:
        if "magnitude" in name:
            p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
        elif "lora_" in name:
            p.normal_(std=0.2)


def fresh(case):
    torch.manual_seed(0)
    model, inputs = case.build()
    return model.eval(), inputs


@pytest.mark.parametrize("name", list(CASES))
def test_peft_adapter_loads_into_adaptc(name, tmp_path):
    case = CASES[name]
    base, inputs = fresh(case)
    pristine = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**case.options)).eval()
    randomize(peft_model.named_parameters())
    expected = output(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)

    am = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    loaded = {s.name for s in am.sites}
    assert loaded == {k.split("base_model.model.")[1].rsplit(".lora_", 1)[0]
                      for k in peft.get_peft_model_state_dict(peft_model)}
    torch.testing.assert_close(output(am, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_adaptc_adapter_loads_into_peft(name, tmp_path):
    case = CASES[name]
    base, inputs = fresh(case)
    pristine = copy.deepcopy(base)
    am = adaptc.inject(base, "lora", example_inputs=inputs, **case.options)
    randomize(am.adapters.named_parameters())
    expected = output(am, inputs)
    am.save_adapter(tmp_path)

    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert len(peft.get_peft_model_state_dict(peft_model)) == sum(1 for _ in am.adapters.parameters())
    torch.testing.assert_close(output(peft_model, inputs), expected, atol=1e-5, rtol=0)


def test_grouped_conv_adapter_is_peft_compatible(tmp_path):
    """adaptc's per-group LoRA is PEFT's with rank r * groups and a block-diagonal A."""
    base, inputs = fresh(CASES["custom-conv-embedding-linear"])
    pristine = copy.deepcopy(base)
    am = adaptc.inject(base, "lora", example_inputs=inputs, targets=["gconv", "fc1"], r=2, alpha=4, rslora=True)
    randomize(am.adapters.named_parameters())
    am.save_adapter(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert tuple(peft_model.base_model.model.gconv.lora_A["default"].weight.shape) == (4, 8, 3, 3)
    torch.testing.assert_close(output(peft_model, inputs), output(am, inputs), atol=1e-5, rtol=0)


def test_peft_grouped_conv_that_mixes_groups_is_refused(tmp_path):
    base, inputs = fresh(CASES["custom-conv-embedding-linear"])
    pristine = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["gconv"]))
    randomize(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(adaptc.CheckpointError, match=r"gconv\.lora_A\.weight.*mixes channels across groups"):
        adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)


def test_several_adapters_by_name_both_ways(tmp_path):
    base, inputs = fresh(CASES["llama-linear-dora"])
    copies = [copy.deepcopy(base) for _ in range(3)]
    am = adaptc.inject(base, "lora", example_inputs=inputs, target_modules=["q_proj", "v_proj"], r=2)
    am.add_adapter("task_b", target_modules=["o_proj", "up_proj"], r=4, lora_alpha=8, use_dora=True)
    randomize(am.adapters.named_parameters())
    am.save_adapter(tmp_path)  # every adapter: default in tmp_path, task_b in tmp_path/task_b, like PEFT
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "task_b" / "adapter_config.json").is_file()
    outputs = {}
    for name in ("default", "task_b"):
        am.set_adapter(name)
        outputs[name] = output(am, inputs)

    peft_model = peft.PeftModel.from_pretrained(copies[0], tmp_path).eval()
    peft_model.load_adapter(tmp_path / "task_b", adapter_name="task_b")
    for name in ("default", "task_b"):
        peft_model.set_adapter(name)
        torch.testing.assert_close(output(peft_model, inputs), outputs[name], atol=1e-5, rtol=0)

    # adaptc reads them back by name (task_b from its subfolder) into one model ...
    again = adaptc.load_adapter(copies[1], tmp_path, example_inputs=inputs, adapter_name="task_b")
    again.load_adapter(tmp_path, "default")
    assert again.active_adapter == "default"
    torch.testing.assert_close(output(again, inputs), outputs["default"], atol=1e-5, rtol=0)
    again.set_adapter("task_b")
    torch.testing.assert_close(output(again, inputs), outputs["task_b"], atol=1e-5, rtol=0)

    # ... and PEFT's own multi-adapter save reads back by name too.
    peft_dir = tmp_path / "from_peft"
    peft_model.save_pretrained(peft_dir)
    from_peft = adaptc.load_adapter(copies[2], peft_dir, example_inputs=inputs, adapter_name="task_b")
    torch.testing.assert_close(output(from_peft, inputs), outputs["task_b"], atol=1e-5, rtol=0)


def test_adaptc_only_settings_are_kept_and_peft_ignores_them(tmp_path):
    """adaptc writes its selector in an extra field; PEFT's config reader tolerates it."""
    base, inputs = fresh(CASES["gpt2-conv1d-embedding-rslora-patterns"])
    am = adaptc.inject(base, "lora", example_inputs=inputs, targets=r".*\.attn\.c_attn", layers=[1], r=2)
    am.save_adapter(tmp_path)
    with pytest.warns(UserWarning, match="adaptc"):  # PEFT: "Unexpected keyword arguments ['adaptc'] ... ignored"
        config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.target_modules == {"transformer.h.1.attn.c_attn"} and config.r == 2
    again = adaptc.load_adapter(copy.deepcopy(am.base_model), tmp_path, example_inputs=inputs)
    assert again.adapter_config.targets == r".*\.attn\.c_attn" and again.adapter_config.layers == [1]


def test_peft_selection_that_differs_from_adaptcs_loads_site_by_site(tmp_path):
    """PEFT's all-linear adapts a classifier head, adaptc's does not: the checkpoint's keys decide."""
    torch.manual_seed(0)
    base = tiny_bert(num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32).eval()
    inputs = {"input_ids": torch.randint(0, 64, (2, 8))}
    pristine = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules="all-linear")).eval()
    randomize(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    am = adaptc.load_adapter(pristine, tmp_path, example_inputs=inputs)
    assert "classifier" in {s.name for s in am.sites}
    torch.testing.assert_close(output(am, inputs), output(peft_model, inputs), atol=1e-5, rtol=0)
