"""``adaptc generate``: text from a causal language model, with a saved adapter or without one.

The model file defines, besides ``build_model()`` and ``example_inputs()``, ``tokenizer()``: a
transformers tokenizer for the model's vocabulary. The new tokens are printed to stdout as they
come (the prompt is not repeated); generation is transformers' ``generate``, through the adapted
graphs (``am.generate``) when an adapter is loaded.
"""

from __future__ import annotations

import argparse
import math
import types
from pathlib import Path
from typing import Any

import torch

from .api import load_adapter
from .checkpoint_files import CONFIG_NAME, DEFAULT_ADAPTER
from .cli_common import CliError, build_module_from_file, failed_in_user_code, load_model_file

GENERATE_EPILOG = """\
examples:
  adaptc generate examples/tiny_gpt2.py --prompt "the cat"                     # the base model, greedy
  adaptc generate examples/tiny_gpt2.py --adapter out/best --prompt "the cat" --max-new-tokens 20
  adaptc generate examples/tiny_gpt2.py --adapter out/ --adapter-name task_a --prompt "the cat"
  adaptc generate examples/tiny_gpt2.py --adapter out/ --prompt "the cat" --temperature 0.8 --top-p 0.9 --seed 1

model.py defines tokenizer() (returns a transformers tokenizer, e.g. AutoTokenizer.from_pretrained(...))
besides build_model() and example_inputs(). Greedy unless --temperature is above 0; sampling draws from
the whole distribution (no top-k cut), narrowed by --top-p when given.
"""

EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT, as in `adaptc train`

_TOKENIZER_HINT = (
    "add `def tokenizer(): return AutoTokenizer.from_pretrained(...)` (any transformers tokenizer "
    "for the model's vocabulary) to it"
)


def add_generate_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate", parents=[common], help="generate text from a prompt, with a saved adapter or the base model",
        description="Generate text with transformers' generate through the adapter saved in --adapter (without "
                    "--adapter: the base model), printing the new tokens as they come.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--adapter", metavar="DIR", help="an adapter folder (written by `adaptc inject -o`, `adaptc train` "
                   "or save_adapter); without it the base model generates")
    p.add_argument("--adapter-name", metavar="NAME", help="which adapter in DIR when it holds several (the subfolder "
                   "save_adapter wrote it to; default: the one in DIR itself)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (default: greedy; 0 is greedy too)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep the smallest set of tokens whose "
                   "probability reaches P, 0 < P <= 1 (needs --temperature)")
    p.add_argument("--seed", type=int, help="seed for sampling, for the same text every run (default: a new one each run)")
    p.set_defaults(func=cmd_generate)


def _check_numbers(args: argparse.Namespace) -> bool:
    """Whether to sample; every bad number fails here, before the model file is read."""
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    temperature = args.temperature
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise CliError(f"--temperature must be a number >= 0 (0: greedy), got {temperature:g}")
    sample = bool(temperature)
    if args.top_p is not None:
        if not 0 < args.top_p <= 1:
            raise CliError(f"--top-p must be in (0, 1], got {args.top_p:g}")
        if not sample:
            raise CliError("--top-p applies to sampling, and this run is greedy: give --temperature T (> 0) too")
    if not args.prompt:
        raise CliError("--prompt is empty; give the text to continue")
    return sample


def _adapter_folder(args: argparse.Namespace) -> Path | None:
    """The folder of the adapter to load from --adapter (None: no adapter), checked before anything is built."""
    if args.adapter is None:
        if args.adapter_name is not None:
            raise CliError("--adapter-name picks an adapter in --adapter DIR; give --adapter too")
        return None
    root = Path(args.adapter)
    if not root.is_dir():
        hint = f"create one with `adaptc inject {args.model_file} --method lora -o {args.adapter}`"
        what = "is not a folder" if root.exists() else "not found"
        raise CliError(f"adapter folder {args.adapter!r} {what}; {hint}")
    in_root = (root / CONFIG_NAME).is_file()
    inside = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    held = ([f"{DEFAULT_ADAPTER} (in the folder itself)"] if in_root else []) + inside
    name = args.adapter_name
    if name is None:
        if in_root:
            return root
        if len(inside) == 1:
            return root / inside[0]
        if inside:
            raise CliError(f"{args.adapter!r} holds several adapters ({', '.join(inside)}); pick one with --adapter-name NAME")
        raise CliError(f"{args.adapter!r} holds no {CONFIG_NAME}; pass a folder written by `adaptc inject -o DIR`")
    if name == DEFAULT_ADAPTER and in_root:
        return root
    if name in inside:
        return root / name
    holds = f"it holds: {', '.join(held)}" if held else f"it holds no {CONFIG_NAME}"
    raise CliError(f"{args.adapter!r} has no adapter named {name!r} (no {name}/{CONFIG_NAME}); {holds}")


