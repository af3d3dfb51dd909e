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


def first_problem(e: Exception) -> str:
    """One line for a pydantic ``ValidationError``: the first field at fault and what is wrong with it."""
    errors = e.errors() if hasattr(e, "errors") else []
    if not errors:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    err = errors[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err['msg']}" if where else err["msg"]


def one_line(e: Exception) -> str:
    """An exception's message on one line (readers' messages often span several), or its class name."""
    return " ".join(str(e).split()) or type(e).__name__
