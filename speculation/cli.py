"""Console scripts: a user error is one line on stderr and exit status 1; a bug keeps its traceback.

A user error is the project's :class:`~speculation.errors.UserError`, one of Hydra's or OmegaConf's config errors
(an unknown key, a value of the wrong type) or the operating system refusing a named path (a workdir that cannot be
created). Two layers catch them, because Hydra reports the two places differently:

* inside the job, :func:`one_line_errors` wraps the ``@hydra.main`` function, before Hydra would print "Error
  executing job" and a traceback;
* around the job, :func:`run_console` catches what Hydra raises while composing the config or creating the run
  directory, which it re-raises instead of printing because ``HYDRA_FULL_ERROR=1`` is set for the call.

``HYDRA_FULL_ERROR=1`` set by the user keeps every traceback, as Hydra documents.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from speculation.errors import UserError

FULL_ERROR = "HYDRA_FULL_ERROR"
_user_wants_tracebacks = os.environ.get(FULL_ERROR) == "1"


def one_line(error: BaseException) -> str:
    """The error's message (and its OmegaConf cause's, which names the key) on one line."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"cannot use {error.filename}: {error.strerror}. Pass a path this user can write (e.g. workdir=DIR)."
    parts = [str(error)]
    if isinstance(error, HydraException) and isinstance(error.__cause__, OmegaConfBaseException):
        parts.append(str(error.__cause__))
    text = " ".join(line.strip() for part in parts for line in part.splitlines() if line.strip())
    return text or type(error).__name__


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (UserError, HydraException, OmegaConfBaseException)):
        return True
    # A raw FileNotFoundError means a check is missing in our code: keep its traceback.
    return isinstance(error, OSError) and error.filename is not None and not isinstance(error, FileNotFoundError)


def _exit(error: BaseException) -> NoReturn:
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(1)


def one_line_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a ``@hydra.main`` function (below the ``@hydra.main`` line): user errors exit with one line."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as error:
            if _user_wants_tracebacks or not is_user_error(error):
                raise
            _exit(error)

    return wrapper


def run_console(hydra_main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function (which reads ``sys.argv``) as a console script."""
    previous = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR] = "1"  # Hydra re-raises composition and run-directory errors; we report them below
    try:
        hydra_main()
    except KeyboardInterrupt:
        if _user_wants_tracebacks:
            raise
        print("interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if _user_wants_tracebacks or not is_user_error(error):
            raise
        _exit(error)
    finally:
        if previous is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = previous
