"""Saving and loading adapters: round trips, atomic writes, and refusing bad checkpoints untouched."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import adaptc
from adaptc.checkpoint import CONFIG_NAME, WEIGHTS_NAME


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc1 = nn.Linear(6, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1, groups=2)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(self.conv(h.transpose(1, 2)).transpose(1, 2))


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, x):
        return self.proj(x)


X = (torch.randn(2, 5, 6),)


def make(**options):
    torch.manual_seed(0)
    model = Net().eval()
    am = adaptc.inject(model, "lora", example_inputs=X, **{"targets": ["fc1", "conv", "fc2"], "r": 2, **options})
    with torch.no_grad():
        for p in am.adapter_parameters():
            p.normal_(std=0.3)
    return am


def fresh_model():
    torch.manual_seed(0)
    return Net().eval()


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_untouched(am, before, adapters):
    assert list(am.adapters) == adapters
    after = snapshot(am)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_round_trip_keeps_tensors_config_and_outputs(tmp_path):
    am = make(alpha=6, rslora=True, use_dora=True, rank_pattern={"fc2": 1}, exclude=["nothing"])
    with pytest.warns(UserWarning, match=r"PEFT will not reproduce .* \(conv: PEFT's DoRA .* grouped convolution"):
        am.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    again = adaptc.load_adapter(fresh_model(), tmp_path, example_inputs=X)
    assert again.adapter_config == am.adapter_config
    saved, loaded = snapshot(am.adapters), snapshot(again.adapters)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert torch.equal(again(*X), am(*X))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["fc1", "conv", "fc2"]
    assert config["rank_pattern"] == {"^conv$": 4, "fc2": 1}  # grouped conv: PEFT's rank is r * groups
    keys = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME).keys()
    assert "base_model.model.fc1.lora_A.weight" in keys and "base_model.model.conv.lora_magnitude_vector" in keys


def test_load_into_an_existing_model_and_by_name(tmp_path):
    am = make()
    am.add_adapter("second", targets=["fc2"], r=1)
    am.save_adapter(tmp_path, adapter_name="second")
    assert (tmp_path / "second" / WEIGHTS_NAME).is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    am.set_adapter("second")
    expected = am(*X)
    target = make()
    target.load_adapter(tmp_path, "second")
    assert list(target.adapters) == ["default", "second"] and target.active_adapter == "second"
    torch.testing.assert_close(target(*X), expected, atol=1e-6, rtol=0)
    with pytest.raises(adaptc.ConfigError, match="already exists"):
        target.load_adapter(tmp_path, "second")


def test_save_refuses_bad_requests_before_writing(tmp_path):
    am = make()
    with pytest.raises(adaptc.CheckpointError, match="unknown adapter"):
        am.save_adapter(tmp_path / "out", adapter_name=["default", "nope"])
    assert not (tmp_path / "out").exists()
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(adaptc.CheckpointError, match="not a folder"):
        am.save_adapter(a_file)
    assert a_file.read_text() == "keep me"


# --- bad checkpoints: an error naming the problem, and the model as it was ----------------------

def saved(tmp_path, name="ckpt"):
    folder = tmp_path / name
    make().save_adapter(folder)
    return folder


def rewrite_weights(folder, edit):
    """Re-save the tensors PEFT-style (no adaptc metadata), after ``edit`` changed the dict."""
    tensors = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    safetensors.torch.save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def rewrite_config(folder, edit):
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def add_key(tensors):
    tensors["base_model.model.fc1.lora_A.bias"] = torch.zeros(2)


def wrong_shape(tensors):
    tensors["base_model.model.fc1.lora_B.weight"] = torch.zeros(8, 3)


def corrupt_data(folder):
    raw = bytearray((folder / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0xFF  # a byte of tensor data: the header still parses
    (folder / WEIGHTS_NAME).write_bytes(bytes(raw))


BAD = {
    "missing key": (lambda f: rewrite_weights(f, lambda t: t.pop("base_model.model.fc2.lora_B.weight")),
                    r"missing: base_model\.model\.fc2\.lora_B\.weight"),
    "extra key": (lambda f: rewrite_weights(f, add_key), r"base_model\.model\.fc1\.lora_A\.bias are not LoRA parameters"),
    "shape mismatch": (lambda f: rewrite_weights(f, wrong_shape),
                       r"fc1\.lora_B\.weight has shape \[8, 3\], but fc1 \(linear, weight 8x6\) with r=2 needs \[8, 2\]"),
    # POLY: a PEFT method that adaptc does not have
    "unknown peft_type": (lambda f: rewrite_config(f, lambda c: c.update(peft_type="POLY")), "peft_type is 'POLY'"),
    "unsupported option": (lambda f: rewrite_config(f, lambda c: c.update(modules_to_save=["fc2"])), "modules_to_save"),
    "truncated": (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:300]),
                  rf"{WEIGHTS_NAME} is not a complete safetensors file"),
    "corrupted data": (corrupt_data, "do not match the checksum"),
    "bad json": (lambda f: (f / CONFIG_NAME).write_text("{not json"), rf"{CONFIG_NAME} is not valid JSON"),
    "no weights": (lambda f: (f / WEIGHTS_NAME).unlink(), f"no {WEIGHTS_NAME}"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_raises_before_the_model_is_touched(case, tmp_path):
    spoil, message = BAD[case]
    folder = saved(tmp_path)
    spoil(folder)
    target = make()
    before = snapshot(target)
    with pytest.raises(adaptc.CheckpointError, match=message):
        target.load_adapter(folder, "loaded")
    assert_untouched(target, before, ["default"])


def test_checkpoint_for_another_model_names_the_modules(tmp_path):
    torch.manual_seed(0)
    other = adaptc.inject(Other(), "lora", example_inputs=X, targets=["proj"], r=2)
    other.save_adapter(tmp_path)
    target = make()
    before = snapshot(target)
    with pytest.raises(adaptc.CheckpointError, match=r"1 of the 1 adapted modules are not sites of this Net \(proj\)"):
        target.load_adapter(tmp_path, "other")
    assert_untouched(target, before, ["default"])
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(adaptc.CheckpointError, match="another model"):
        adaptc.load_adapter(model, tmp_path, example_inputs=X)
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())


def test_legacy_pickle_is_never_unpickled(tmp_path):
    folder = saved(tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this would create ``marker``
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(adaptc.CheckpointError, match=r"adapter_model\.bin is a pickle.*never unpickles"):
        adaptc.load_adapter(fresh_model(), folder, example_inputs=X)
    assert not marker.exists()


def test_config_left_over_from_an_earlier_save_is_detected(tmp_path):
    """A save killed between its two renames: new weights, old config. The weights carry their own config."""
    old, new = tmp_path / "old", tmp_path / "new"
    make(r=2).save_adapter(old)
    newer = make(r=3, alpha=5)
    newer.save_adapter(new)
    os.replace(new / WEIGHTS_NAME, old / WEIGHTS_NAME)  # as if the save stopped right here
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = adaptc.load_adapter(fresh_model(), old, example_inputs=X)
    assert loaded.adapter_config.r == 3 and torch.equal(loaded(*X), newer(*X))


def test_a_hand_edited_config_is_used_as_edited(tmp_path):
    folder = saved(tmp_path)
    rewrite_config(folder, lambda c: c.update(lora_alpha=4.0, adaptc={**c["adaptc"], "config": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = adaptc.load_adapter(fresh_model(), folder, example_inputs=X)
    layers = loaded.adapters["default"]
    assert layers["fc1"].alpha == layers["fc2"].alpha == 4.0


# --- an interrupted save leaves a whole checkpoint -------------------------------------------

SAVER = textwrap.dedent("""
    import sys, torch, adaptc
    sys.path.insert(0, {tests!r})
    from test_checkpoint import Net, X
    versions = []
    for value, r in ((1.0, 256), (2.0, 128)):  # two versions differing in values and in rank (so in the config)
        torch.manual_seed(0)
        am = adaptc.inject(Net(width=2048).eval(), "lora", example_inputs=X, targets=["conv"], r=r)
        for p in am.adapter_parameters():
            torch.nn.init.constant_(p, value)
        versions.append(am)
    n = 0
    while True:
        print("saving", flush=True)
        versions[n % 2].save_adapter({folder!r})  # about 14 MB: a kill lands inside a save
        n += 1
