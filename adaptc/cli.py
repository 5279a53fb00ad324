"""The ``adaptc`` command line.

``adaptc inspect model.py`` lists the sites a method could adapt; ``adaptc inject model.py
--method lora`` inserts a fresh adapter and reports what matched. ``model.py`` is a user file
defining ``build_model()`` (the ``nn.Module``) and ``example_inputs()`` (the inputs of one
typical call, in any form ``adaptc.inject`` accepts).

Errors print one line, ``adaptc: error: <cause and what to do>``, and return a non-zero exit
code (2 for a usage or configuration problem, 1 for a failure inside the model file or an
unexpected one); ``--debug`` prints the full traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import api
from .capture import capture
from .cli_common import EXIT_FAILURE, EXIT_USAGE, CliError, Parser, build_from_file, one_line
from .cli_generate import add_generate_parser
from .cli_train import add_train_parser
from .config import LORA_INITS, LoraConfig
from .errors import AdaptcError
from .inputs import normalize_inputs
from .methods import get_method, make_config
from .model import TrainableSummary
from .passes.quantize import make_quant_config, weight_bytes
from .plot import sites_plot
from .tables import expert_groups, in_out, number, site_kind, table

PROG = "adaptc"

# Exit codes: argparse's convention for usage errors, 1 for anything that failed while running.
_LORA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}


# --- commands -----------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    config = make_config(args.method, _inspect_options(args))  # bad options fail before the model is built
    method = get_method(config)
    if not method.site_table:
        return _inspect_method(args, config)
    if args.plot is not None:
        _check_output_file(args.plot, ".png")
    model, example = build_from_file(args.model_file)
    inputs = normalize_inputs(example)
    sites = api.inspect_sites(model, inputs)
    total = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__} from {args.model_file}, inputs {inputs.describe()}: {len(sites)} sites")
    if not sites:
        print(f"no linear, conv or embedding op found: {method.name} has nothing to adapt in this model")
        return 0

    # The parameter column comes from the method (Method.site_params); a method that does not say has none.
    counts = [method.site_params(site, config) for site in sites]
    cells = [method.site_cell(site, config) for site in sites]
    has_column = any(cells)
    rows = []
    for site, cell in zip(sites, cells):
        row = [
            site.name, site_kind(site), site.op, site.shapes(), in_out(site),
            "" if site.layer is None else site.layer, "head" if site.is_head else "router" if site.is_router else "",
        ]
        rows.append(row + [cell] if has_column else row)
    headers = ["site", "kind", "op", "weight", "in->out", "layer", "head"]
    headers += [method.site_column(config)] if has_column else []
    print(table(headers, rows, right=(5, 7) if has_column else (5,)))

    kinds = {}
    for site in sites:
        kinds[site.kind] = kinds.get(site.kind, 0) + 1
    breakdown = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    breakdown += "".join(
        f"; {site.name.rpartition('.')[2]}: {len(group)} weights of {site.experts} experts"
        for group in expert_groups(sites).values() for site in group[:1]
    )
    summary = f"total: {len(sites)} sites ({breakdown}); model params {number(total)}"
    if has_column:
        added_all = sum(c or 0 for c in counts)
        chosen = {s.name for s in method.default_sites(sites, config)}
        added_default = sum(c or 0 for s, c in zip(sites, counts) if s.name in chosen)
        summary += (
            f"; {method.site_column(config)} adds {number(added_all)} on every site it can adapt, {number(added_default)} on "
            f"the {len(chosen)} sites of its targets (trainable% "
            f"{100 * TrainableSummary(added_default, total + added_default).fraction:.4f})"
        )
    else:
        summary += f"; {method.name} does not state its parameters per site (adaptc inject does, once inserted)"
    print(summary)
    for note in method.site_notes(sites, config):
        print(note)
    if args.plot is not None:
        if not has_column:
            raise CliError(f"--plot draws parameters per site, which --method {method.name} does not state")
        plotted = [(s.name, s.kind, s.layer, c or 0) for s, c in zip(sites, counts)]
        title = f"{type(model).__name__}: {method.site_column(config)} parameters per site ({number(added_all)} on every site)"
        print(f"plot written to {sites_plot(plotted, args.plot, title)}")
    return 0


def _inspect_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--opt`` options, and ``--r`` where given: every method's inspect view reads the config they make."""
    options: dict[str, Any] = {}
    for key, value in getattr(args, "opt", None) or []:
        if key in options:
            raise CliError(f"option {key!r} given twice with --opt; give it once")
        options[key] = value
    if args.r is not None:
        if "r" in options:
            raise CliError("option 'r' given twice (as --r and --opt r=...); give it once")
        options["r"] = args.r
    return options


