"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class DlorchError(Exception):
    """An error the CLI prints as a single line (``error: ...``) and exits non-zero on."""

    exit_code = 2


class BadInput(DlorchError):
    """An input file, spec or option is wrong; the message says which and how to fix it."""


class Unreachable(DlorchError):
    """A service (Redis, S3, the orchestrator) cannot be reached."""

    exit_code = 3


class StaleWrite(Exception):
    """A compare-and-set failed: the stored record is not in the state the writer expected."""
