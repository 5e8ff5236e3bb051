"""User-facing errors: one clear message, a non-zero exit code, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

#: Exit code for a mistake in the user's input (argparse and jsonargparse also use 2).
USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A mistake the user can fix: the message says what is wrong and how to fix it."""


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command-line entry point so ``UserError`` prints one line and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None

    return wrapper
