"""The edge of every command: a UserError becomes one `error: ...` line on stderr and exit code 2
(its traceback only with --verbose); anything else is a bug and keeps its traceback. `parse` adds positional
arguments on top of `cxrcommon.config.parse_config`, for commands like `eval.diversity DIR`."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence, TypeVar

from .config import parse_config
from .errors import UserError

T = TypeVar("T")
EXIT_USER_ERROR = 2  # argparse's own code for a bad command line


def verbose_requested(argv: Sequence[str]) -> bool:
    """Whether `--verbose` (or `--verbose true`) is on the command line; read before parsing, so even a
    config that fails to parse can show its traceback."""
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--verbose":
            nxt = args[i + 1].lower() if i + 1 < len(args) else ""
            return nxt not in ("false", "0", "no", "off")
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1].lower() in ("true", "1", "yes", "on")
    return False


def user_exit(exc: BaseException) -> SystemExit:
    """Print `error: <message>` to stderr and return a SystemExit(2) that carries the message
    (so `pytest.raises(SystemExit, match=...)` can check it without Python printing it twice)."""
    message = f"error: {exc}"
    print(message, file=sys.stderr, flush=True)
    exit_ = SystemExit(message)
    exit_.code = EXIT_USER_ERROR
    return exit_


def cli_entry(main: Callable[[list[str]], T]) -> Callable[[Sequence[str] | None], T]:
    """Decorate a `main(argv)`: user mistakes end in one line and exit code 2, Ctrl-C in exit code 130.
    Called with an argv (tests, other code) it returns main's result; called without (console scripts,
    `python -m`), an exit status."""
    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> T:
        args = list(sys.argv[1:] if argv is None else argv)
        try:
            result = main(args)
            # from a console script or `python -m` (no argv): the result is the exit status, so a summary
            # object (a dict, a TrainResult) must not turn a successful run into exit 1
            return result if argv is not None or isinstance(result, int) or result is None else 0
        except UserError as exc:
            if verbose_requested(args):
                raise
            raise user_exit(exc) from None
        except KeyboardInterrupt:
            print("interrupted; rerun the same command to resume where it stopped", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    return run


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