def _encode(module: types.ModuleType, args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model file's tokenizer and the prompt's ids, made before the model is built."""
    path_arg = args.model_file
    fn = getattr(module, "tokenizer", None)
    if fn is None:
        raise CliError(f"{path_arg} defines no tokenizer(); `adaptc generate` needs it: {_TOKENIZER_HINT}")
    if not callable(fn):
        raise CliError(f"tokenizer in {path_arg} is a {type(fn).__name__}, not a function; {_TOKENIZER_HINT}")
    path = Path(module.__file__).resolve()
    try:
        tokenizer = fn()
    except Exception as exc:
        raise failed_in_user_code(f"tokenizer() in {path_arg}", path, exc) from exc
    if not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
        raise CliError(
            f"tokenizer() in {path_arg} returned {type(tokenizer).__name__}; it must return a transformers "
            "tokenizer (callable on text, with decode())"
        )
    try:
        encoded = tokenizer(args.prompt, return_tensors="pt")
    except Exception as exc:
        raise failed_in_user_code(f"the tokenizer from tokenizer() in {path_arg}", path, exc) from exc
    ids = encoded.get("input_ids") if hasattr(encoded, "get") else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise CliError(f"the tokenizer from tokenizer() in {path_arg} gave no input_ids tensor for the prompt")
    if ids.shape[1] == 0:
        raise CliError(f"--prompt {args.prompt!r} is no tokens to the tokenizer of {path_arg}; give some text")
    inputs = {"input_ids": ids}
    mask = encoded.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        inputs["attention_mask"] = mask
    return tokenizer, inputs


def cmd_generate(args: argparse.Namespace) -> int:
    sample = _check_numbers(args)  # bad numbers fail before the model is built
    try:
        from transformers import TextStreamer
    except ImportError:
        raise CliError("`adaptc generate` needs transformers: pip install 'adaptc[models]'") from None
    if not Path(args.model_file).expanduser().exists():
        load_model_file(args.model_file)  # raises its "not found" error before the adapter is looked at
    adapter = _adapter_folder(args)
    made: dict[str, Any] = {}

    def before_build(module: types.ModuleType) -> None:
        made["tokenizer"], made["inputs"] = _encode(module, args)

    _, model, example = build_module_from_file(args.model_file, before_build)
    tokenizer, inputs = made["tokenizer"], made["inputs"]
    if not callable(getattr(model, "generate", None)):
        raise CliError(
            f"build_model() in {args.model_file} returned a {type(model).__name__}, which has no generate(); "
            "`adaptc generate` runs transformers causal language models"
        )
    if adapter is not None and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise CliError(
            f"`adaptc generate --adapter` runs decoder-only models; {type(model).__name__} is an encoder-decoder model"
        )
    generator: Any = model
    if adapter is not None:
        generator = load_adapter(model, adapter, example_inputs=example)  # the folder holds it: no name needed
    generator.eval()  # no dropout while generating

    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sample}
    if sample:
        options.update(temperature=args.temperature, top_p=1.0 if args.top_p is None else args.top_p, top_k=0)
    if getattr(tokenizer, "pad_token_id", None) is not None:
        options["pad_token_id"] = tokenizer.pad_token_id
    if sample:
        if args.seed is None:
            torch.seed()  # build_model() may have seeded torch: draw anew each run
        else:
            torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        with torch.no_grad():
            generator.generate(**inputs, **options, streamer=streamer)
    except KeyboardInterrupt:  # Ctrl-C while the text streams: end its line, no traceback
        print(flush=True)
        return EXIT_INTERRUPTED
    return 0
