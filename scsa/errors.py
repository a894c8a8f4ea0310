"""User-facing errors: one line on stderr, exit code 2, no traceback."""
import functools
import sys
from typing import Callable, TypeVar

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, requeue and run the same command again

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input or configuration; the message names the problem and the fix."""


def exit_on_user_error(fn: F) -> F:
    """Turn a UserError (or a ValueError raised by a constructor on bad options) into exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return wrapper  # type: ignore[return-value]
