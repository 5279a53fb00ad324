"""Behaviours at the seams between features: merging inside disable_adapters(), loading a named
adapter from a folder, the unmerged export's refusal for other methods, inspect's columns per method,
the top-level config classes."""

from __future__ import annotations

import copy
from pathlib import Path

import model_zoo
import numpy as np
import onnxruntime as ort
import pytest
import torch
from adaptc.targets.merge import merged_copy, merged_weights
from torch import nn

import adaptc
from adaptc.cli import main
from adaptc.errors import MergeError


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def adapted_mlp(names: tuple[str, ...] = ("default",)) -> tuple[nn.Module, adaptc.AdaptedModel]:
    """An unadapted copy and an AdaptedModel with LoRA adapters ``names`` whose updates are far from zero."""
    model = mlp()
    original = copy.deepcopy(model)
    am = adaptc.inject(model, "lora", example_inputs=(x(),), targets="all-linear", r=2, alpha=4)
    for name in names[1:]:
        am.add_adapter(name, "lora", targets="all-linear", r=2, alpha=4)
    with torch.no_grad():
        for p in am.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return original, am


# --- merging honours disable_adapters() ----------------------------------------------------------


def test_merged_weights_inside_disable_adapters_is_the_unadapted_model():
    original, am = adapted_mlp()
    with torch.no_grad():
        base = original(x())
        assert (am(x()) - base).abs().max() > 1e-2  # the adapter changes the outputs
        with am.disable_adapters(), merged_weights(am):
            np.testing.assert_allclose(am.base_model(x()), base, atol=1e-6)
            np.testing.assert_allclose(am(x()), base, atol=1e-6)
        with am.disable_adapters():
            np.testing.assert_allclose(merged_copy(am)(x()), base, atol=1e-6)


def test_merged_copy_inside_a_partial_disable_merges_only_the_enabled_adapter():
    _, am = adapted_mlp(("default", "b"))
    am.set_adapter("b")
    with torch.no_grad():
        expected = am(x())  # b alone
    am.set_adapter(["default", "b"])
    with torch.no_grad():
        with am.disable_adapters(["default"]):
            assert am.enabled_adapters == ["b"]
            np.testing.assert_allclose(merged_copy(am)(x()), expected, atol=1e-5)
        assert (merged_copy(am)(x()) - expected).abs().max() > 1e-2  # both merged outside the block
    assert am.enabled_adapters == ["default", "b"]


def test_merge_in_place_inside_disable_adapters_refuses_and_changes_nothing():
    _, am = adapted_mlp()
    before = {n: p.clone() for n, p in am.named_parameters()}
    with (
        am.disable_adapters(),
        pytest.raises(MergeError, match=r"inside am.disable_adapters\(\).*nothing was merged"),
    ):
        am.merge()
    assert list(am.adapters) == ["default"]
    assert all(torch.equal(p, before[n]) for n, p in am.named_parameters())


@pytest.mark.integration
def test_merged_export_inside_disable_adapters_is_the_unadapted_model(tmp_path):
    original, am = adapted_mlp()
    with am.disable_adapters():
        report = adaptc.export_onnx(am, tmp_path / "base.onnx", latency_runs=1)
    assert report.merged
    session = ort.InferenceSession(str(tmp_path / "base.onnx"), providers=["CPUExecutionProvider"])
    feed = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {session.get_inputs()[0].name: feed.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, original(feed).numpy(), atol=1e-5)
        assert np.abs(got - am(feed).numpy()).max() > 1e-2  # outside the block the adapter applies


# --- load_adapter(directory, adapter_name) ------------------------------------------------------


def test_load_adapter_by_name_reads_its_subfolder_and_refuses_a_name_the_folder_lacks(tmp_path):
    _, am = adapted_mlp(("default", "b"))
    am.save_adapter(tmp_path)  # default in tmp_path, b in tmp_path/b (PEFT's save_pretrained layout)
    with torch.no_grad():
        am.set_adapter("b")
        want_b = am(x())
        am.set_adapter("default")
        want_default = am(x())
    _, fresh = adapted_mlp()
    fresh.load_adapter(tmp_path, adapter_name="b")
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x()), want_b, atol=1e-6)
    with pytest.raises(
        adaptc.CheckpointError,
        match=r"no adapter 'c'.*holds 'default' \(its own adapter_config.json\) "
        r"and, in subfolders, 'b'",
    ):
        fresh.load_adapter(tmp_path, adapter_name="c")
    assert list(fresh.adapters) == ["default", "b"]  # nothing was added
    with pytest.raises(adaptc.CheckpointError, match="no adapter 'c'"):
        adaptc.load_adapter(mlp(), tmp_path, example_inputs=(x(),), adapter_name="c")
    loaded = adaptc.load_adapter(mlp(), tmp_path, example_inputs=(x(),))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x()), want_default, atol=1e-6)


def test_load_adapter_from_a_one_adapter_folder_names_it_as_peft_does(tmp_path):
    """PEFT's load_adapter(model_id, adapter_name): the folder's own adapter, under the new name."""
    _, am = adapted_mlp()
    am.save_adapter(tmp_path)
    with torch.no_grad():
        want = am(x())
    _, other = adapted_mlp()
    other.load_adapter(tmp_path, adapter_name="mine")
    assert other.active_adapters == ["mine"]
    with torch.no_grad():
        np.testing.assert_allclose(other(x()), want, atol=1e-6)


# --- export_onnx(merge=False) with a method ORT adapter files cannot hold -------------------------


