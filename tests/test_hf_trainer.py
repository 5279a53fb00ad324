"""The Hugging Face Trainer trains an AdaptedModel of a tiny GPT-2: its loss, gradient accumulation,
checkpoints in PEFT's format (PEFT loads them), and resuming from one.

One AdaptedModel serves every run (its adapter reset in between), so the model is captured
once: the example inputs have the structure of the Trainer's calls, ``num_items_in_batch``
included (the Trainer passes it because the base model's forward takes ``**kwargs``).
"""

import os

import model_zoo
import pytest
import torch
from transformers import TrainingArguments

import adaptc
from adaptc.hf import AdapterTrainer

peft = pytest.importorskip("peft")

# PEFT warns that it ignores the "adaptc" field of adapter_config.json (see docs/checkpoints.md).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning"),
    pytest.mark.integration,  # by time (make test-unit under 2 minutes): the Hugging Face Trainer end to end
]

SEQ = 16
STEPS = 12


def tiny_gpt2():
    return model_zoo.tiny_gpt2(n_positions=32, n_head=2, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, seed=0)


def dataset():
    # Each row counts up from a different start: the next token is always the previous one + 1.
    rows = []
    for i in range(16):
        ids = (torch.arange(SEQ) + 3 * i) % 64
        # "note" is not a forward argument: the Trainer must drop it (by forward's signature) before collating.
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids,
                     "note": f"row {i}"})
    return rows


@pytest.fixture(scope="module")
def am():
    torch.manual_seed(1)
    model = adaptc.inject(tiny_gpt2(), "lora", example_inputs=example_inputs(), targets="all-linear", r=4, alpha=8,
                          init="gaussian")
    with torch.no_grad():  # a non-zero B, so that A's gradients are not zero on the first step
        for name, p in model.adapters.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    model.train()
    return model


def reset(am, values):
    with torch.no_grad():
        for p, v in zip(am.adapters.parameters(), values):
            p.copy_(v)


def snapshot(am):
    return [p.detach().clone() for p in am.adapters.parameters()]


def run(am, out, batch, accumulate, steps, resume=None, **options):
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
        max_steps=steps, learning_rate=3.0, optim="sgd", lr_scheduler_type="linear", logging_steps=1,
        save_strategy="steps", save_steps=STEPS // 2, report_to=[], use_cpu=True, disable_tqdm=True, **options,
    )
    trainer = AdapterTrainer(model=am, args=args, train_dataset=dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def runs(am, tmp_path_factory):
    start = snapshot(am)
    full = run(am, tmp_path_factory.mktemp("full"), batch=4, accumulate=1, steps=STEPS)
    after_full = snapshot(am)
    reset(am, start)
    out = tmp_path_factory.mktemp("accumulated")
    accumulated = run(am, out, batch=2, accumulate=2, steps=STEPS)
    after_accumulated = snapshot(am)
    return dict(start=start, full=full, after_full=after_full, accumulated=accumulated,
                after_accumulated=after_accumulated, out=out)


def test_trainer_reads_inputs_and_labels_from_the_base_signature(runs):
    trainer = runs["full"]
    assert trainer.label_names == ["labels"]
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert "note" not in trainer._signature_columns


def dataset_loss(am, values):
    reset(am, values)
    rows = dataset()
    ids = torch.stack([row["input_ids"] for row in rows])
    with torch.no_grad():
        return am(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                  num_items_in_batch=torch.tensor(float(ids.numel() - len(rows)))).loss.item()


def test_loss_falls(am, runs):
    logged = [h["loss"] for h in runs["accumulated"].state.log_history if "loss" in h]
    assert len(logged) == STEPS  # the Trainer's own loss, once per optimizer step
    before = dataset_loss(am, runs["start"])
    after = dataset_loss(am, runs["after_accumulated"])
    assert after < before - 0.02, (before, after)


def test_gradient_accumulation_matches_the_full_batch(runs):
    # 2 x 2 accumulated micro-batches take the same steps as batches of 4 (the same rows, same order).
    moved = max((a - s).abs().max().item() for a, s in zip(runs["after_full"], runs["start"]))
    assert moved > 1e-3
    worst = max((a - b).abs().max().item() for a, b in zip(runs["after_full"], runs["after_accumulated"]))
    assert worst < 1e-5


def test_checkpoints_are_peft_adapters(am, runs):
    folder = runs["out"] / f"checkpoint-{STEPS}"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= names
    assert "model.safetensors" not in names  # no copy of the frozen base weights
    reset(am, runs["after_accumulated"])
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(), str(folder))
    peft_model.train()  # dropout is 0; the train-mode graph already captured serves
    batch = torch.stack([row["input_ids"] for row in dataset()[:2]])
    mask = torch.ones_like(batch)
    with torch.no_grad():
        got = am(input_ids=batch, attention_mask=mask, labels=batch, num_items_in_batch=torch.tensor(30.0)).logits
        want = peft_model(input_ids=batch, attention_mask=mask).logits
        base = tiny_gpt2()(input_ids=batch, attention_mask=mask).logits
    assert (want - base).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-5


