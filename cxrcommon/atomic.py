"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .paths import make_dirs, walk

# what `atomic_path`/`atomic_dir` leave behind when a run is killed: a marker no user file carries, and the
# writer's pid, so a sweep never touches a file a live process (another run into the same folder) is writing
_TEMP_FILE = re.compile(r"^\..+\.synthcxr-(?P<pid>\d+)-[0-9a-f]{8}\.tmp(\.[^.]+)?$")
_TEMP_DIR = re.compile(r"^\.tmp-synthcxr-(?P<pid>\d+)-.+-[0-9a-f]{8}$")


def _tag(random: str) -> str:
    return f"synthcxr-{os.getpid()}-{random}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (someone else's counts too): whose leftovers may be removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _make_unique(name: Callable[[str], Path], make: Callable[[Path], None]) -> Path:
    """Create `name(random)` with `make` (os.open/os.mkdir: the umask applies, unlike tempfile's 0600/0700,
    so outputs on a shared disk stay readable to colleagues); retry on the rare name clash."""
    while True:
        path = name(secrets.token_hex(4))
        try:
            make(path)
            return path
        except FileExistsError:
            continue


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temp files and folders that runs which have since died left under `folder` (a zero-byte
    `.x.png.synthcxr-<pid>-1a2b3c4d.tmp.png` still matches `*.png`); those of live processes stay."""
    removed = 0
    for root, dirs, files in walk(folder, follow_links=False):  # no recursion: outputs may mirror a deep input
        for d in list(dirs):
            if (m := _TEMP_DIR.match(d)) and not pid_alive(int(m["pid"])):
                shutil.rmtree(Path(root, d), ignore_errors=True)
                removed += 1
            if m:
                dirs.remove(d)
        for f in files:
            if (m := _TEMP_FILE.match(f)) and not pid_alive(int(m["pid"])):
                Path(root, f).unlink(missing_ok=True)
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = _make_unique(lambda r: path.with_name(f".{path.name}.{_tag(r)}.tmp{path.suffix}"),
                       lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Fill a temp folder beside `final` with `write(tmp)`, then swap it in (replacing an older one),
    so a model folder on disk is always complete."""
    final = Path(final)
    make_dirs(final.parent)
    tmp = _make_unique(lambda r: final.with_name(f".tmp-synthcxr-{os.getpid()}-{final.name}-{r}"),
                       lambda p: p.mkdir(0o777))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line and fsync, so a manifest never loses a finished row."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines, ignoring a torn last line left by a crash mid-append."""
    rows: list[dict] = []
    p = Path(path)
    if not p.exists():
        return rows
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{p}:{i + 1}: not valid JSON; fix or delete that line")
    return rows
