"""User-facing errors: the CLI prints the message on one line and exits non-zero, no traceback."""


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
