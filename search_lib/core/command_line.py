"""Command-line plumbing shared by every entry point.

`run_cli` turns the typed errors of `search_lib.core.errors` into a one-line message and an exit code, so
that no user error ends in a traceback; `add_bool_flag` gives flags that accept ``--flag``,
``--no-flag`` and the original code's ``--flag true|false`` words.

Command lines are generated from the typed configs: a config field declared with ``field(...,
metadata=flag(help, ...))`` becomes ``--<name>`` (`add_config_flags`), with the field's default, a type
taken from the default (or given), its choices and its help. The dataclass is the one source of every
flag's default.

Help text shows one default per flag, written as it is typed (`format_value`: ``60,80``, ``true``); a flag whose
default is None says in its help what leaving it unset means. No parser matches flags by prefix
(``allow_abbrev=False``): an original flag such as ``--aug_lr`` is never taken for ``--aug_lr_decay_epochs``.
The original code's spellings of the flags are added by `eval_lib.commands.original_flags`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from search_lib.core.errors import EXIT_RUNTIME, EXIT_USAGE, RunFailure, ToolkitError, one_line
from search_lib.core.pass_sizing import is_out_of_memory, on_gpu
from search_lib.core.provenance import set_command_line

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
                        metavar="true|false", help=help)
    parser.add_argument("--no-" + name.lstrip("-"), dest=dest, action="store_false", help=argparse.SUPPRESS)


def format_value(value: Any) -> str:
    """A flag value as it is typed on the command line: lists comma-separated (``60,80``; an empty list
    ``none``), booleans ``true`` / ``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value) if value else "none"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Appends `` (default: X)`` to a flag's help, X as typed, unless the help already says what the default
    is (it contains the word "default"), or the flag has none to show: required, default None (its help
    says what unset means), or no value (``--print_only``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS or "default" in text.lower()):
            return text
        return f"{text} (default: {format_value(action.default).replace('%', '%%')})"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`HelpFormatter` that keeps the description's line breaks (the benchmarks' module docstrings)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors on one line with exit code 2 (its usual code)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"error: {message}; see {self.prog} --help\n")


def make_parser(prog: str | None = None, description: str | None = None, epilog: str | None = None,
                raw_description: bool = False) -> argparse.ArgumentParser:
    """The parser of every command line of the project: one-line errors, one default per flag in the help,
    no prefix matching."""
    return _Parser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                   formatter_class=RawDescriptionHelpFormatter if raw_description else HelpFormatter)


_OOM_MESSAGE = ("the GPU ran out of memory; lower --batch_size (or --ntk_channels for the search), or run with "
                "--device cpu; re-running the same command resumes")
_CPU_OOM_MESSAGE = "out of memory; lower --batch_size or the network size; re-running the same command resumes"


def _report(message: str) -> None:
    """Print an error line, once per run: under torchrun only rank 0 prints (every rank exits with the code)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)


def note(message: str) -> None:
    """One informational line on stderr before a run's log exists (rank 0 only under torchrun)."""
    _report(f"note: {message}")


