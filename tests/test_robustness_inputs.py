"""Issue #24 items 9-13: inputs that used to crash, mislead or stall — deep folders, damaged checkpoints,
thumbnail-sized training images, prompt files of many long reports, pipes/sockets/folders where a file
belongs. Each case uses other inputs than the issue's, so it tests the class of problem, not one file."""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrcommon.errors import MissingFileError, UserError

DEPTH = sys.getrecursionlimit() + 150  # deeper than any recursive walk can go


def _deep(root: Path, depth: int = DEPTH, name: str = "v") -> Path:
    """root/v/v/... `depth` folders down (one-letter names: paths stay under PATH_MAX) (made without recursion); \
returns the innermost folder."""
    cur = str(root)
    os.makedirs(cur, exist_ok=True)
    for _ in range(depth):
        cur = os.path.join(cur, name)
        os.mkdir(cur)
    return Path(cur)


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path):
    """Delete what each test made, bottom-up without recursion: pytest's own clean-up of old temp folders
    (shutil.rmtree) recurses and would crash on these trees in a later session."""
    yield
    from cxrcommon.paths import walk
    folders = [folder for folder, _, _ in walk(tmp_path, follow_links=False)]
    for folder in reversed(folders):
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.path)
        if folder != str(tmp_path):
            os.rmdir(folder)


