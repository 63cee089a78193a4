"""Careless-user and hostile-input fuzzing of the generate, finetune and eval CLIs (issue #14).

Every case runs a CLI's `main(argv)` in-process and must end with exit code 2 and one `error:` line on
stderr (no traceback) that names the file, line or flag and matches the case's pattern, while every input
file stays byte-identical. A new case is one line in CASES: (cli, argv, pattern)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cxrcommon.atomic import atomic_write_text
from eval import diversity, fid, turing
from finetune import train
from inference import generate
from inference.prompts import read_prompts

MAINS = {"gen": generate.main, "train": train.main, "fid": fid.main, "turing": turing.main,
         "diversity": diversity.main}
GEN = "--prompts {w}/p.txt --out {out}/out --model {model} --steps 2 --height 32 --width 32 "
TRAIN = "--output-dir {out}/ft --model {model} --max-train-steps 1 --report-to none --train-data {w}/good.csv "


def _png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height (a decompression-bomb stand-in: no pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64))


CASES = [
    # --- inference.generate: prompt files
    ("gen", GEN + "--prompts {w}/empty.txt", r"empty\.txt: no prompts found"),
    ("gen", GEN + "--prompts {w}/nocol.csv", r"nocol\.csv:1: the header needs a 'prompt' column"),
    ("gen", GEN + "--prompts {w}/neg.csv", r"neg\.csv:2: 'n' must be >= 1, got -1 — fix or delete that line"),
    ("gen", GEN + "--prompts {w}/onebad.csv", r"^error: [^\n]*onebad\.csv:3: 'n' must be a whole number.*--skip-bad"),
    ("gen", GEN + "--prompts {w}/latin.txt", r"latin\.txt:2: not UTF-8 text — save the file as UTF-8"),
    ("gen", GEN + "--prompts {w}/nothere.txt", r"--prompts .*nothere\.txt does not exist"),
    ("gen", GEN + "--prompts {w}/adir", r"--prompts .*adir is a folder"),
    ("gen", GEN + "--out {w}", r"--out .* contains the input file .*p\.txt: it could be overwritten"),
    # --- inference.generate: flags
    ("gen", GEN + "--steps 0", r"--steps must be at least 1, got 0"),
    ("gen", GEN + "--batch-size 0", r"--batch-size must be at least 1"),
    ("gen", GEN + "--n-per-prompt -1", r"--n-per-prompt must be at least 1"),
    ("gen", GEN + "--guidance -1", r"--guidance must be >= 1 \(1 = no guidance"),
    ("gen", GEN + "--height 63", r"--height 63 must be a positive multiple of 8 \(e\.g\. 64\)"),
    ("gen", GEN + "--scheduler nope", r"--scheduler 'nope' is not one of ddim, dpmpp"),
    ("gen", GEN + "--format jpg", r"--format 'jpg' is not one of png, png16, dcm"),
    ("gen", GEN + "--precision fp8", r"--precision 'fp8' is not one of auto, fp32"),
    ("gen", GEN + "--clip-policy cut", r"--clip-policy 'cut' is not one of sentence, hard, error"),
    ("gen", GEN + "--guidance-interval 0.8 0.2", r"--guidance-interval needs two fractions"),
    ("gen", GEN + "--strength 1.5", r"--strength must be in \[0, 1\]"),
    ("gen", GEN + "--mask {w}/mask.png", r"--mask needs --init-image"),
    ("gen", GEN + "--steps 0 --batch-size 0", r"--steps must be at least 1, got 0; --batch-size must be"),
    # --- inference.generate: files named by flags
    ("gen", GEN + "--model {w}/emptymodel", r"--model .*emptymodel: the local folder .* has no model_index\.json"),
    ("gen", GEN + "--lora {w}/notlora.safetensors", r"--lora .*notlora\.safetensors holds no LoRA weights"),
    ("gen", GEN + "--lora {w}/weights.bin", r"--lora .*weights\.bin: only \.safetensors LoRA files are loaded"),
    ("gen", GEN + "--lora {w}/pickle.safetensors", r"--lora .*pickle\.safetensors is not a readable safetensors"),
    ("gen", GEN + "--lora {w}/adir", r"--lora .*adir: the folder holds no \.safetensors file"),
    ("gen", GEN + "--out {w}/p.txt", r"--out .*p\.txt is a file, not a folder"),
    ("gen", GEN + "--init-image {w}/trunc.png", r"trunc\.png: image data is corrupt or truncated"),
    ("gen", GEN + "--init-image {w}/bomb.png", r"bomb\.png: .*400000000 pixels.*decompression bomb"),
    ("gen", GEN + "--init-image {w}/p.txt", r"p\.txt: unsupported file type '\.txt'"),
    # --- config files
    ("gen", GEN + "--config {w}/unknown.yaml", r"unknown\.yaml: unknown key\(s\) bogus — valid keys:"),
    ("gen", GEN + "--config {w}/binary.yaml", r"--config .*binary\.yaml: not UTF-8 text"),
    ("gen", GEN + "--config {w}/badtype.yaml", r"badtype\.yaml: key 'guidance' expects float, got 'strong'"),
    ("gen", GEN + "--config {w}/broken.yaml", r"--config .*broken\.yaml:2: not valid YAML"),
    ("gen", GEN + "--config {w}/adir", r"--config .*adir is a folder"),
    # --- finetune.train
    ("train", TRAIN + "--train-data {w}/missing_img.csv", r"missing_img\.csv:2: image .*gone\.png not found"),
    ("train", TRAIN + "--train-data {w}/wrongcol.csv", r"wrongcol\.csv:1: missing column\(s\) 'image', 'text'"),
    ("train", TRAIN + "--train-data {w}/nocaption.csv", r"nocaption\.csv:2: empty text in column 'text'"),
    ("train", TRAIN + "--train-data {w}/missing_img.csv --on-error skip", r"missing_img\.csv: no usable rows"),
    ("train", TRAIN + "--train-data {w}/nothere.csv", r"--train-data .*nothere\.csv does not exist"),
    ("train", TRAIN + "--resume {w}/adir", r"--resume .*adir is not a checkpoint \(no state\.json\)"),
    ("train", TRAIN + "--train bogus", r"--train 'bogus' is not one of"),
    ("train", TRAIN + "--config {w}/recipe.yaml", r"unknown recipe 'nonsense'"),
    ("train", TRAIN + "--config {w}/binary.yaml", r"--config .*binary\.yaml: not UTF-8 text"),
    # --- eval
    ("fid", "--real {w}/adir", r"give both --real and --fake"),
    ("fid", "--real {w}/adir --fake {w}/adir --features tiny", r"adir: no images \(\.png.*found in this folder"),
    ("diversity", "", r"give the folder of generated images"),
    ("turing", "explain", r"usage: python -m eval\.turing build"),
    ("turing", "score {w}/study {w}/binary.yaml", r"answers file .*binary\.yaml: not UTF-8 text"),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """One workspace of good and bad inputs, shared by every case (cases must not change it)."""
    w = tmp_path_factory.mktemp("fuzz")
    texts = {
        "p.txt": "Small left pleural effusion.\n", "empty.txt": "# only a comment\n\n",
        "nocol.csv": "text,n\nEffusion.,1\n", "neg.csv": "prompt,n\nEffusion.,-1\n",
        "onebad.csv": "prompt,n\nEffusion.,1\nNormal.,two\nOpacity.,1\n",
        "unknown.yaml": "bogus: 1\n", "badtype.yaml": "guidance: strong\n", "broken.yaml": "guidance: 2\n\tsteps: 2\n",
        "recipe.yaml": "recipe: nonsense\n",
        "good.csv": "image,text\nok.png,Effusion.\nok2.png,Normal.\n",
        "missing_img.csv": "image,text\ngone.png,Effusion.\n", "wrongcol.csv": "file,caption\nok.png,Effusion.\n",
        "nocaption.csv": "image,text\nok.png,\n",
    }
    for name, text in texts.items():
        (w / name).write_text(text)
    (w / "latin.txt").write_bytes("Effusion.\nÉpanchement pleural.\n".encode("latin-1"))
    (w / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (w / "weights.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: must never reach torch.load
    (w / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    save_file({"conv.weight": torch.zeros(2)}, str(w / "notlora.safetensors"))
    for name in ("adir", "emptymodel", "study/.key"):
        (w / name).mkdir(parents=True)
    (w / "study/.key/key.csv").write_text("image,truth\nimg_001.png,real\n")
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(w / "ok.png")
    Image.fromarray(np.full((16, 16), 64, np.uint8)).save(w / "ok2.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(w / "mask.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(w / "noise.png")
    (w / "trunc.png").write_bytes((w / "noise.png").read_bytes()[:2000])
    (w / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    return w


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cli,argv,pattern", CASES, ids=[f"{c}:{a.split('{w}/')[-1][:40]}" for c, a, _ in CASES])
def test_user_mistake_is_one_line_exit_2_and_inputs_unchanged(cli, argv, pattern, ws, tiny_model_dir, tmp_path,
                                                               capsys):
    before = _checksums(ws)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    args = argv.format(w=ws, out=tmp_path, model=tiny_model_dir).split()
    with pytest.raises(SystemExit) as exc:
        MAINS[cli](args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    message = err[err.index("error: "):]
    assert re.search(pattern, message, re.S), message
    assert _checksums(ws) == before, "an input file changed or a file appeared in the workspace"
    assert not list(tmp_path.rglob("settings.json")), "settings written before the arguments were checked"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300_000  # KiB: no bomb decoded


def test_verbose_keeps_the_traceback(ws, tiny_model_dir):
    with pytest.raises(generate.UserError, match="--steps must be at least 1"):
        generate.main(GEN.format(w=ws, out=ws, model=tiny_model_dir).split() + ["--steps", "0", "--verbose"])


def test_invalid_height_writes_nothing_so_the_fixed_rerun_needs_no_force(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "p.txt").write_text("Small left pleural effusion.\n")
    argv = GEN.format(w=tmp_path, out=tmp_path, model=tiny_model_dir).split()
    with pytest.raises(SystemExit):
        generate.main(argv + ["--height", "63"])
    assert not (tmp_path / "out").exists()
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the writer that was killed
    stale = out / f".00001_0000_deadbeef.png.synthcxr-{dead.pid}-1a2b3c4d.tmp.png"  # left by a kill -9 mid-write
    live = out / f".00002_0000_deadbeef.png.synthcxr-{os.getpid()}-1a2b3c4d.tmp.png"  # another run, still writing
    mine = out / ".notes.20241128.tmp"  # the user's own file
    for f in (stale, live, mine):
        f.touch()
    old = os.umask(0o022)
    try:
        assert generate.main(argv) == 0
    finally:
        os.umask(old)
    assert not stale.exists() and live.exists() and mine.exists()
    live.unlink()
    mine.unlink()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written and all(p.stat().st_mode & 0o777 == 0o644 for p in written), \
        {p.name: oct(p.stat().st_mode) for p in written}


def test_a_billion_image_prompt_starts_its_first_batch_within_seconds(tmp_path, tiny_model_dir):
    (tmp_path / "p.csv").write_text("prompt,n\nSmall left pleural effusion.,1000000000\n")
    cfg = generate.GenerateConfig(prompts=str(tmp_path / "p.csv"), out=str(tmp_path / "out"),
                                  model=str(tiny_model_dir), steps=1, height=32, width=32, batch_size=1)

    class FirstImage(Exception):
        pass

    def stop(path: Path) -> None:
        raise FirstImage(path)

    start = time.perf_counter()
    with pytest.raises(FirstImage):
        generate.generate(cfg, on_image=stop)
    assert time.perf_counter() - start < 30
    # a resumed run counts what is done from the manifest, still without expanding the plan
    rows = read_prompts(cfg.prompts)
    finished = generate.finished_rows(Path(cfg.out))
    plan = dict(base_seed=cfg.seed, negative_prompt="", fmt="png", label_folders=False)
    assert generate.plan_size(rows, finished, 0, 1, **plan) == (1_000_000_000, 1)
    assert generate.plan_size(rows, finished, 1, 2, **plan) == (500_000_000, 0)


def test_skip_bad_lines_skips_a_non_utf8_line(ws):
    rows = read_prompts(ws / "latin.txt", skip_bad=True)
    assert [r.prompt for r in rows] == ["Effusion."]


def test_temp_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", json.dumps({}))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
