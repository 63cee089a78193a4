"""Careless and hostile inputs to `textremoval.clean` and the app (issue #14): each user mistake ends in one
`error:` line that names the flag or file and the fix, with exit code 2, before anything is written and
with the inputs unchanged; bombs are refused with bounded memory; killed workers leave no process behind.
A new case is one line in CLI_CASES or ZIP_CASES."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from cxrcommon.errors import UserError
from cxrcommon.imageio import write_png

ROOT = Path(__file__).resolve().parent.parent


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def scans(tmp_path) -> SimpleNamespace:
    """scans/ with two images and a sub-folder, an empty folder, a folder of outputs only, a YAML config."""
    src = tmp_path / "scans"
    for name in ("a.png", "sub/b.png"):
        write_png(src / name, np.random.default_rng(0).random((32, 32), dtype=np.float32))
    (tmp_path / "empty").mkdir()
    outputs = tmp_path / "outputs_only"
    write_png(outputs / "a.mask.png", np.zeros((8, 8), np.float32))
    (outputs / "a.regions.json").write_text("{}")
    (tmp_path / "other").mkdir()
    write_png(tmp_path / "other" / "a.png", np.zeros((8, 8), np.float32))
    (tmp_path / "bad.yaml").write_text("inpainter: telea\nbogus_key: 1\n")
    (tmp_path / "file.txt").write_text("not a folder")
    return SimpleNamespace(tmp=tmp_path, src=src)


# (id, argv from the fixture, substrings the one error line must hold: the flag/file and the fix)
CLI_CASES: list[tuple[str, Callable[[SimpleNamespace], list[str]], list[str]]] = [
    ("out-is-input", lambda d: [str(d.src), "--out", str(d.src)], ["--out", "overlaps the input folder", "outside it"]),
    ("out-inside-input", lambda d: [str(d.src), "--out", str(d.src / "cleaned")], ["overlaps", "choose an --out"]),
    ("out-holds-input-file", lambda d: [str(d.src / "a.png"), "--out", str(d.src)],
     ["contains the input file", "a.png"]),
    ("glob-into-own-folder", lambda d: [str(d.src / "*.png"), "--out", str(d.src)], ["--out", "input file"]),
    ("out-is-a-file", lambda d: [str(d.src), "--out", str(d.tmp / "file.txt")], ["--out", "is a file", "folder"]),
    ("missing-input", lambda d: [str(d.tmp / "nope"), "--out", str(d.tmp / "o")], ["nope", "does not exist", "check"]),
    ("empty-folder", lambda d: [str(d.tmp / "empty"), "--out", str(d.tmp / "o")], ["no PNG, JPEG or DICOM", "empty"]),
    ("only-outputs", lambda d: [str(d.tmp / "outputs_only"), "--out", str(d.tmp / "o")], ["*.mask.png", "not inputs"]),
    ("unknown-inpainter", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--inpainter", "magic"],
     ["--inpainter", "magic", "telea"]),
    ("bad-erase-regex", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--erase-pattern", "(PORT"],
     ["--erase-pattern", "regular expression", "escape"]),
    ("bad-marker-regex", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--marker-pattern", "[L"],
     ["--marker-pattern", "regular expression"]),
    ("unknown-segmenter", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--segmenter", "x"],
     ["--segmenter", "glyph"]),
    ("sam-without-checkpoint", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--segmenter", "sam"],
     ["--sam-checkpoint"]),
    ("missing-sam-checkpoint", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--sam-checkpoint", "no.pth"],
     ["--sam-checkpoint", "no.pth", "download"]),
    ("unknown-config-key", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--config", str(d.tmp / "bad.yaml")],
     ["bad.yaml", "bogus_key", "valid keys"]),
    ("config-is-binary", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--config", str(d.src / "a.png")],
     ["--config", "a.png", "UTF-8"]),
    ("zero-workers", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--workers", "0"], ["--workers", "1 or more"]),
    ("mapping-without-deid", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--mapping-out", str(d.tmp / "m.csv")],
     ["--mapping-out", "--deidentify"]),
    ("deid-without-ocr", lambda d: [str(d.src), "--out", str(d.tmp / "o"), "--deidentify", "--recognize", "false"],
     ["--deidentify", "--recognize true"]),
    ("same-name-twice", lambda d: [str(d.src / "a.png"), str(d.tmp / "other" / "a.png"), "--out", str(d.tmp / "o")],
     ["a.png", "separate --out"]),
]


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in CLI_CASES])
def test_clean_cli_user_mistake_is_one_line_exit_2_and_writes_nothing(scans, capsys, argv, expected):
    from textremoval.clean import main
    before = _checksums(scans.tmp)
    with pytest.raises(SystemExit) as exit_:
        main(argv(scans))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(s in err[0] for s in expected), (err[0], expected)
    assert _checksums(scans.tmp) == before and not (scans.tmp / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_clean_cli_read_only_out_is_one_line(scans, capsys):
    from textremoval.clean import main
    locked = scans.tmp / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(SystemExit) as exit_:
        main([str(scans.src), "--out", str(locked / "o")])
    assert exit_.value.code == 2 and "not writable" in capsys.readouterr().err


def test_rerun_never_cleans_its_own_outputs(scans):
    from textremoval.clean import expand_inputs
    write_png(scans.src / "a.mask.png", np.zeros((8, 8), np.float32))
    (scans.src / "a.regions.json").write_text("{}")
    (scans.src / ".a.png.1a2b3c4d.tmp.png").write_bytes(b"")  # a killed run's temp file
    files, _ = expand_inputs([str(scans.src)])
    assert sorted(str(rel) for _, rel in files) == ["a.png", "sub/b.png"]


def _png_bomb(path: Path, side: int) -> Path:
    """A valid 8-bit grey PNG of side x side zeros: a few hundred kB that decode to side**2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