def test_resume_from_checkpoint_continues_the_same_run(am, runs):
    # A different adapter in memory: resuming must load the middle checkpoint's weights, optimizer and schedule.
    reset(am, [torch.zeros_like(v) for v in runs["start"]])
    run(am, runs["out"], batch=2, accumulate=2, steps=STEPS, resume=str(runs["out"] / f"checkpoint-{STEPS // 2}"))
    worst = max((a - b).abs().max().item() for a, b in zip(snapshot(am), runs["after_accumulated"]))
    assert worst < 1e-5


def test_save_pretrained_is_save_adapter(am, tmp_path):
    am.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert am.save_pretrained(tmp_path / "b", is_main_process=False) == []
    assert not (tmp_path / "b").exists()


def test_gradient_checkpointing_trains_the_same_steps(am, runs, tmp_path):
    # TrainingArguments(gradient_checkpointing=True): the Trainer calls am.activation_checkpointing_enable;
    # the adapted graphs recompute each GPT-2 block in the backward, and the steps are the plain ones.
    reset(am, runs["start"])
    try:
        trainer = run(am, tmp_path, batch=4, accumulate=1, steps=STEPS, gradient_checkpointing=True)
        assert am.is_gradient_checkpointing and trainer.model.is_activation_checkpointing
        calls = [n for n in am.graph_module.graph.nodes if n.op == "call_module" and "checkpoint_blocks" in n.target]
        assert len(calls) == 2  # transformer.h.0 and transformer.h.1
    finally:
        am.gradient_checkpointing_disable()
    worst = max((a - b).abs().max().item() for a, b in zip(snapshot(am), runs["after_full"]))
    assert worst < 1e-5


@pytest.mark.integration
@pytest.mark.slow
def test_trainer_under_torchrun_ddp(tmp_path):
    # The Trainer (through accelerate) wraps the model in DDP itself; rank 0 alone writes checkpoints.
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["wrapped"] for r in reports] == ["DistributedDataParallel"] * 2
    assert [r["sync"] for r in reports] == [0.0, 0.0]
    assert reports[0]["losses"] == reports[1]["losses"]  # the Trainer logs the loss averaged over ranks
    names = {p.name for p in (tmp_path / "checkpoint-4").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= names
    loaded = adaptc.load_adapter(tiny_gpt2(), tmp_path / "checkpoint-4", example_inputs=example_inputs())
    trained = safetensors_tensors(tmp_path / "rank0_adapter.safetensors")
    assert all(torch.equal(p.detach(), trained[n]) for n, p in loaded.adapters.named_parameters())


def example_inputs():
    ids = torch.zeros(2, SEQ, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
            "num_items_in_batch": torch.tensor(30.0)}


def safetensors_tensors(path):
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def _torchrun_worker(out):
    import json

    import safetensors.torch
    from transformers import TrainingArguments

    from adaptc import distributed

    torch.manual_seed(1)
    am = adaptc.inject(tiny_gpt2(), "lora", example_inputs=example_inputs(), targets="all-linear", r=4, alpha=8)
    am.train()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=4, learning_rate=0.05,
                             logging_steps=1, save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
                             ddp_backend="gloo")
    trainer = AdapterTrainer(model=am, args=args, train_dataset=dataset())
    trainer.train()
    rank = int(os.environ["RANK"])
    report = {"wrapped": type(trainer.model_wrapped).__name__, "sync": distributed.adapters_in_sync(am),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    if rank == 0:
        tensors = {n: p.detach().contiguous() for n, p in am.adapters.named_parameters()}
        safetensors.torch.save_file(tensors, os.path.join(out, "rank0_adapter.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":  # run by test_trainer_under_torchrun_ddp, under torchrun
    import sys

    _torchrun_worker(sys.argv[1])
