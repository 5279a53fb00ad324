"""Mixed-adapter batches (PEFT's ``adapter_names``): one call, each row with its own LoRA adapter.

References, each independent of the mixed path: every row run alone with its adapter made the
active one (``set_adapter``), ``"__base__"`` rows against the unadapted model's own output (a copy
taken before injection), and PEFT's own ``model(..., adapter_names=[...])`` on a PEFT checkpoint.
"""

import copy

import pytest
import torch
from adaptc.passes.lora import LoraRows
from model_zoo import EmbedConvNet, tiny_gpt2, tiny_llama

import adaptc
from adaptc.mixed_batch import BASE, rows_applied

VOCAB = 64


@torch.no_grad()
def randomize(named_params):
    """Random B (and magnitudes): with B = 0 every adapter would equal the base model, and each other."""
    for name, p in named_params:
        if "magnitude" in name:
            p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
        elif "lora_" in name:
            p.normal_(std=0.2)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def state(am):
    """What a mixed batch must leave as it found it."""
    flags = {(name, key): (layer.active, layer._rows) for name, layers in am.adapters.items()
             for key, layer in layers.items()}
    grads = {n: p.requires_grad for n, p in am.named_parameters()}
    return am.active_adapters, flags, grads


@torch.no_grad()
def check_rows(am, pristine, inputs, names, atol=1e-5):
    """``am(**inputs, adapter_names=names)`` row by row against each row run alone."""
    before = state(am)
    mixed = logits(am(**inputs, adapter_names=names))
    assert state(am) == before
    expected = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == BASE:
            expected.append(logits(pristine(**row)))
        else:
            am.set_adapter(name)
            expected.append(logits(am(**row)))
    am.set_adapter(before[0])
    torch.testing.assert_close(mixed, torch.cat(expected), atol=atol, rtol=0)
    return mixed


def three_adapters(model, inputs, first, second, third):
    """``default`` (rank 2), ``b`` (rank 4) and ``c`` (rank 8, DoRA), each on its own sites."""
    am = adaptc.inject(model, "lora", example_inputs=inputs, r=2, alpha=4, **first)
    am.add_adapter("b", r=4, alpha=4, **second)
    am.add_adapter("c", r=8, alpha=16, use_dora=True, **third)
    randomize(am.adapters.named_parameters())
    am.set_adapter("default")
    return am.eval()


def llama_case():
    model = tiny_llama(seed=0).eval()
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8))}
    # b on the embedding too (an embedding site), c on the MLP only; default all-linear (fused siblings).
    return model, inputs, {}, {"targets": ["q_proj", "v_proj", "embed_tokens"]}, {"targets": ["gate_proj", "down_proj"]}


def gpt2_case():
    model = tiny_gpt2(seed=0, bos_token_id=0, eos_token_id=0).eval()
    inputs = {"input_ids": torch.randint(0, VOCAB, (2, 8))}
    # GPT-2's Conv1D flattens [batch, tokens] into one axis before its addmm: rows are token blocks there.
    return model, inputs, {}, {"targets": ["c_attn", "wte"]}, {"targets": ["c_fc", "c_proj"]}


@pytest.fixture(scope="module")
def llama():
    """(AdaptedModel, the unadapted model): one capture for the tests below, which leave it as they found it."""
    torch.manual_seed(0)
    model, inputs, *configs = llama_case()
    pristine = copy.deepcopy(model)
    return three_adapters(model, inputs, *configs), pristine


@pytest.fixture
def gpt2():
    model, inputs, *configs = gpt2_case()
    pristine = copy.deepcopy(model)
    return three_adapters(model, inputs, *configs), pristine


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_each_row_gets_its_own_adapter(case, request):
    am, pristine = request.getfixturevalue(case)
    ids = torch.randint(0, VOCAB, (10, 12))[::2, 2:10]  # a non-contiguous slice, batch 5 (captured with 2)
    assert not ids.is_contiguous()
    names = ["b", "default", BASE, "c", "b"]
    mixed = check_rows(am, pristine, {"input_ids": ids}, names)
    # The adapters differ from each other and from the base model, so the comparison above means something.
    firsts = {name: mixed[names.index(name)] for name in names}
    for name in ("default", "b", "c"):
        assert not torch.allclose(firsts[name], logits(pristine(input_ids=ids[names.index(name):][:1]))[0], atol=1e-3)
    check_rows(am, pristine, {"input_ids": ids[:3]}, ["c", "c", "c"])  # one adapter on every row
    check_rows(am, pristine, {"input_ids": ids[:2]}, [BASE, BASE])  # no adapter at all


