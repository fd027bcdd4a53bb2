"""User-facing errors: the CLI prints the message on one line and exits non-zero, no traceback;
``short_reason`` cuts a library's exception down to a reason that fits in such a line."""


class CellPuzzlesError(Exception):
    """An error the user can fix (bad file, missing column, impossible option).

    The message names the input and what to do about it.
    """

    exit_code = 2


class ValidationFailed(CellPuzzlesError):
    """The data failed its expectation suite; the message names the failed expectations."""

    exit_code = 3


class GateFailed(CellPuzzlesError):
    """The promotion gate rejected the model; the message names the failed checks. No alias moved."""

    exit_code = 4


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """An exception's message for a one-line error: its ``message`` attribute (MLflow, OpenAI)
    or ``str()``, the first non-blank line with whitespace collapsed, cut to ``limit``
    characters; the exception's type name when it has no message."""
    msg = str(getattr(exc, "message", None) or exc)
    first = next((line for line in msg.splitlines() if line.strip()), "")
    text = " ".join(first.split())[:limit]
    return text or type(exc).__name__
