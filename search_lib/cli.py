"""Command-line plumbing shared by every entry point.

`run_cli` turns the typed errors of `search_lib.errors` into a one-line message and an exit code, so
that no user error ends in a traceback; `add_bool_flag` gives flags that accept ``--flag``,
``--no-flag`` and the original code's ``--flag true|false`` words.

Command lines are generated from the typed configs: a config field declared with ``field(...,
metadata=flag(help, ...))`` becomes ``--<name>`` (`add_config_flags`), with the field's default, a type
taken from the default (or given), its choices and its help. The dataclass is the one source of every
flag's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Iterable

import torch

from .errors import EXIT_RUNTIME, EXIT_USAGE, RunFailure, ToolkitError, one_line
from .memory import is_out_of_memory

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(text: str) -> bool:
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """Add ``--name`` (optionally followed by true/false) and ``--no-name``."""
    dest = name.lstrip("-").replace("-", "_")
    flag = "--" + name.lstrip("-")
    parser.add_argument(flag, dest=dest, nargs="?", const=True, default=default, type=str2bool,
                        metavar="true|false",
                        help=help if help == argparse.SUPPRESS else f"{help} (default: {default})")
    parser.add_argument("--no-" + name.lstrip("-"), dest=dest, action="store_false", help=argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line with exit code 2 (its usual code)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def make_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


_OOM_MESSAGE = ("the GPU ran out of memory; lower --batch_size (or --ntk_channels for the search), or run with "
                "--device cpu; re-running the same command resumes")
_CPU_OOM_MESSAGE = "out of memory; lower --batch_size or the network size; re-running the same command resumes"


def _report(message: str) -> None:
    """Print an error line, once per run: under torchrun only rank 0 prints (every rank exits with the code)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)


def run_cli(body: Callable[[], int | None]) -> int:
    """Run an entry point's body; map user errors to one line on stderr and the documented exit code."""
    try:
        code = body()
        return 0 if code is None else int(code)
    except SystemExit as exc:  # argparse: --help (0) or a flag error already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except ToolkitError as exc:
        _report(f"error: {one_line(exc)}")
        logging.getLogger("metantknas").debug("error details", exc_info=True)
        return exc.exit_code
    except torch.cuda.OutOfMemoryError:
        _report(f"error: {_OOM_MESSAGE}")
        return EXIT_RUNTIME
    except RuntimeError as exc:  # cuDNN / cuBLAS / the CPU allocator's failures are plain RuntimeErrors
        if not is_out_of_memory(exc):
            raise
        on_gpu = any(word in str(exc).lower() for word in ("cuda", "cudnn", "cublas"))
        _report(f"error: {_OOM_MESSAGE if on_gpu else _CPU_OOM_MESSAGE}")
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        _report("error: interrupted; re-run the same command to resume")
        return 130
    except MemoryError:
        _report(f"error: {_CPU_OOM_MESSAGE}")
        return EXIT_RUNTIME


# --------------------------------------------------------------------------------------------------
# flags generated from config dataclasses

_FLAG = "cli"


def flag(help: str, *, type: Callable[[str], Any] | None = None, choices: Iterable[str] | None = None,
         group: str | None = None, metavar: str | None = None, hidden: bool = False, **extra) -> dict:
    """Field metadata that makes a config field a command-line flag (see `add_config_flags`).

    ``type`` defaults to the type of the field's default (int, float, str; bool gives a true/false flag);
    a field whose default is None or a list needs it (with ``nargs="+"`` in ``extra`` a list field takes
    several values, each of that type). Other ``extra`` keys are free for the config's own use.
    """
    return {_FLAG: dict(help=help, type=type, choices=tuple(choices) if choices else None, group=group,
                        metavar=metavar, hidden=hidden, **extra)}


def flag_fields(cls, **where) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags, optionally only those whose flag metadata has ``where``'s values."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_FLAG)
        if meta is not None and all(meta.get(k) == v for k, v in where.items()):
            out.append(f)
    return out


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} has no default")  # internal: every config field has one


def add_config_flags(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field], prefix: str = "",
                     groups: dict[str, Any] | None = None, unset_default: bool = False,
                     help_suffix: Callable[[dataclasses.Field], str] | None = None) -> None:
    """Add ``--<prefix><name>`` for each field (in order), into the argument group its metadata names.

    ``groups`` maps group names to argparse groups (created on first use, titled by the name).
    ``unset_default`` makes every default None, so a caller can tell the flags a user passed from the rest.
    """
    groups = {} if groups is None else groups
    for f in fields:
        meta = f.metadata[_FLAG]
        default = field_default(f)
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        name = prefix + f.name
        text = meta["help"] + (help_suffix(f) if help_suffix else "")
        if meta["hidden"]:
            text = argparse.SUPPRESS
        kind = meta["type"] or (type(default) if default is not None else str)
        if kind is bool:
            add_bool_flag(target, name, None if unset_default else default, text)
            continue
        target.add_argument(f"--{name}", type=kind, choices=meta["choices"], metavar=meta["metavar"],
                            nargs=meta.get("nargs"), default=None if unset_default else default, help=text)


__all__ = ["add_bool_flag", "add_config_flags", "field_default", "flag", "flag_fields", "make_parser", "run_cli",
           "str2bool", "RunFailure"]
