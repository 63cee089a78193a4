"""Positional arguments on top of `cxrcommon.config.parse_config`, for commands like `eval.diversity DIR`."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Sequence, TypeVar

from cxrcommon.config import parse_config
from cxrcommon.errors import UserError

T = TypeVar("T")


def parse(cls: type[T], argv: Sequence[str] | None, description: str, positional: Sequence[str] = ()) -> T:
    """Map leading bare tokens onto `positional` field names (the last one takes the rest), then parse flags.

    `eval.turing score STUDY a.csv b.csv` becomes `--study STUDY --answers a.csv b.csv`, so the dataclass
    stays the single place options are declared and `--help` still lists them all."""
    args = list(sys.argv[1:] if argv is None else argv)
    bare: list[str] = []
    while args and not args[0].startswith("-"):
        bare.append(args.pop(0))
    if bare and not positional:
        raise UserError(f"unexpected argument(s) {' '.join(bare)} — see --help")
    flags: list[str] = []
    for i, name in enumerate(positional[:len(bare)]):
        values = bare[i:] if i == len(positional) - 1 else [bare[i]]
        flags += ["--" + name.replace("_", "-"), *values]
    return parse_config(cls, flags + args, description)


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
