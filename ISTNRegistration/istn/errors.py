"""Exceptions with messages meant for the user (the CLI prints them and exits with status 2)."""


class ISTNError(Exception):
    """Base class of the errors the engine raises for bad input.

    The message is one or two lines for people; ``detail`` keeps what a library
    said (HDF5, ITK, torch), shown only with ``--verbose``.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class InputError(ISTNError, ValueError):
    """An input image, transform or argument is unusable (unreadable, wrong dimension, NaN, ...).

    Also a ValueError, so code that caught the ValueError of a bad argument still does.
    """


class ModelFileError(ISTNError):
    """A model file is missing, corrupt, foreign or of an incompatible metadata version."""


class OutputError(ISTNError):
    """An output location cannot be written (or would overwrite an input)."""


class ResultError(Exception):
    """A computed result is unusable (e.g. non-finite): nothing is written; not a fault of the input (exit 1)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message ("" if none): what a one-line report shows."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""
