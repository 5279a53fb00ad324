"""What the command line's commands share: one-line errors, and loading a user's model file."""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """An error the command line reports as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported in the same one-line form as every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


# --- loading model.py ---------------------------------------------------------------------------

@contextlib.contextmanager
def _importable_from(directory: Path) -> Iterator[None]:
    # A model file may import its neighbours (a local modelling module), as `python model.py` would.
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _user_line(exc: BaseException, path: Path) -> str:
    """' (line N)' for the deepest frame of ``exc`` inside the model file, if any."""
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename).resolve() == path and exc.lineno:
        return f" (line {exc.lineno})"
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    return f" (line {lines[-1]})" if lines else ""


def failed_in_user_code(what: str, path: Path, exc: BaseException) -> CliError:
    # SyntaxError's str() repeats the file and line, which the message already gives.
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    message = one_line(text) or "(no message)"
    return CliError(
        f"{what} raised {type(exc).__name__}{_user_line(exc, path)}: {message}; "
        "fix the model file, or rerun with --debug for the traceback",
        EXIT_FAILURE,
    )


def load_model_file(path_arg: str) -> types.ModuleType:
    """Import a model file by path (it need not be on sys.path or end in .py)."""
    path = Path(path_arg).expanduser().resolve()
    if not path.exists():
        raise CliError(
            f"model file {path_arg!r} not found; pass the path of a Python file that defines "
            "build_model() and example_inputs()"
        )
    if not path.is_file():
        raise CliError(f"{path_arg!r} is not a file; pass the path of a Python file that defines build_model()")
    name = "_adaptc_model_" + re.sub(r"\W", "_", path.stem)
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a class's module up here
    try:
        loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise failed_in_user_code(f"importing {path_arg}", path, exc) from exc
    return module


def _call(module: types.ModuleType, path_arg: str, function: str, purpose: str) -> Any:
    fn = getattr(module, function, None)
    if fn is None:
        raise CliError(f"{path_arg} defines no {function}(); a model file must define {function}() {purpose}")
    if not callable(fn):
        raise CliError(
            f"{function} in {path_arg} is a {type(fn).__name__}, not a function; define {function}() {purpose}"
        )
    try:
        return fn()
    except Exception as exc:
        raise failed_in_user_code(f"{function}() in {path_arg}", Path(module.__file__).resolve(), exc) from exc


def build_from_file(path_arg: str) -> tuple[nn.Module, Any]:
    """``(build_model(), example_inputs())`` of a model file, with one-line errors for what goes wrong."""
    _, model, inputs = build_module_from_file(path_arg)
    return model, inputs


def build_module_from_file(
    path_arg: str, before_build: Callable[[types.ModuleType], None] | None = None
) -> tuple[types.ModuleType, nn.Module, Any]:
    """The imported model file, ``build_model()`` and ``example_inputs()``.

    ``before_build(module)`` runs once the file is imported, before ``build_model()``: a command's
    checks of what else the file must define fail there, before the (slow) model is built.
    """
    with _importable_from(Path(path_arg).expanduser().resolve().parent):
        module = load_model_file(path_arg)
        if before_build is not None:
            before_build(module)
        model = _call(module, path_arg, "build_model", "that returns the torch.nn.Module to adapt")
        if not isinstance(model, nn.Module):
            raise CliError(
                f"build_model() in {path_arg} returned {type(model).__name__}; it must return a torch.nn.Module"
            )
        inputs = _call(
            module, path_arg, "example_inputs",
            "that returns the inputs of one typical call: a dict of keyword inputs or a tuple of positional ones",
        )
    return module, model, inputs


# --- formatting ---------------------------------------------------------------------------------

def one_line(message: str) -> str:
    """A possibly multi-line message as one line (errors are printed as exactly one line)."""
    parts = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    out = ""
    for part in parts:
        if out:
            out += " " if out[-1] in ".:;,!?" else "; "
        out += part
    return out
