"""User-facing errors and the exit codes the command lines return for them.

Every error a user can cause (a bad path, a malformed file, a bad genotype string, incompatible flags)
is raised as one of these types with a one-line message naming the problem and the fix. The entry
points catch `ToolkitError`, print ``error: <message>`` on one line and exit with ``exit_code``.
"""

import re

EXIT_OK = 0
EXIT_USAGE = 2  # bad flags, bad genotype strings, incompatible options
EXIT_DATA = 3  # missing / malformed / too small input data
EXIT_RUNTIME = 4  # failures while running (out of memory, unwritable output, ...)


class ToolkitError(Exception):
    """Base class of the errors a user can cause; carries the process exit code."""

    exit_code = EXIT_RUNTIME


class UsageError(ToolkitError):
    """Bad command-line flags, incompatible options, unknown names."""

    exit_code = EXIT_USAGE


class GenotypeError(UsageError):
    """A genotype string or file that cannot be parsed or is invalid for the search space."""


class FolderInUse(UsageError):
    """A run folder whose lock another running process holds (`search_lib.core.run_dir.FolderLock`)."""


class ForeignFile(UsageError):
    """A file in a run folder that the toolkit would write but did not create: a symbolic link, not a regular file,
    another user's, or one with other hard links (`search_lib.core.utils.open_own`)."""


class DataError(ToolkitError):
    """Input data that is missing, malformed or too small for the requested episodes."""

    exit_code = EXIT_DATA


class RunFailure(ToolkitError):
    """A failure while running: out of memory, an output folder that cannot be written, ..."""

    exit_code = EXIT_RUNTIME


_ANSI = re.compile(r"\x1b\[[0-9;]*m|\[[01]m")  # colour codes some torch errors carry


def one_line(exc: BaseException | str, limit: int | None = None) -> str:
    """An exception (or text) as one line for a user message: no colour codes, no control characters,
    whitespace collapsed, clipped to ``limit`` characters with "..."; the type name when there is no text."""
    text = _ANSI.sub("", str(exc))
    text = " ".join("".join(ch for ch in text if ch.isprintable() or ch.isspace()).split())
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 1)] + "..."
    return text
