"""User-facing errors: one line that names the problem and the fix, never a traceback, never a credential."""

import logging
import re


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
    return redact(" ".join(str(e).split())) or type(e).__name__


# user:password@ in any URL, and password/secret/token query values: what must never reach a log or a message
_URL_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):[^@/\s]+@")
_QUERY_SECRETS = re.compile(r"(?P<head>[?&](?:password|passwd|secret|token|access_key|secret_key)=)[^&\s'\"]+",
                            re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced by ``***`` (``redis://:***@host:6379/0``)."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['head']}:***@", text)
    return _QUERY_SECRETS.sub(lambda m: f"{m['head']}***", text)


class RedactSecrets(logging.Filter):
    """A handler filter that redacts credentials from every record it passes (message and arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
