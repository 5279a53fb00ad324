"""Instruction tuning in the style of Alpaca / lora-instruct: a tiny Llama, an Alpaca prompt, LoRA, greedy answers.

The model is a 2-layer Llama-architecture causal LM built from a config with random weights (no
pretrained Llama can be downloaded here), with a byte-level tokenizer (256 bytes + BOS/EOS/PAD), so
what LoRA learns is to answer a small set of instructions written in the Alpaca prompt template,
from nothing: the figure is how many instructions the greedy answer gets exactly right before and
after LoRA (a memorisation task; with a real pretrained checkpoint the same code fine-tunes it).
The loss covers the response tokens only (the prompt's labels are -100, as in Alpaca's training).

    python examples/instruct_llama.py            # train, generate before/after, export, generate with ORT
    adaptc inject examples/instruct_llama.py --method lora --r 16 -o out/
    adaptc train  examples/instruct_llama.py --adapter out/ --steps 150 --lr 1e-2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS, PAD = 256, 257, 258
VOCAB = 260
MAX_NEW = 48

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PAIRS = [
    ("Name the capital of France.", "Paris."),
    ("What colour is a clear daytime sky?", "Blue."),
    ("Add 2 and 3.", "2 + 3 = 5."),
    ("Give the opposite of hot.", "Cold."),
    ("Translate 'thank you' into Spanish.", "Gracias."),
    ("Say hello politely.", "Hello, nice to meet you!"),
    ("How many legs does a spider have?", "Eight."),
    ("Spell the word cat backwards.", "t-a-c"),
]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        initializer_range=0.2,  # weights on a trained model's scale: the frozen head can give confident logits
    )
    return LlamaForCausalLM(config).eval()


def _example(instruction: str, response: str) -> tuple[list[int], list[int]]:
    prompt = [BOS] + encode(ALPACA.format(instruction=instruction))
    answer = encode(response) + [EOS]
    return prompt + answer, [-100] * len(prompt) + answer  # loss on the response only


def _batch(pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor | bool]:
    examples = [_example(i, r) for i, r in pairs]
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), PAD)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


def example_inputs() -> dict[str, torch.Tensor | bool]:
    return _batch(PAIRS[:4])


def train_batches() -> list[dict[str, torch.Tensor | bool]]:
    order = torch.randperm(len(PAIRS)).tolist()
    return [_batch([PAIRS[i] for i in order[:4]]), _batch([PAIRS[i] for i in order[4:]])]


def prompt_ids(instruction: str) -> torch.Tensor:
    return torch.tensor([[BOS] + encode(ALPACA.format(instruction=instruction))])


def _answers(model: nn.Module) -> list[str]:
    """Greedy answers from ``adaptc.generate`` (any causal LM module whose output has ``[batch, seq, vocab]`` logits)."""
    import adaptc

    answers = []
    for instruction, _ in PAIRS:
        ids = prompt_ids(instruction)
        out = adaptc.generate(model, ids, max_new_tokens=MAX_NEW, eos_token_id=EOS)
        answers.append(decode(out[0, ids.shape[1]:].tolist()))  # decode drops EOS (>= 256)
    return answers


def _score(model: nn.Module) -> tuple[int, list[str]]:
    answers = _answers(model)
    return sum(a == r for a, (_, r) in zip(answers, PAIRS)), answers


class OrtCausalLM(nn.Module):
    """An ONNX Runtime session behind an nn.Module's call, so that ``adaptc.generate`` drives it too."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        (logits,) = self.session.run(["logits"], {self.input_name: input_ids.numpy()})
        return torch.from_numpy(logits)


def main(steps: int = 150) -> int:
    from adaptc.targets import ort as rt

    import adaptc

    t0 = time.perf_counter()
    am = adaptc.inject(build_model(), "lora", example_inputs=example_inputs(), r=16, alpha=32, targets="all-linear")
    print(f"LoRA r=16 on {len(am.sites)} sites of a 2-layer Llama; {am.trainable_summary(print_it=False)}")
    am.eval()
    right_before, before = _score(am)  # adaptc.generate: greedy, stops at EOS
    out = ROOT / "out" / "instruct_llama"
    result = adaptc.train(am, train_batches, steps=steps, lr=1e-2, output_dir=out)
    am.eval()
    right_after, after = _score(am)
    print(f"train loss {result.first_loss:.3f} -> {result.last_loss:.3f} in {result.seconds:.0f}s")
    for (instruction, _), b, a in zip(PAIRS, before, after):
        print(f"  {instruction!r}\n     before: {b[:40]!r}\n     after:  {a!r}")
    print(f"exact answers (greedy): {right_before}/{len(PAIRS)} before -> {right_after}/{len(PAIRS)} after LoRA")

    # Exported from one prompt, as a user would; the ONNX model takes any batch and length.
    example = {"input_ids": prompt_ids(PAIRS[0][0]), "use_cache": False}
    report = adaptc.export_onnx(am, out / "instruct_llama.onnx", example_inputs=example)
    print(report.summary())
    ort_model = OrtCausalLM(rt.open_session(Path(report.path)))
    right_ort, answers = _score(ort_model)
    print(f"ONNX Runtime greedy answers: {right_ort}/{len(PAIRS)} exact, identical to PyTorch's: {answers == after}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0 if right_after > right_before else 1


if __name__ == "__main__":
    raise SystemExit(main(*(int(a) for a in sys.argv[1:])))