def test_png_bomb_is_refused_before_decoding_with_bounded_memory(tmp_path):
    """20000 x 20000 (400 M pixels, 4x the limit) in ~400 kB: the pixel guard refuses it from the header.
    Before the guard, cv2.imread decoded it (GBs of RSS); now the child's peak stays near its model baseline."""
    src = tmp_path / "in"
    src.mkdir()
    _png_bomb(src / "bomb.png", 20000)
    before = _checksums(src)
    # the child reports its own peak (VmHWM starts afresh at exec; ru_maxrss would include the forked pytest's)
    child = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_module('textremoval.clean', "
             "run_name='__main__')\nfinally:\n    print(next(l for l in open('/proc/self/status') if "
             "l.startswith('VmHWM')), flush=True)")
    proc = subprocess.run([sys.executable, "-c", child, "clean", str(src), "--out", str(tmp_path / "out")],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout
    assert proc.returncode == 1, out   # a per-file failure: the batch goes on, exit 1
    assert "bomb.png" in out and "decompression bomb" in out and "smaller image" in out, out
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", out).group(1))
    assert peak_kb < 950_000, peak_kb   # measured 676 MB guarded; the decoded array alone adds 400 MB
    assert _checksums(src) == before and not (tmp_path / "out" / "bomb.png").exists()


def _proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, found, todo = _proc_children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_clean_leaves_no_worker_or_resource_tracker(tmp_path):
    import cv2
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    img = np.full((160, 200), 60, np.uint8)
    cv2.putText(img, "PORTABLE", (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2)
    for i in range(8):
        cv2.imwrite(str(src / f"{i}.png"), img)
    proc = subprocess.Popen([sys.executable, "-m", "textremoval.clean", str(src), "--out", str(out), "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not list(out.glob("*.regions.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)   # workers are up and writing
    job = _descendants(proc.pid)
    assert proc.poll() is None and len(job) >= 3, job   # 2 workers + the resource tracker
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while any(_alive(p) for p in job) and time.time() < deadline:
        time.sleep(0.05)
    assert not [p for p in job if _alive(p)]
    written = sorted(out.rglob("*"))
    time.sleep(1)
    assert sorted(out.rglob("*")) == written   # nobody writes on


# --- the app ---------------------------------------------------------------------------------

def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


PNG = b"\x89PNG\r\n\x1a\n"
MiB = 1 << 20
# (id, zip members, max_bytes, max_members, substrings of the message)
ZIP_CASES = [
    ("dot-dot", {"ok.png": PNG, "../evil.png": PNG}, MiB, 100, ["evil.png", "outside the archive", "relative"]),
    ("absolute", {"/etc/abs.png": PNG}, MiB, 100, ["abs.png", "outside the archive"]),
    ("bomb", {"a.png": PNG, "big.png": bytes(64 * MiB)}, 16 * MiB, 100,
     ["bytes exceeds the limit", "SYNTHCXR_MAX_BYTES"]),
    ("too-many", {f"{i}.png": PNG for i in range(30)}, MiB, 20, ["30 entries", "limit of 20", "split"]),
    ("not-a-zip", None, MiB, 100, ["cannot unpack", "plain, unencrypted zip"]),
]


@pytest.mark.parametrize("members, max_bytes, max_members, expected",
                         [pytest.param(m, b, n, e, id=i) for i, m, b, n, e in ZIP_CASES])
def test_app_zip_upload_is_refused_with_the_reason_and_bounded_memory(tmp_path, members, max_bytes, max_members,
                                                                      expected):
    import app
    up = _zip(tmp_path / "set.zip", members) if members is not None else tmp_path / "set.zip"
    if members is None:
        up.write_bytes(b"PK\x03\x04 truncated")
    folder = tmp_path / "unpacked"
    folder.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as err:
            app.unpack_uploads([str(up)], folder, max_bytes=max_bytes, max_members=max_members)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value) and "set.zip" in str(err.value)
    assert all(s in str(err.value) for s in expected), str(err.value)
    assert peak < 8 * MiB and sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= max_bytes
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("method", [zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2])
def test_app_zip_refuses_methods_whose_reads_zipfile_does_not_bound(tmp_path, method):
    """An LZMA/BZIP2 member inflates a whole compressed block per read: 1.5 MB can become gigabytes."""
    import app
    up = tmp_path / "set.zip"
    with zipfile.ZipFile(up, "w", method) as zf:
        zf.writestr("big.png", bytes(32 * MiB))
    (tmp_path / "unpacked").mkdir()
    with pytest.raises(UserError, match=r"set.zip: entry 'big.png' is compressed with method \d+ .*deflate"):
        app.unpack_uploads([str(up)], tmp_path / "unpacked", max_bytes=64 * MiB, max_members=10)
    assert not list((tmp_path / "unpacked").rglob("*.png"))


def test_app_zip_keeps_same_named_images_apart_and_refuses_repeated_entries(tmp_path):
    import app
    folder = tmp_path / "set"
    folder.mkdir()
    good = _zip(tmp_path / "good.zip", {"ok/a.png": PNG, "ok2/a.png": PNG})
    app.unpack_uploads([str(good), str(good)], folder, max_bytes=MiB, max_members=10)
    assert len([p for p in folder.rglob("*.png")]) == 4   # N is what was sent
    dup = tmp_path / "dup.zip"
    with zipfile.ZipFile(dup, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("a.png", PNG)
        zf.writestr("a.png", PNG)
    with pytest.raises(UserError, match="'a.png' appears twice"):
        app.unpack_uploads([str(dup)], tmp_path / "other", max_bytes=MiB, max_members=10)


def test_app_batch_error_shows_every_bad_line_and_its_reason(tmp_path):
    import gradio as gr

    import app
    bad = tmp_path / "p.csv"
    bad.write_text("prompt,n\nfine,1\n,2\nok,many\n")
    services = app.Services(app.AppConfig())
    with pytest.raises(gr.Error) as err:
        app.user_errors(app.batch_dataset)(services, tmp_path, str(bad), 1, 2, 2.0, 0, "png")
    msg = err.value.message
    assert "2 bad line(s)" in msg and "p.csv:3" in msg and "p.csv:4" in msg and "\n" not in msg, msg


class _FakeSampler:
    """Records the scheduler each chunk ran with; each chunk takes `seconds`."""

    def __init__(self, seconds: float):
        self.scheduler_name, self.seconds, self.used = "ddim", seconds, []

    def use_scheduler(self, name: str) -> None:
        self.scheduler_name = name

    def generate(self, requests, **kwargs):
        time.sleep(self.seconds)
        self.used.append(self.scheduler_name)
        return np.zeros((len(requests), 8, 8), np.float32)


def test_a_long_batch_lets_interactive_requests_in_between_chunks(tmp_path):
    import app
    services = app.Services(app.AppConfig())
    fake = _FakeSampler(0.02)
    services._sampler = fake
    batch = services.batch_sampler()
    batch.use_scheduler("euler")
    worker = threading.Thread(target=lambda: [batch.generate([0]) for _ in range(100)])   # ~2 s of chunks
    worker.start()
    time.sleep(0.2)
    waits = []
    for _ in range(5):
        start = time.perf_counter()
        services.run(fake.use_scheduler, "dpmpp")   # an interactive request swaps the scheduler
        waits.append(time.perf_counter() - start)
    worker.join()
    assert max(waits) < 0.5, waits                  # one chunk, not the whole batch
    assert set(fake.used) == {"euler"}              # every batch chunk ran with the batch's own scheduler


def test_app_temp_root_goes_when_the_app_stops_and_stale_roots_on_start(tiny_model_dir):
    import tempfile

    import app
    stale = Path(tempfile.gettempdir()) / f"{app.ROOT_PREFIX}999999999-old"
    stale.mkdir(exist_ok=True)
    demo = app.build_app(app.AppConfig(model=str(tiny_model_dir)))
    root = demo.synthcxr_root
    assert root.is_dir() and not stale.exists()
    (root / "session").mkdir()
    demo.close()
    assert not root.exists()


def test_a_closed_tabs_folder_goes_after_its_running_request_not_from_under_it(tmp_path):
    import types

    import app
    sessions, tab = app.Sessions(tmp_path), types.SimpleNamespace(session_hash="abc123")
    with sessions.folder(tab) as folder:
        (folder / "image.png").write_bytes(b"x")
        sessions.close(tab)  # the tab closes while the request runs
        assert (folder / "image.png").exists()
    assert not folder.exists()  # ... and the folder goes when the request ends
    with sessions.folder(tab) as folder:  # a tab that is closed while idle loses its folder at once
        pass
    assert folder.exists()
    sessions.close(tab)
    assert not folder.exists()
