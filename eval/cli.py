"""The eval commands' CLI helpers: `parse` (positional arguments, from cxrcommon.cli) and `user_errors`."""
from __future__ import annotations

import contextlib
from typing import Iterator

from cxrcommon.cli import parse
from cxrcommon.errors import UserError

__all__ = ["parse", "user_errors"]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside an evaluation, a missing file or an unreadable input (OSError, ValueError: the messages name the
    file and the fix) is the user's to fix: it becomes a UserError, which `cli_entry` reports in one line."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from exc
