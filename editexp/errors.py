"""User errors: one line on stderr and exit status 2 (as argparse does); tracebacks for bugs.

Every error a user can fix (a bad config value, a bad data file, a run directory in use, a
read-only cache, a full disk) derives from :class:`UserError`, and its message names the bad
value or path and what would be accepted. The console scripts run inside :func:`cli_errors`,
which prints such an error as ``<prog>: error: <message>`` and exits 2. Anything else is a
bug and keeps its traceback. ``EDITEXP_DEBUG=1`` (or ``hydra.verbose=true``) shows the
traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "EDITEXP_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(ValueError):
    """An error the user can fix; the message says what is wrong and what would work.

    A ``ValueError`` so that code catching ``ValueError`` around validation keeps working.
    """


def one_line(error: BaseException | str) -> str:
    """The message on a single line (Hydra's option lists and similar span several), without
    the config search path Hydra appends to "Could not find" errors."""
    text = str(error).split("Config search path:")[0]
    return " ".join(text.split())


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Tracebacks for user errors: ``EDITEXP_DEBUG`` set (not 0/false) or ``hydra.verbose``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.verbose" and value.lower() not in ("", "false", "null"):
            return True
    return False


def user_error_of(error: BaseException) -> BaseException | None:
    """The user error behind ``error``, or None for a bug.

    A :class:`UserError`; Hydra's own errors (about the command line: a bad override, an
    unknown option); and an OmegaConf or Hydra error raised while resolving an interpolation
    whose cause is a user error (a resolver refusing ``max_edits=0``), as that user error.
    """
    if isinstance(error, UserError):
        return error
    cause = error.__cause__ or error.__context__
    seen = {id(error)}
    while cause is not None and id(cause) not in seen:  # a resolver's error, wrapped
        if isinstance(cause, UserError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    try:
        from hydra.errors import HydraException
    except ImportError:  # pragma: no cover
        return None
    return error if isinstance(error, HydraException) else None


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Run a console script: a user error becomes ``prog: error: ...`` on stderr and exit 2.

    Sets ``HYDRA_FULL_ERROR`` while it runs, so that Hydra hands its exceptions (and those of
    a multirun's failed grid points) up here instead of printing them itself.
    """
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as error:
        shown = user_error_of(error)
        if shown is None or debug_enabled():
            raise
        print(f"{prog}: error: {one_line(shown)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