def _png(path: Path, size=(24, 24), value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- 9: deep folders, link loops

def test_a_folder_deeper_than_the_recursion_limit_is_walked(tmp_path):
    from textremoval.files import expand_inputs
    bottom = _deep(tmp_path / "scans")
    _png(bottom / "deep.jpg")
    _png(tmp_path / "scans" / "top.png")
    found, roots = expand_inputs([str(tmp_path / "scans")])
    names = sorted(rel.name for _, rel in found)
    assert names == ["deep.jpg", "top.png"] and roots == [tmp_path / "scans"]
    assert len(next(rel for _, rel in found if rel.name == "deep.jpg").parts) == DEPTH + 1
    # a recursive glob over the same tree
    hits, _ = expand_inputs([str(tmp_path / "scans" / "**" / "*.jpg")])
    assert [f for f, _ in hits] == [bottom / "deep.jpg"]


def test_glob_files_matches_glob_semantics(tmp_path, monkeypatch):
    import glob

    from cxrcommon.paths import glob_files
    for rel in ("x.png", "a/y.png", "a/b/z.PNG", "a/.hidden/w.png", ".dot.png", "a/b/t.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    for pattern in ("**/*.png", "**", "a/**/*", "*/*.png", "**/*.[pj][np]g", "a/**/.hidden/*", f"{tmp_path}/**/*.jpg"):
        expected = sorted(Path(h) for h in glob.glob(pattern, recursive=True) if os.path.isfile(h))
        assert glob_files(pattern) == expected, pattern


def test_a_link_loop_is_walked_once(tmp_path):
    from cxrcommon.paths import walk_files
    _png(tmp_path / "data" / "sub" / "a.png")
    os.symlink(tmp_path / "data", tmp_path / "data" / "sub" / "back")  # data/sub/back -> data: a loop
    files = sorted(walk_files(tmp_path / "data"))
    assert files == [tmp_path / "data" / "sub" / "a.png"]


def test_outputs_mirroring_a_deep_input_are_written_and_swept(tmp_path):
    from cxrcommon.atomic import atomic_write_text, remove_stale_temps
    target = tmp_path / "out" / Path(*["o"] * DEPTH) / "x.regions.json"
    atomic_write_text(target, "{}")  # made every missing folder without recursion
    assert target.read_text() == "{}"
    stale = target.parent / ".x.png.synthcxr-999999999-1a2b3c4d.tmp.png"  # a dead writer's temp
    stale.write_bytes(b"")
    assert remove_stale_temps(tmp_path / "out") == 1 and not stale.exists()


def test_clean_cli_on_a_deep_folder_cleans_it(tmp_path, capsys):
    from textremoval.clean import main
    bottom = _deep(tmp_path / "in", name="n")
    _png(bottom / "scan.png", (40, 40))
    main([str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out" / Path(*["n"] * DEPTH)
    assert (out / "scan.png").is_file() and (out / "scan.regions.json").is_file()


def test_a_deidentify_rerun_over_a_deep_output_folder_resumes(tmp_path):
    """The resume check and the audit read every regions JSON under --out, at any depth."""
    import json

    from textremoval.deid import audit
    from textremoval.deid import files as deid_files
    bottom = _deep(tmp_path / "out", name="o")
    rec = {"input": "x.dcm", "output": "x.dcm", "settings": {"deidentify": True},
           "deidentify": {"status": "ok", "tags": None, "codes": [], "review": []}}
    (bottom / "x.regions.json").write_text(json.dumps(rec))
    deid_files.check_resume(tmp_path / "out", {"deidentify": True})
    assert [r["input"] for r in audit.collect(tmp_path / "out")] == ["x.dcm"]


# ---------------------------------------------------------------- 10: damaged checkpoints

def _checkpoints(root: Path, steps=(10, 20, 30)) -> list[Path]:
    from finetune.checkpoint import save_checkpoint
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return [save_checkpoint(root, s, {"unet": model}, opt, {"world": 1}) for s in steps]


@pytest.mark.parametrize("damage", ["truncate-optimizer", "empty-weights", "bad-state-json"])
def test_resume_latest_skips_a_damaged_newest_checkpoint_and_names_it(tmp_path, caplog, damage):
    from finetune.checkpoint import OPTIMIZER, STATE, WEIGHTS, find_checkpoint
    paths = _checkpoints(tmp_path)
    newest = paths[-1]
    if damage == "truncate-optimizer":
        data = (newest / OPTIMIZER).read_bytes()
        (newest / OPTIMIZER).write_bytes(data[:len(data) // 2])
    elif damage == "empty-weights":
        (newest / WEIGHTS).write_bytes(b"")
    else:
        (newest / STATE).write_text('{"step": 3')
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        assert find_checkpoint(tmp_path, "latest") == paths[-2]
    assert str(newest) in caplog.text and "damaged" in caplog.text
    with pytest.raises(UserError, match=f"--resume {newest} is damaged"):
        find_checkpoint(tmp_path, str(newest))  # named by the user: refused, naming it
    assert find_checkpoint(tmp_path, str(paths[0])) == paths[0]


def test_resume_latest_with_every_checkpoint_damaged_names_them_all(tmp_path):
    from finetune.checkpoint import WEIGHTS, find_checkpoint
    paths = _checkpoints(tmp_path, steps=(5, 7))
    for p in paths:
        (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:20])
    with pytest.raises(UserError, match="no complete checkpoint") as exc:
        find_checkpoint(tmp_path, "latest")
    assert "checkpoint-5" in str(exc.value) and "checkpoint-7" in str(exc.value)


def test_load_checkpoint_of_a_damaged_file_is_a_user_error(tmp_path):
    from finetune.checkpoint import WEIGHTS, load_checkpoint
    path = _checkpoints(tmp_path, steps=(4,))[0]
    (path / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UserError, match="checkpoint-4 is unreadable"):
        load_checkpoint(path, {"unet": model}, torch.optim.AdamW(model.parameters()))


# ---------------------------------------------------------------- 11: thumbnail-sized training images

def test_a_tiny_image_in_a_manifest_is_listed_or_skipped_with_its_size(tmp_path, caplog):
    from cxrcommon.manifest import ManifestError, read_manifest
    _png(tmp_path / "ok.png", (32, 32))
    _png(tmp_path / "strip.png", (200, 3))
    _png(tmp_path / "ok2.png", (16, 16))
    m = tmp_path / "m.csv"
    m.write_text("image,text\nok.png,Clear.\nstrip.png,Effusion.\nok2.png,Normal.\n")
    with pytest.raises(ManifestError, match=r"m.csv:3: image .*strip.png is only 200x3 pixels"):
        read_manifest(m)
    with caplog.at_level(logging.INFO, logger="cxrcommon.manifest"):
        recs = read_manifest(m, on_error="skip")
    assert [r.image.name for r in recs] == ["ok.png", "ok2.png"]
    assert "200x3" in caplog.text and "kept 2 rows, skipped 1" in caplog.text


def test_training_skips_specks_and_counts_images_far_below_its_resolution(tmp_path, caplog):
    from cxrcommon.manifest import ManifestError
    from cxrcommon.tokenizer import clip_tokenizer
    from finetune.config import TrainConfig
    from finetune.data import load_train_data
    _png(tmp_path / "big.png", (128, 128))
    _png(tmp_path / "small.png", (40, 48))  # 40 < 512 / 8: kept, counted
    _png(tmp_path / "speck.png", (5, 5))  # under the 8 px minimum: a bad row
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "big.png", "text": "Clear."}\n{"image": "small.png", "text": "Clear."}\n'
                 '{"image": "speck.png", "text": "Clear."}\n')
    cfg = TrainConfig(train_data=str(m), resolution=512, val_fraction=0.0)
    with pytest.raises(ManifestError, match="m.jsonl:3: image .*speck.png is only 5x5 pixels, below the 8-pixel"):
        load_train_data(cfg, clip_tokenizer())
    with caplog.at_level(logging.WARNING):
        data = load_train_data(dataclasses.replace(cfg, on_error="skip"), clip_tokenizer())
    assert [Path(p).name for p in data.images] == ["big.png", "small.png"]
    assert "1 of 2 images are smaller than 64 px" in caplog.text and "small.png (40x48)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_train_data(dataclasses.replace(cfg, on_error="skip", resolution=256), clip_tokenizer())
    assert "smaller than" not in caplog.text


# ---------------------------------------------------------------- 12: many long reports

LONG = ("FINDINGS: There is a moderate right pleural effusion with adjacent compressive atelectasis. "
        "The cardiomediastinal silhouette is enlarged but stable. A left subclavian catheter ends in the "
        "superior vena cava. Degenerative changes of the thoracic spine are seen. {i} ")
IMPRESSION = ("IMPRESSION: Moderate right effusion, slightly larger than on the prior radiograph of the "
              "same patient taken for shortness of breath, with atelectasis of the right lower lobe and "
              "no pneumothorax; clinical correlation and follow-up imaging are recommended. Stable enlargement "
              "of the cardiac silhouette without pulmonary edema. Left subclavian catheter in good position, its "
              "tip in the lower superior vena cava. No new consolidation in either lung to suggest pneumonia. ")


class _CountingTokenizer:
    """Delegates to a real tokenizer and counts the texts it was asked to tokenise."""

    def __init__(self, tok):
        self.__dict__["_tok"], self.__dict__["texts"] = tok, 0

    def __call__(self, text, *args, **kwargs):
        self.__dict__["texts"] += 1 if isinstance(text, str) else len(text)
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_the_first_image_does_not_wait_for_every_prompt_to_be_fitted(tmp_path, tiny_model_dir):
    from inference.config import GenerateConfig
    from inference.generate import generate
    from inference.sampler import CXRSampler
    prompts = tmp_path / "reports.txt"
    prompts.write_text("".join((LONG * 3).format(i=i) + IMPRESSION + "\n" for i in range(600)))
    sampler = CXRSampler.load(str(tiny_model_dir), device="cpu")
    sampler.tokenizer = counting = _CountingTokenizer(sampler.tokenizer)

    class First(Exception):
        pass

    def stop(path):
        raise First

    cfg = GenerateConfig(prompts=str(prompts), out=str(tmp_path / "out"), model=str(tiny_model_dir), steps=1,
                         height=32, width=32, batch_size=2, max_windows=2)
    with pytest.raises(First):
        generate(cfg, sampler=sampler, on_image=stop)
    assert counting.texts < 60, counting.texts  # a few prompts' worth, not 600


def test_many_cut_prompts_log_a_few_examples_and_a_count(tmp_path, tiny_model_dir, caplog):
    from inference.config import GenerateConfig
    from inference.generate import MANIFEST, generate
    prompts = tmp_path / "reports.jsonl"
    n = 12
    prompts.write_text("".join(f'{{"prompt": "{(LONG * 2).format(i=i)}{IMPRESSION}"}}\n' for i in range(n)))
    cfg = GenerateConfig(prompts=str(prompts), out=str(tmp_path / "out"), model=str(tiny_model_dir), steps=1,
                         height=32, width=32, batch_size=4, max_windows=1)
    with caplog.at_level(logging.INFO):
        s = generate(cfg)
    assert s.generated == n
    cut_lines = [r for r in caplog.records if "prompt cut to 1 CLIP window" in r.getMessage()]
    impression_lines = [r for r in caplog.records if "impression is longer" in r.getMessage()]
    assert len(cut_lines) == 3 and len(impression_lines) == 3
    assert f"{n} prompts cut to fit in all" in caplog.text
    assert f"{n} prompts with a shortened impression in all" in caplog.text
    rows = [line for line in (tmp_path / "out" / MANIFEST).read_text().splitlines() if line]
    assert len(rows) == n and all('"prompt_truncated": "true"' in r for r in rows)
    # a resumed run skips its finished images without fitting their prompts again
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = generate(cfg)
    assert again.generated == 0 and again.skipped == n and "prompt cut" not in caplog.text


def test_prepare_reports_summarises_repeated_impression_warnings(caplog):
    from cxrcommon.reports import prepare_reports
    reports = [(LONG * 2).format(i=i) + IMPRESSION for i in range(25)]
    with caplog.at_level(logging.WARNING, logger="cxrcommon.reports"):
        texts, stats = prepare_reports(reports, max_windows=1, names=[f"train.csv:{i + 2}" for i in range(25)])
    assert stats.impression_cut == 25 and len(texts) == 25
    assert len(caplog.records) == 4  # three examples and one count
    assert "25 reports with a shortened impression in all" in caplog.records[-1].getMessage()
    assert "train.csv:2:" in caplog.text and "train.csv:26:" not in caplog.text


# ---------------------------------------------------------------- 13: a pipe, a socket or a folder where a file belongs

@pytest.fixture()
def fifo(tmp_path) -> Path:
    path = tmp_path / "stream.csv"
    os.mkfifo(path)
    return path


@pytest.fixture()
def unix_socket(tmp_path):
    path = tmp_path / "s.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    yield path
    sock.close()


def test_clean_names_a_socket_or_pipe_input_for_what_it_is(unix_socket, fifo):
    from textremoval.files import expand_inputs
    with pytest.raises(UserError, match=r"s.png is a socket, not an image file") as exc:
        expand_inputs([str(unix_socket)])
    assert not isinstance(exc.value, MissingFileError)
    with pytest.raises(UserError, match=r"stream.csv is a FIFO \(named pipe\), not an image file"):
        expand_inputs([str(fifo)])


def test_prompt_and_config_readers_name_a_pipe(fifo, tmp_path):
    from cxrcommon.paths import read_user_text
    from inference.prompts import read_prompts
    with pytest.raises(UserError, match=r"--prompts .*stream.csv is a FIFO \(named pipe\), not a file") as exc:
        read_prompts(fifo)
    assert not isinstance(exc.value, MissingFileError)
    with pytest.raises(UserError, match=r"--config .*stream.csv is a FIFO \(named pipe\), not a file"):
        read_user_text(fifo, "--config")
    with pytest.raises(UserError, match="is a folder, not a file"):
        read_user_text(tmp_path, "--config")


def test_manifest_rows_naming_a_folder_or_pipe_say_what_they_are(tmp_path, fifo):
    from cxrcommon.manifest import ManifestError, read_manifest
    _png(tmp_path / "good.png", (32, 32))
    (tmp_path / "series").mkdir()
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "good.png", "text": "a"}\n{"image": "series", "text": "b"}\n'
                 '{"image": "stream.csv", "text": "c"}\n{"image": "gone.png", "text": "d"}\n')
    with pytest.raises(ManifestError) as exc:
        read_manifest(m)
    problems = exc.value.problems
    assert "m.jsonl:2: image" in problems[0] and "series is a folder, not an image file" in problems[0]
    assert "m.jsonl:3: image" in problems[1] and "is a FIFO (named pipe), not an image file" in problems[1]
    assert "gone.png not found" in problems[2]
    with pytest.raises(UserError, match=r"manifest .*stream.csv is a FIFO \(named pipe\), not a file"):
        read_manifest(fifo)
