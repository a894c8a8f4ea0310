"""User-facing errors: one line on stderr, exit code 2, no traceback."""
import functools
import sys
from typing import Callable, NoReturn, TypeVar

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, requeue and run the same command again

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input or configuration; the message names the problem and the fix."""


def fail(message: str) -> NoReturn:
    """End the program the way every bad input ends it: ``error: <message>`` and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def exit_on_user_error(fn: F) -> F:
    """Decorate a command's ``main``: a UserError ends it with ``fail``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))
    return wrapper  # type: ignore[return-value]