""")


def folder_state(folder):
    return {entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns) for entry in os.scandir(folder)}


@pytest.mark.integration
def test_killed_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    script = SAVER.format(tests=str(Path(__file__).parent), folder=str(folder))
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(3):  # two whole saves done, the third under way
                assert proc.stdout.readline() == "saving\n", "the saving process died"
            before, deadline = folder_state(folder), time.monotonic() + 30
            while folder_state(folder) == before:  # kill as soon as the save starts writing
                assert time.monotonic() < deadline, "the save never wrote anything"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        torch.manual_seed(0)
        loaded = adaptc.load_adapter(Net(width=2048).eval(), folder, example_inputs=X)
        values = {p.unique().item() for p in loaded.adapter_parameters()}
        assert (values, loaded.adapter_config.r) in (({1.0}, 256), ({2.0}, 128))
        if any(name.endswith(".tmp") for name in os.listdir(folder)):
            return  # the kill interrupted a write (its temporary file is left behind), and the checkpoint is whole
    pytest.fail("no kill landed inside a write; the test proved nothing")


def test_pissa_adapter_loads_without_changing_the_base_again(tmp_path):
    am = make(targets=["fc1"], init="pissa")  # PiSSA moved fc1's top directions into the adapter
    am.save_adapter(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["init_lora_weights"] is True  # PEFT must not re-run it
    model = fresh_model()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'.*changed base model"):
        loaded = adaptc.load_adapter(model, tmp_path, example_inputs=X)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(loaded.adapters["default"]["fc1"].lora_A, am.adapters["default"]["fc1"].lora_A)
