"""Errors caused by the user's input, as opposed to bugs.

run.py prints a UserError as one or two lines (what is wrong, and the fix) and exits with status
2; any other exception is a bug and keeps its traceback (and --verbose shows the traceback of a
UserError too). Each class also derives from the built-in type code already catches
(ValueError, FileNotFoundError, ...), so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, data, files or workdir; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config field with a value the program cannot use (named in the message)."""


class DataError(UserError, ValueError):
    """A dataset or image the program cannot use: layout, missing split, unreadable file."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the run needs is absent: data, weights, checkpoint, fit."""


class WorkdirBusyError(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


class NonFiniteError(UserError, FloatingPointError):
    """NaN or infinite scores, maps or thresholds: nothing is written from them."""


class ImageInputError(DataError):
    """An image given to the Python API (maskad_jax.load(...).predict) that cannot be scored: the
    message names it (its path, or its position in the list) and what is wrong."""
