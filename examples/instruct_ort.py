"""Fine-tune the instruction example, export it for generation, and answer with ONNX Runtime.

The model, prompt template and data are examples/instruct_llama.py's (a 2-layer Llama with a
byte-level vocabulary, trained from random weights). The LoRA adapter is exported *unmerged*: the
folder holds the base decoder (with a key/value cache), ``genai_config.json`` and
``instruct.onnx_adapter``, so one loaded model answers with the adapter or without it per request,
through onnxruntime-genai when it is installed and a plain ONNX Runtime session loop otherwise.

    python examples/instruct_ort.py          # train, export to out/instruct_ort/, answer with ORT
    python examples/instruct_ort.py 40       # fewer training steps
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import instruct_llama as base  # noqa: E402 - the example this one extends

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "instruct"


def _am_answer(am, instruction: str) -> list[int]:
    ids = base.prompt_ids(instruction)
    out = am.generate(ids, max_new_tokens=base.MAX_NEW, do_sample=False, eos_token_id=base.EOS, pad_token_id=base.PAD)
    return out[0, ids.shape[1]:].tolist()


def run(steps: int = 150, out: Path | None = None, engine: str = "auto") -> dict:
    import adaptc
    import adaptc.ort

    out = out or ROOT / "out" / "instruct_ort"
    am = adaptc.inject(base.build_model(), "lora", example_inputs=base.example_inputs(), r=16, alpha=32,
                       targets="all-linear", adapter_name=ADAPTER)
    result = adaptc.train(am, base.train_batches, steps=steps, lr=1e-2)
    am.eval()
    print(f"trained LoRA r=16 for {steps} steps: loss {result.first_loss:.3f} -> {result.last_loss:.3f}")

    report = adaptc.export_onnx(am, out, task="text-generation", merge=False)
    print(report.summary())

    generator = adaptc.ort.OrtGenerator(out, engine)
    right = {"adapter": 0, "base": 0}
    same_as_pytorch = True
    for instruction, answer in base.PAIRS:
        ids = base.prompt_ids(instruction)
        tuned = generator.generate(ids, adapter=ADAPTER, max_new_tokens=base.MAX_NEW)[0, ids.shape[1]:].tolist()
        plain = generator.generate(ids, max_new_tokens=base.MAX_NEW)[0, ids.shape[1]:].tolist()  # no adapter
        right["adapter"] += base.decode(tuned) == answer
        right["base"] += base.decode(plain) == answer
        same_as_pytorch &= tuned == _am_answer(am, instruction)
        print(f"  {instruction!r}\n     ORT + adapter: {base.decode(tuned)!r}\n     ORT, no adapter: {base.decode(plain)[:40]!r}")
    n = len(base.PAIRS)
    print(f"exact answers with ONNX Runtime ({generator.engine}): {right['adapter']}/{n} with the adapter, "
          f"{right['base']}/{n} without; identical to am.generate: {same_as_pytorch}")
    return {"right": right, "same_as_pytorch": same_as_pytorch, "engine": generator.engine, "folder": str(out)}


def main(steps: int = 150) -> int:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    result = run(steps)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0 if result["same_as_pytorch"] and result["right"]["adapter"] > result["right"]["base"] else 1


if __name__ == "__main__":
    raise SystemExit(main(*(int(a) for a in sys.argv[1:])))
