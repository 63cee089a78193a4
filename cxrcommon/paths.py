"""Output folders checked before any work: not a file, writable, and never overlapping an input, so a
run can neither overwrite the originals nor read its own outputs back in on a rerun."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import MissingFileError, UserError


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, flag: str = "--out") -> Path:
    """Raise UserError unless `out` can be a fresh or existing output folder for `inputs`.

    Refused: `out` is a file; it (or its nearest existing parent) is not writable; it is an input folder,
    lies inside one, or contains one; an input file lies inside it. Creates nothing."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder — pass a folder path (it is created if missing)")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {existing} is not writable — choose another {flag} or fix its permissions")
    target = out.resolve()
    for item in inputs:
        src = Path(item).expanduser()
        if not src.exists():
            raise MissingFileError(f"input {src} does not exist — check the path")
        src = src.resolve()
        if src.is_dir() and (_inside(target, src) or _inside(src, target)):
            raise UserError(f"{flag} {out} overlaps the input folder {item}: outputs would overwrite or be read "
                            f"back as inputs — choose an {flag} outside it (e.g. {src.parent / (src.name + '_out')})")
        if src.is_file() and _inside(src, target):
            raise UserError(f"{flag} {out} contains the input file {item}: it could be overwritten — choose an "
                            f"{flag} that holds no inputs")
    return out


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named (`what`: e.g. "--config"), BOM dropped; a missing path, a
    folder or a binary file is a UserError naming the file (a bare UnicodeDecodeError names none)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder — pass a file")
    if not p.is_file():
        raise MissingFileError(f"{what} {p} does not exist — check the path")
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {p}: not UTF-8 text (byte {exc.start}) — pass a text file saved as UTF-8") from None
