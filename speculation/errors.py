"""The project's user errors: a problem with the config, the files or the request, not a bug in the code.

Console scripts (:mod:`speculation.cli`) print a :class:`UserError` as one line on stderr and exit 1, without a
traceback; any other exception is a bug and keeps its traceback. Every message names the value or file at fault and
the fix. ``UserError`` is a ``ValueError`` (and :class:`MissingInputError` a ``FileNotFoundError``), so library
callers can catch them as the built-in kinds they are.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad config values, bad or stale files, impossible requests: the message says what and how to fix it."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory a stage needs does not exist (yet): the message says which stage writes it."""
