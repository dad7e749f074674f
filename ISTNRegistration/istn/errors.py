"""Exceptions with messages meant for the user (the CLI prints them and exits non-zero)."""


class ISTNError(Exception):
    """Base class of the errors the engine raises for bad input."""


class InputError(ISTNError):
    """An input image or argument is unusable (unreadable, wrong dimension, NaN, ...)."""


class ModelFileError(ISTNError):
    """A model file is missing, corrupt, foreign or of an incompatible metadata version."""


class OutputError(ISTNError):
    """An output location cannot be written (or would overwrite an input)."""