def test_rows_repeated_by_generate_take_their_rows_name(llama):
    """Beams / num_return_sequences repeat each row k times consecutively: k names each."""
    am, _ = llama
    ids = torch.randint(0, VOCAB, (3, 6))
    names = ["c", BASE, "default"]
    with torch.no_grad():
        once = am(input_ids=ids, adapter_names=names).logits
        repeated = am(input_ids=ids.repeat_interleave(3, dim=0), adapter_names=names).logits
        with rows_applied(am, names, batch_size=9):  # the context manager generation uses
            direct = am(input_ids=ids.repeat_interleave(3, dim=0)).logits
    torch.testing.assert_close(repeated, once.repeat_interleave(3, dim=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(direct, repeated, atol=0, rtol=0)


def test_linear_conv_embedding_and_dora_rows():
    torch.manual_seed(0)
    model = EmbedConvNet().eval()
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, 20, (2, 9))
    am = three_adapters(model, {"ids": ids}, {"targets": ["emb", "conv", "fc1"]},
                        {"targets": ["gconv", "fc2", "emb"], "fuse_siblings": False}, {"targets": ["conv", "fc1"]})
    check_rows(am, pristine, {"ids": torch.randint(0, 20, (6, 9))}, ["c", "b", BASE, "default", "b", "c"])


def test_the_context_manager_restores_everything_on_error(llama):
    am, _ = llama
    am.set_adapter(["default", "c"])
    before = state(am)
    with pytest.raises(RuntimeError, match="inside"):
        with rows_applied(am, ["b", BASE], batch_size=2):
            assert {n: am.adapters[n]["model__layers__0__self_attn__q_proj"].active for n in ("default", "b")} == \
                {"default": False, "b": True}
            raise RuntimeError("inside")
    assert state(am) == before
    am.set_adapter("default")


def test_errors_are_clear_and_change_nothing(llama):
    am, _ = llama
    ids = torch.randint(0, VOCAB, (2, 8))
    before = state(am)
    with pytest.raises(adaptc.ConfigError, match=r"unknown adapter 'nope'.*this model has: default, b, c"):
        am(input_ids=ids, adapter_names=["nope", "b"])
    with pytest.raises(adaptc.InputError, match="3 names for a batch of 2 rows"):
        am(input_ids=ids, adapter_names=["b", "c", BASE])
    with pytest.raises(adaptc.InputError, match="3 names for a batch of 4 rows"):
        am(input_ids=torch.cat([ids, ids]), adapter_names=["b", "c", BASE])
    with pytest.raises(adaptc.InputError, match="a non-empty list of adapter names"):
        am(input_ids=ids, adapter_names="b")
    am.train()
    with pytest.raises(adaptc.ConfigError, match="inference only"):
        am(input_ids=ids, adapter_names=["b", "c"])
    am.eval()
    assert state(am) == before


def test_the_first_axis_must_hold_the_rows():
    rows = LoraRows([0, 2], 3)
    assert rows.index(3, torch.device("cpu")).tolist() == [0, 2]
    assert rows.index(6, torch.device("cpu")).tolist() == [0, 1, 4, 5]  # each row a block of 2
    with pytest.raises(adaptc.InputError, match="not a multiple"):
        rows.index(4, torch.device("cpu"))


def test_prompt_method_adapters_are_refused():
    model = tiny_llama(seed=0, num_hidden_layers=1).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    am = adaptc.inject(model, "lora", example_inputs={"input_ids": ids}, r=2).eval()
    am.add_adapter("prompt", "prompt", num_virtual_tokens=2)
    with pytest.raises(adaptc.ConfigError, match="'prompt' is a prompt adapter.*takes lora adapters only"):
        am(input_ids=ids, adapter_names=["prompt", "default"])
    am.set_adapter(["default", "prompt"])  # its virtual tokens would go into every row
    with pytest.raises(adaptc.ConfigError, match=r"'prompt' \(prompt\) is active and edits every row"):
        am(input_ids=ids, adapter_names=["default", BASE])
    assert am.active_adapters == ["default", "prompt"]
    with am.disable_adapters(["prompt"]):  # the way out the error names
        with torch.no_grad():
            am(input_ids=ids, adapter_names=["default", BASE])


@pytest.mark.integration  # by time: PEFT as the reference
def test_against_peft_adapter_names(tmp_path):
    """Two adapters written by PEFT, loaded into adaptc; PEFT's own mixed batch is the reference."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(seed=0, bos_token_id=0, eos_token_id=0, pad_token_id=0).eval()
    pristine = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"]))
    randomize(peft_model.named_parameters())
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)  # default in tmp_path, other in tmp_path/other
    ids = torch.randint(0, VOCAB, (4, 7))
    names = ["other", "default", BASE, "other"]
    with torch.no_grad():
        expected = peft_model(input_ids=ids, adapter_names=names).logits

    am = adaptc.load_adapter(pristine, tmp_path, example_inputs={"input_ids": ids[:2]}).eval()
    am.load_adapter(tmp_path, "other")
    with torch.no_grad():
        got = am(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert am.active_adapters == ["other"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rows_on_the_gpu():
    """The row indices are made on the device of the tensors they index."""
    torch.manual_seed(0)
    model = EmbedConvNet().eval().cuda()
    pristine = copy.deepcopy(model)
    ids = torch.randint(0, 20, (2, 9), device="cuda")
    am = three_adapters(model, {"ids": ids}, {"targets": ["emb", "conv", "fc1"]}, {"targets": ["gconv", "fc2"]},
                        {"targets": ["fc1"]})
    check_rows(am, pristine, {"ids": torch.randint(0, 20, (4, 9), device="cuda")}, ["c", BASE, "b", "default"],
               atol=1e-4)