def _inspect_method(args: argparse.Namespace, config: Any) -> int:
    """Where a method without a site table acts (the attention ops for prefix, the sequence entry for prompts)."""
    if args.plot is not None:
        raise CliError(f"--plot draws LoRA sites; it is not available with --method {config.method}")
    model, example = build_from_file(args.model_file)
    inputs = normalize_inputs(example)
    graph = capture(model, inputs)
    print(f"{type(model).__name__} from {args.model_file}, inputs {inputs.describe()}")
    for line in get_method(config).inspect(graph, model, inputs, config):
        print(line)
    return 0


def _check_output_file(path_arg: str, suffix: str) -> None:
    path = Path(path_arg)
    if path.suffix.lower() != suffix:
        raise CliError(f"{path_arg!r} should end in {suffix}; pass e.g. sites{suffix}")
    if not path.parent.resolve().is_dir():
        raise CliError(f"folder {str(path.parent)!r} of {path_arg!r} does not exist; create it or choose another path")
    if path.is_dir():
        raise CliError(f"{path_arg!r} is a folder; pass a file name")


def _lora_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given on the command line, so LoraConfig's own defaults apply otherwise."""
    options: dict[str, Any] = {}
    for name, value in (
        ("r", args.r), ("alpha", args.alpha), ("dropout", args.dropout), ("exclude", args.exclude),
        ("layers", args.layers), ("init", args.init),
    ):
        if value is not None:
            options[name] = value
    if args.targets is not None:
        options["targets"] = args.targets
    elif args.target is not None:
        options["targets"] = args.target
    for key, value in getattr(args, "opt", None) or []:
        if key in options:
            raise CliError(f"option {key!r} given twice (as --{key} and --opt {key}=...); give it once")
        options[key] = value
    if args.rslora:
        options["rslora"] = True
    if args.dora:
        options["use_dora"] = True
    return options


def cmd_inject(args: argparse.Namespace) -> int:
    config = make_config(args.method, _lora_options(args))  # validated before the model is built
    quant = make_quant_config(args.quantize, compute_dtype=args.compute_dtype) if args.quantize else None
    model, example = build_from_file(args.model_file)
    adapted = api.inject(model, config, example_inputs=example, quantize=quant)
    settings, where, *details = get_method(config).describe(adapted, adapted.active_adapter)
    print(settings)
    print(f"{type(model).__name__} from {args.model_file}: {where}")
    for line in details:
        print(line)
    print(adapted.trainable_summary(print_it=False))
    if quant is not None:
        size = weight_bytes(model)["quantized"]
        print(f"quantized base: {quant.format} linear weights take {size / 2**20:.2f} MiB (compute {quant.compute_dtype})")
    if args.output is not None:  # a starting point to train, or to load with PEFT
        for path in adapted.save_adapter(args.output):
            print(f"adapter saved to {path}")
    return 0


# --- the parser ---------------------------------------------------------------------------------

def _key_value(text: str) -> tuple[str, Any]:
    """``--opt key=value``: the value is read as a Python literal (8, 0.1, True, [0, 1], 'x') or kept as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. r=8 or targets='.*q_proj'), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _add_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--opt", metavar="KEY=VALUE", type=_key_value, action="append",
        help="any option of the method, as adaptc.inject takes it (repeatable), e.g. --opt r=4 --opt rank_pattern={'c_attn':2}",
    )


_MAIN_EPILOG = """\
examples (model file to ONNX Runtime):
  adaptc inspect examples/tiny_gpt2.py --plot sites.png
  adaptc inject  examples/text_classification.py --method lora --r 8 -o out/
  adaptc train   examples/text_classification.py --adapter out/ --steps 20 --lr 2e-3
  adaptc export  examples/text_classification.py --adapter out/best -o model.onnx
  adaptc generate examples/tiny_gpt2.py --prompt "the cat sat on" --max-new-tokens 8

`adaptc COMMAND --help` shows each command's options and examples.
"""

_INSPECT_EPILOG = """\
examples:
  adaptc inspect examples/tiny_gpt2.py
  adaptc inspect examples/tiny_gpt2.py --r 4 --plot sites.png

model.py defines build_model() (returns the nn.Module) and example_inputs() (the inputs of one
call: a dict of keyword inputs, a tuple of positional inputs, or (args, kwargs)).
"""

_INJECT_EPILOG = """\
examples:
  adaptc inject examples/tiny_gpt2.py --method lora
  adaptc inject examples/tiny_gpt2.py --method lora --r 4 --alpha 16 --targets '.*\\.attn\\..*'
  adaptc inject examples/tiny_gpt2.py --method lora --target c_attn --layers 0
  adaptc inject examples/tiny_gpt2.py --method lora --opt "rank_pattern={'c_attn': 2}" -o out/

