"""User-facing errors: one clear message, a non-zero exit code, no traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

#: Exit code for a mistake in the user's input (argparse and jsonargparse also use 2).
USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A mistake the user can fix: the message says what is wrong and how to fix it."""

    #: The process's exit code when the error ends a command.
    exit_code = USER_ERROR_EXIT_CODE


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command-line entry point so ``UserError`` prints one line (on rank 0 of a DDP
    run) and exits with its ``exit_code`` (2 for a mistake in the input)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if getattr(rank_zero_only, "rank", 0) == 0:
                print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    return wrapper


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse ``type`` that parses ``kind`` and refuses zero and negative values."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse
