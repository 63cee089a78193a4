"""Positional arguments on top of `cxrcommon.config.parse_config`, for commands like `eval.diversity DIR`."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Sequence, TypeVar

from cxrcommon.config import parse_config
from cxrcommon.optional import MissingPackageError

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
        raise SystemExit(f"unexpected argument(s) {' '.join(bare)}; see --help")
    flags: list[str] = []
    for i, name in enumerate(positional[:len(bare)]):
        values = bare[i:] if i == len(positional) - 1 else [bare[i]]
        flags += ["--" + name.replace("_", "-"), *values]
    return parse_config(cls, flags + args, description)


@contextlib.contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Bad input (missing file or weights, bad manifest/answer row: the messages name the file and the fix)
    ends the command with that one line; --verbose keeps the traceback."""
    try:
        yield
    except (OSError, ValueError, MissingPackageError) as exc:  # also WeightsMissingError, ManifestError, ImageReadError
        if verbose:
            raise
        raise SystemExit(f"error: {exc}") from exc
