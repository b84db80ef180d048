"""Command-line plumbing shared by every entry point.

`run_cli` turns the typed errors of `search_lib.errors` into a one-line message and an exit code, so
that no user error ends in a traceback; `add_bool_flag` gives flags that accept ``--flag``,
``--no-flag`` and the original code's ``--flag true|false`` words.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

import torch

from .errors import EXIT_RUNTIME, EXIT_USAGE, RunFailure, ToolkitError

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
                        metavar="true|false", help=f"{help} (default: {default})")
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
_OOM_WORDS = ("out of memory", "not_enough_memory", "cublas_status_alloc_failed")


def run_cli(body: Callable[[], int | None]) -> int:
    """Run an entry point's body; map user errors to one line on stderr and the documented exit code."""
    try:
        code = body()
        return 0 if code is None else int(code)
    except SystemExit as exc:  # argparse: --help (0) or a flag error already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except ToolkitError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        logging.getLogger("metantknas").debug("error details", exc_info=True)
        return exc.exit_code
    except torch.cuda.OutOfMemoryError:
        print(f"error: {_OOM_MESSAGE}", file=sys.stderr)
        return EXIT_RUNTIME
    except RuntimeError as exc:  # cuDNN / cuBLAS allocation failures are plain RuntimeErrors
        if not any(word in str(exc).lower() for word in _OOM_WORDS):
            raise
        print(f"error: {_OOM_MESSAGE}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --batch_size or the network size", file=sys.stderr)
        return EXIT_RUNTIME


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["add_bool_flag", "make_parser", "run_cli", "str2bool", "RunFailure"]
