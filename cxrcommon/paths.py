"""Output folders checked before any work: not a file, writable, and never overlapping an input, so a
run can neither overwrite the originals nor read its own outputs back in on a rerun."""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MissingFileError, UserError

log = logging.getLogger(__name__)

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path: str | os.PathLike) -> str:
    """"file" (a regular file), "missing" (nothing there, or a broken link), or what else the path is:
    "a folder", "a FIFO (named pipe)", "a socket", "a character device", "a block device" — so a message
    can say what the user named instead of calling a pipe or a folder "not found". Links are followed."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:  # e.g. permission denied on a parent, a link loop: it is there, but cannot be used
        return f"not readable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return "file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def walk(root: str | os.PathLike, *, follow_links: bool = True) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk(root) (top-down; remove names from the yielded folder list to prune them) without
    recursion: an explicit stack, so a folder nested thousands of levels deep (past Python's recursion
    limit, where Path.rglob and this Python's os.walk fail) is walked like any other. Links to folders
    are followed (unless `follow_links` is false), once: a folder reached again (a link loop) is
    skipped, and an unreadable folder is logged and skipped. Files: regular files and links to them."""
    stack = [os.fspath(root)]
    seen: set[tuple[int, int]] = set()
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                log.info("not walking %s again: a link leads back to a folder already walked", folder)
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                items = [(entry.name, entry.is_dir(follow_symlinks=follow_links), entry.is_file())
                         for entry in entries]
        except OSError as exc:
            log.warning("skipping folder %s: %s", folder, exc.strerror or exc)
            continue
        dirs = sorted(name for name, is_dir, _ in items if is_dir)
        yield folder, dirs, sorted(name for name, is_dir, is_file in items if is_file and not is_dir)
        stack.extend(os.path.join(folder, d) for d in reversed(dirs))


def walk_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every regular file under the folder `root`, at any depth (`walk`: no recursion, link loops skipped)."""
    for folder, _, files in walk(root):
        yield from (Path(folder, f) for f in files)


def make_dirs(path: str | os.PathLike) -> Path:
    """`mkdir -p` without recursion (Path.mkdir(parents=True) and this Python's os.makedirs recurse once
    per missing level, so an output mirroring a deeply nested input would fail)."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            if not p.is_dir():
                raise
    return path


def glob_files(pattern: str) -> list[Path]:
    """Regular files matching a glob pattern, with `**` meaning any number of folders (as
    glob.glob(recursive=True), hidden names only where the pattern spells the dot) but walked without
    recursion (walk_files), so depth does not matter. Sorted."""
    import glob
    parts = Path(pattern).parts
    magic = next((i for i, part in enumerate(parts) if re.search(r"[*?[]", part)), None)
    if magic is None or "**" not in parts[magic:]:
        return sorted(Path(h) for h in glob.glob(pattern) if file_kind(h) == "file")
    base = Path(*parts[:magic]) if magic else Path(".")
    rest = parts[magic:]
    regex = re.compile("".join(_translate(part, last=i == len(rest) - 1) for i, part in enumerate(rest)) + r"\Z",
                       re.DOTALL)
    hits = []
    for f in walk_files(base):
        rel = f.relative_to(base).as_posix()
        if regex.match(rel):
            hits.append(f if magic else Path(rel))
    return sorted(hits)


def _translate(part: str, last: bool) -> str:
    """One glob path component as a regex over a '/'-joined relative path ('**' spans folders)."""
    if part == "**":
        return r"(?:[^/.][^/]*/)*(?:[^/.][^/]*)?" if last else r"(?:[^/.][^/]*/)*"
    out, i = "" if part.startswith(".") else r"(?!\.)", 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and (end := part.find("]", i + 2 if part[i + 1:i + 2] in ("!", "]") else i + 1)) != -1:
            body = part[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return out + ("" if last else "/")


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
    kind = file_kind(p)
    if kind == "missing":
        raise MissingFileError(f"{what} {p} does not exist — check the path")
    if kind != "file":
        raise UserError(f"{what} {p} is {kind}, not a file — pass a file")
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {p}: not UTF-8 text (byte {exc.start}) — pass a text file saved as UTF-8") from None
