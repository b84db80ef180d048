"""User-facing errors and the exit codes the command lines return for them.

Every error a user can cause (a bad path, a malformed file, a bad genotype string, incompatible flags)
is raised as one of these types with a one-line message naming the problem and the fix. The entry
points catch `ToolkitError`, print ``error: <message>`` on one line and exit with ``exit_code``.
"""

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


class DataError(ToolkitError):
    """Input data that is missing, malformed or too small for the requested episodes."""

    exit_code = EXIT_DATA


class RunFailure(ToolkitError):
    """A failure while running: out of memory, an output folder that cannot be written, ..."""

    exit_code = EXIT_RUNTIME