@pytest.mark.parametrize(
    ("method", "merged_form"),
    [
        ("bottleneck", "keeps it in the graph with its trained values"),
        ("ia3", "folds it into the base weights"),
    ],
)
def test_unmerged_export_of_another_method_says_which_methods_it_takes(method, merged_form, tmp_path):
    model = model_zoo.tiny_gpt2().eval()
    inputs = {"input_ids": torch.randint(0, model_zoo.VOCAB, (2, 6)), "use_cache": False}
    am = adaptc.inject(model, method, example_inputs=inputs)
    with pytest.raises(adaptc.ExportError) as caught:
        adaptc.export_onnx(am, tmp_path / "m.onnx", merge=False)
    message = str(caught.value)
    assert f"is a '{method}' adapter" in message
    assert "keeps only lora adapters as ORT adapter inputs" in message
    assert f"merge=True (the default), which {merged_form}" in message
    assert "virtual tokens" not in message  # that reason is the prompt methods'
    assert list(tmp_path.iterdir()) == []


# --- adaptc inspect: the parameter column is the method's, and --opt reaches every view ----------

TINY = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_gpt2.py")


def table_rows(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The table's header words and its rows (site -> cells), from the first dashed rule on."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line and set(line.replace(" ", "")) == {"-"})
    rows = {}
    for line in lines[rule + 1 :]:
        if not line or line.startswith(("total:", "note:", "targets", "PEFT's")):
            break
        rows[line.split()[0]] = line.split()
    return lines[rule - 1].split(), rows


def test_inspect_lora_column_counts_what_inject_adds_with_the_options_given(capsys):
    options = ["--opt", "use_dora=True", "--opt", "rank_pattern={'c_fc': 2}"]
    assert main(["inspect", TINY, "--r", "4", *options]) == 0
    header, rows = table_rows(capsys.readouterr().out)
    assert header[-2:] == ["lora", "r=4"]
    example_file = model_zoo.load_example("tiny_gpt2", "tiny_gpt2_inspect")
    model, example = example_file.build_model(), example_file.example_inputs()
    am = adaptc.inject(model, "lora", example_inputs=example, r=4, use_dora=True, rank_pattern={"c_fc": 2})
    assert am.sites and {s.name for s in am.sites} <= set(rows)
    for site in am.sites:  # the parameters the adapter really holds there
        assert rows[site.name][-1] == f"{site.params_added:,}", site.name


@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_inspect_column_of_another_method_counts_what_that_method_adds(method, capsys):
    assert main(["inspect", TINY, "--method", method, "--r", "4"]) == 0
    out = capsys.readouterr().out
    header, rows = table_rows(out)
    assert header[-2:] == [method, "r=4"] and "lora" not in out.lower()
    example_file = model_zoo.load_example("tiny_gpt2", f"tiny_gpt2_{method}")
    am = adaptc.inject(example_file.build_model(), method, example_inputs=example_file.example_inputs(), r=4)
    assert am.sites
    for site in am.sites:  # the parameters the adapter really holds there (LoRA's count would differ)
        assert rows[site.name][-1] == f"{site.params_added:,}", site.name
    assert len(rows["transformer.wte"]) == 5  # an embedding: the method takes none, so no count


def test_inspect_of_a_method_that_does_not_count_has_no_parameter_column(capsys):
    assert main(["inspect", TINY, "--method", "oft"]) == 0
    out = capsys.readouterr().out
    header, rows = table_rows(out)
    assert header == ["site", "kind", "op", "weight", "in->out", "layer", "head"]
    assert len(rows["transformer.h.0.attn.c_attn"]) == 6  # no count: layer 0, no head label
    assert "lora" not in out.lower()
    assert "oft does not state its parameters per site" in out


def test_inspect_options_reach_a_method_with_its_own_view(capsys):
    assert (
        main(
            [
                "inspect",
                TINY,
                "--method",
                "ia3",
                "--opt",
                "targets=['c_attn']",
                "--opt",
                "feedforward_modules=[]",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    _, rows = table_rows(out)
    assert set(rows) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert "targets ['c_attn']" in out and "PEFT's default" not in out
    # a bad option is refused, not ignored
    assert main(["inspect", TINY, "--method", "ia3", "--opt", "no_such_option=1"]) == 2
    assert "unknown ia3 option 'no_such_option'" in capsys.readouterr().err


# --- the top-level API ----------------------------------------------------------------------------


def test_every_built_in_method_config_is_importable_from_adaptc():
    from adaptc.methods import available_methods, get_method

    builtin = [
        "lora",
        "prompt",
        "ptuning",
        "prefix",
        "ia3",
        "ln_tuning",
        "bottleneck",
        "adalora",
        "oft",
        "loha",
        "lokr",
        "vera",
    ]
    assert set(builtin) <= set(available_methods())
    for name in builtin:
        config_class = get_method(name).config_class
        assert getattr(adaptc, config_class.__name__) is config_class, name
        assert config_class.__name__ in adaptc.__all__, name
    am = adaptc.inject(mlp(), adaptc.VeraConfig(r=4), example_inputs=(x(),))
    assert isinstance(am.adapter_config, adaptc.VeraConfig) and am.adapter_config.r == 4


# --- adaptc.export_onnx: the entry point that picks one forward pass or a decoder ------------------


def test_export_entry_point_refuses_options_the_decoder_export_would_ignore(tmp_path):
    _, am = adapted_mlp()
    with pytest.raises(adaptc.ExportError, match=r"latency_runs: not options of task='text-generation'"):
        adaptc.export_onnx(am, tmp_path / "out", task="text-generation", latency_runs=3)
    with pytest.raises(adaptc.ExportError, match="task must be None"):
        adaptc.export_onnx(am, tmp_path / "out", task="generation")
    assert list(tmp_path.iterdir()) == []