--targets is a regular expression matched in full against site names (or 'all-linear':
every linear-like site but the output head); --target/--exclude take site names or
dotted suffixes. `adaptc inspect model.py` lists the site names.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="adaptc: a model-agnostic adapter compiler (LoRA as torch.fx graph passes).",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="on error, print the full traceback")
    # SUPPRESS: a subcommand's --debug must not reset one given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on error, print the full traceback")
    common.add_argument("model_file", metavar="model.py", help="a Python file defining build_model() and example_inputs()")
    common.add_argument("--method", default="lora", help="the adapter method (default: lora)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect_p = sub.add_parser(
        "inspect", parents=[common], help="list the sites a method could adapt, as a table",
        description="Capture the model and list every site a method could adapt.",
        epilog=_INSPECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect_p.add_argument("--r", type=int, help=f"rank used for the parameter column (LoRA's default: {_LORA_DEFAULTS['r']})")
    inspect_p.add_argument("--plot", metavar="PNG", help="also draw, per layer, where adapters would go and the parameters each adds")
    _add_opt(inspect_p)
    inspect_p.set_defaults(func=cmd_inspect)

    inject_p = sub.add_parser(
        "inject", parents=[common], help="insert a fresh adapter and report what matched",
        description="Insert a fresh adapter into the model and report the matched sites and trainable parameters.",
        epilog=_INJECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = _LORA_DEFAULTS
    inject_p.add_argument("--r", type=int, help=f"LoRA rank (default: {d['r']})")
    inject_p.add_argument("--alpha", type=float, help=f"LoRA alpha; scale is alpha/r (default: {d['alpha']:g})")
    inject_p.add_argument("--dropout", type=float, help=f"dropout on the adapter input (default: {d['dropout']:g})")
    which = inject_p.add_mutually_exclusive_group()
    which.add_argument("--targets", metavar="REGEX", help=f"regular expression on site names, or 'all-linear' (default: {d['targets']})")
    which.add_argument("--target", metavar="NAME", nargs="+", help="site names or dotted suffixes (e.g. c_attn q_proj)")
    inject_p.add_argument("--exclude", metavar="NAME", nargs="+", help="site names or dotted suffixes to leave out")
    inject_p.add_argument("--layers", metavar="N", type=int, nargs="+", help="only sites in these repeated-layer indices")
    inject_p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    inject_p.add_argument("--dora", action="store_true", help="DoRA: also learn a per-output magnitude")
    inject_p.add_argument("--init", choices=LORA_INITS, help=f"adapter initialisation (default: {d['init']})")
    inject_p.add_argument("--quantize", choices=("nf4", "int8"), help="store the frozen linear weights quantized (QLoRA)")
    inject_p.add_argument("--compute-dtype", choices=("fp32", "bf16"), help="dtype of the quantized layers' matmuls")
    inject_p.add_argument(
        "-o", "--output", metavar="DIR", help="save the fresh adapter there (PEFT format: adapter_config.json + .safetensors)"
    )
    _add_opt(inject_p)
    inject_p.set_defaults(func=cmd_inject)
    _add_export_parser(sub, common)
    add_train_parser(sub, common, Parser)
    add_generate_parser(sub, common)
    return parser


# --- export -------------------------------------------------------------------------------------

_EXPORT_EPILOG = """\
examples:
  adaptc export examples/tiny_gpt2.py -o model.onnx
  adaptc export examples/tiny_gpt2.py -o model.onnx --quantize int8
  adaptc export examples/tiny_gpt2.py -o model.onnx --no-merge   # + model.default.onnx_adapter
  adaptc export examples/tiny_gpt2.py --task text-generation -o out/   # a folder onnxruntime-genai runs

Exports the model with a LoRA adapter (a fresh one with the LoRA options given, or the one saved
in --adapter DIR), optimized for ONNX Runtime and parity-checked against PyTorch; nothing is
written if the check fails.
"""


def _add_export_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    export_p = sub.add_parser(
        "export", parents=[common], help="export to ONNX for ONNX Runtime (merged or with adapter files)",
        description="Export the adapted model to ONNX, optimize it for ONNX Runtime and check parity with PyTorch.",
        epilog=_EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                          help="where to write the model (a folder with --task text-generation)")
    export_p.add_argument("--task", choices=["text-generation"],
                          help="text-generation: a decoder with a key/value cache, genai_config.json and the "
                               "tokenizer (when the model file defines tokenizer()), for onnxruntime-genai")
    export_p.add_argument("--no-merge", action="store_true", help="keep LoRA swappable: write .onnx_adapter files")
    export_p.add_argument("--quantize", choices=["int8", "int4"],
                          help="also write an int8 (ORT dynamic quantization) model; with --task text-generation, "
                               "int8 or int4 (MatMulNBits) replaces the folder's model")
    export_p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    export_p.add_argument("--no-optimize", action="store_true", help="skip the fusions and ORT graph optimizations")
    export_p.add_argument("--adapter", metavar="DIR", help="a saved adapter to load instead of a fresh one")
    d = _LORA_DEFAULTS
    export_p.add_argument("--r", type=int, help=f"LoRA rank of a fresh adapter (default: {d['r']})")
    export_p.add_argument("--alpha", type=float, help=f"LoRA alpha (default: {d['alpha']:g})")
    export_p.add_argument("--dropout", type=float, help=argparse.SUPPRESS)
    which = export_p.add_mutually_exclusive_group()
    which.add_argument("--targets", metavar="REGEX", help=f"regular expression on site names (default: {d['targets']})")
    which.add_argument("--target", metavar="NAME", nargs="+", help="site names or dotted suffixes")
    export_p.add_argument("--exclude", metavar="NAME", nargs="+", help="site names or dotted suffixes to leave out")
    export_p.add_argument("--layers", metavar="N", type=int, nargs="+", help="only sites in these layer indices")
    export_p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    export_p.add_argument("--dora", action="store_true", help="DoRA")
    export_p.add_argument("--init", choices=LORA_INITS, help=f"adapter initialisation (default: {d['init']})")
    _add_opt(export_p)
    export_p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    config = make_config(args.method, _lora_options(args))  # validated before the model is built
    if args.quantize == "int4" and args.task is None:
        raise CliError("--quantize int4 is for --task text-generation; use --quantize int8 for one forward pass")
    if args.task is not None:
        return _export_task(args, config)
    model, example = build_from_file(args.model_file)
    if args.adapter is not None:
        adapted = api.load_adapter(model, args.adapter, example_inputs=example)
    else:
        adapted = api.inject(model, config, example_inputs=example)
    from .targets.export import export_onnx  # onnx, onnxscript, onnxruntime: optional dependencies

    report = export_onnx(
        adapted, args.output, merge=not args.no_merge, optimize=not args.no_optimize, opset=args.opset,
        quantize=args.quantize,
    )
    print(report.summary())
    return 0


def _export_task(args: argparse.Namespace, config: Any) -> int:
    """``--task text-generation``: the folder, with the model file's tokenizer() when it defines one."""
    from .cli_common import build_module_from_file, failed_in_user_code
    from .targets.export import check_folder, export_onnx

    check_folder(args.output)  # a bad output path fails before the model is built
    module, model, example = build_module_from_file(args.model_file)
    make_tokenizer = getattr(module, "tokenizer", None)
    try:
        tokenizer = make_tokenizer() if callable(make_tokenizer) else None
    except Exception as exc:
        raise failed_in_user_code(f"tokenizer() in {args.model_file}", Path(module.__file__).resolve(), exc) from exc
    if args.adapter is not None:
        adapted = api.load_adapter(model, args.adapter, example_inputs=example)
    else:
        adapted = api.inject(model, config, example_inputs=example)
    report = export_onnx(
        adapted, args.output, merge=not args.no_merge, optimize=not args.no_optimize, opset=args.opset,
        quantize=args.quantize, task=args.task, tokenizer=tokenizer,
    )
    print(report.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so even a failure while parsing can show its traceback.
    debug = "--debug" in args_list
    try:
        args = build_parser().parse_args(args_list)
        args.argv = args_list  # `train --nproc` relaunches the same command line under torchrun
        return args.func(args)
    except SystemExit as exc:  # --help, and argparse's own exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except BrokenPipeError:  # `adaptc inspect model.py | head`: the reader left; not an error of ours
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:
        if debug:
            traceback.print_exc()
        elif isinstance(exc, CliError):
            _report(str(exc))
        elif isinstance(exc, AdaptcError):
            _report(one_line(str(exc)))
        else:
            _report(
                f"unexpected {type(exc).__name__}: {one_line(str(exc))}; "
                "rerun with --debug for the traceback and report it if it is adaptc's fault"
            )
        return exc.code if isinstance(exc, CliError) else EXIT_USAGE if isinstance(exc, AdaptcError) else EXIT_FAILURE


def _report(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    # Run the package's copy of this module, not __main__: the commands in other modules
    # (cli_train) raise adaptc.cli.CliError, which must be the class main() catches.
    from adaptc.cli import main as _main

    raise SystemExit(_main())