def run_cli(body: Callable[[], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's body; map user errors to one line on stderr and the documented exit code. ``argv``:
    the arguments ``main(argv)`` received (None: ``sys.argv``'s), recorded as typed in the provenance.json of
    the runs the body starts."""
    set_command_line(argv)
    try:
        return _run_body(body)
    finally:
        set_command_line(None)


def _run_body(body: Callable[[], int | None]) -> int:
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
    except RuntimeError as exc:  # cuDNN / cuBLAS / cuSOLVER / the CPU allocator's failures are plain RuntimeErrors
        if not is_out_of_memory(exc):
            raise
        _report(f"error: {_OOM_MESSAGE if on_gpu(exc) else _CPU_OOM_MESSAGE}")
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
                     help_suffix: Callable[[dataclasses.Field], str] | None = None,
                     help_text: Callable[[dataclasses.Field, str], str] | None = None) -> None:
    """Add ``--<prefix><name>`` for each field (in order), into the argument group its metadata names.

    ``groups`` maps group names to argparse groups (created on first use, titled by the name).
    ``unset_default`` makes every default None, so a caller can tell the flags a user passed from the rest;
    ``help_suffix(field)`` is appended to the help, ``help_text(field, help)`` replaces it.
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
        if help_text is not None:
            text = help_text(f, text)
        if meta["hidden"]:
            text = argparse.SUPPRESS
        kind = meta["type"] or (type(default) if default is not None else str)
        if kind is bool:
            add_bool_flag(target, name, None if unset_default else default, text)
            continue
        target.add_argument(f"--{name}", type=kind, choices=meta["choices"], metavar=meta["metavar"],
                            nargs=meta.get("nargs"), default=None if unset_default else default, help=text)


# --------------------------------------------------------------------------------------------------
# other spellings of flags (the original code's: eval_lib.commands.original_flags)

SAME, ALIAS, RECORDED, NO_EFFECT = "same", "alias", "recorded", "no effect"
RECORDED_DEST = "original_flags"  # the config field holding the values of `recorded` / `no effect` flags


@dataclass(frozen=True)
class Spelling:
    """Another spelling of a flag (the original code's, `eval_lib.commands.original_flags`) and what it does here.

    ``flags``: its option strings (``("-t", "--trial")``); ``target``: this project's flag it sets (alias)
    or that has its name (same); ``value(text, parse)``: the original's value turned into ours (``parse`` is
    the target flag's own parser; an ``argparse.ArgumentTypeError`` refuses the value); ``const``: the value
    of a flag without argument (``--adam``); ``apply(namespace, raw)``: completes the parsed flags after
    parsing (raw: the recorded value, None for a ``same`` row). ``meaning`` (there), ``here`` and
    ``differs`` are the README's columns; ``example`` / ``expect``: a use and the config values it gives.
    """

    flags: tuple[str, ...]
    kind: str
    meaning: str
    target: str | None = None
    here: str = ""
    differs: str = ""
    value: Callable[[str, Callable], Any] | None = None
    const: Any = None
    takes_value: bool = True
    apply: Callable[[argparse.Namespace, Any], None] | None = None
    example: tuple[str, ...] = ()
    expect: dict = field(default_factory=dict)

    @property
    def flag(self) -> str:
        return self.flags[-1]

    @property
    def dest(self) -> str:
        return (self.target or self.flag).lstrip("-")


def _find(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    return next((a for a in parser._actions if option in a.option_strings), None)


class _Record(argparse.Action):
    """Keeps the value of an original-only flag in ``namespace.original_flags`` (flag -> value as given)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = dict(getattr(namespace, RECORDED_DEST, None) or {})
        given[self.option_strings[-1]] = values
        setattr(namespace, RECORDED_DEST, given)


def _typed(value: Callable[[str, Callable], Any], parse: Callable | None) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return value(text, parse or str)
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_spellings(parser: argparse.ArgumentParser, spellings: Iterable[Spelling], epilog: bool = True,
                  missing_ok: bool = False) -> None:
    """Accept other spellings of ``parser``'s flags (which must exist already: ours stay primary).

    An alias is a hidden twin of its target flag (same dest, so the last of the two given wins); a ``same``
    row with ``value`` wraps its flag's parser; a flag of the original alone keeps its value in
    ``original_flags`` (absent unless given, so the parsed defaults stay the config's). ``epilog`` lists
    them under the help; ``missing_ok`` skips rows whose target this parser lacks.
    """
    hidden = argparse.SUPPRESS
    spellings = list(spellings)
    for s in spellings:
        if s.kind in (SAME, ALIAS):
            target = _find(parser, s.target)
            if target is None and missing_ok:
                continue
            assert target is not None, f"{s.flag} names {s.target}, not a flag of {parser.prog}"  # the table's
            if s.kind == SAME:
                if s.value is not None:
                    target.type = _typed(s.value, target.type)
            elif not s.takes_value:
                parser.add_argument(*s.flags, dest=target.dest, action="store_const", const=s.const,
                                    default=hidden, help=hidden)
            else:
                parser.add_argument(*s.flags, dest=target.dest, default=hidden, help=hidden, metavar=target.metavar,
                                    nargs=target.nargs, const=target.const,
                                    type=_typed(s.value, target.type) if s.value else target.type,
                                    choices=None if s.value else target.choices)
        else:
            parser.add_argument(*s.flags, dest=RECORDED_DEST, action=_Record, default=hidden, help=hidden,
                                type=_typed(s.value, str) if s.value else str)
    if epilog:
        listed = ", ".join(s.flag for s in spellings if s.kind != SAME)
        text = (f"The original code's spellings are accepted too ({listed}); see the README, \"Coming from the "
                f"original code\".")
        parser.epilog = f"{parser.epilog}\n\n{text}" if parser.epilog else text


def apply_spellings(ns: argparse.Namespace, spellings: Iterable[Spelling], notes: bool = True) -> argparse.Namespace:
    """Complete a parsed namespace: the ``apply`` of every row that has one (a ``same`` row's always, another's
    when its flag was given), and one note per ``no effect`` flag given (``notes=False``: silent)."""
    given = getattr(ns, RECORDED_DEST, None) or {}
    for s in spellings:
        if s.kind == SAME and s.apply is not None:
            s.apply(ns, None)
        elif s.flag in given:
            if s.apply is not None:
                s.apply(ns, given[s.flag])
            elif s.kind == NO_EFFECT and notes:
                note(f"{s.flag} {given[s.flag]}: no effect here ({s.differs})")
    return ns


def recorded_flags(ns: argparse.Namespace) -> list[str]:
    """The recorded original-only flags of a namespace as ``--flag=value`` arguments (to forward them)."""
    return [f"{k}={v}" for k, v in (getattr(ns, RECORDED_DEST, None) or {}).items()]


__all__ = ["add_bool_flag", "add_config_flags", "add_spellings", "apply_spellings", "field_default", "flag",
           "flag_fields", "format_value", "make_parser", "note", "recorded_flags", "run_cli", "str2bool",
           "HelpFormatter", "RunFailure", "Spelling"]
