"""Data, caches, device choice and crash safety of the finetune stage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxrcommon.errors import UserError
from cxrcommon.imageio import write_png
from cxrcommon.manifest import ManifestError
from cxrcommon.tokenizer import clip_tokenizer
from finetune import accel
from finetune.cache import latent_key
from finetune.checkpoint import STATE, list_checkpoints
from finetune.config import TrainConfig
from finetune.data import load_train_data
from finetune.toy import CAPTIONS, pattern, save_toy_model

ROOT = Path(__file__).resolve().parent.parent


def _manifest(tmp: Path, n: int = 8, bad: bool = False) -> Path:
    lines = ["image,text,patient"]
    for i in range(n):
        cap = CAPTIONS[i % 2]
        write_png(tmp / f"img{i}.png", pattern(cap, 16))
        lines.append(f"img{i}.png,FINDINGS: {cap}.,p{i // 2}")
    if bad:
        lines.append("missing.png,FINDINGS: x.,p9")  # line 10
        lines.append("img0b.png,,p9")  # line 11
        write_png(tmp / "img0b.png", pattern(CAPTIONS[0], 16))
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp / "m.csv"


def test_bad_rows_fail_with_line_numbers_or_are_skipped(tmp_path):
    path = _manifest(tmp_path, bad=True)
    cfg = TrainConfig(train_data=str(path), patient_column="patient", val_fraction=0.25)
    with pytest.raises(ManifestError) as err:
        load_train_data(cfg, clip_tokenizer())
    assert f"{path}:10:" in str(err.value) and f"{path}:11:" in str(err.value)
    cfg.on_error = "skip"
    data = load_train_data(cfg, clip_tokenizer())
    assert len(data) + len(data.val_images) == 8
    assert set(data.captions) <= {c + "." for c in CAPTIONS}  # FINDINGS header stripped
    patient = {p.name: int(p.stem[3:]) // 2 for p in data.images + data.val_images}
    train_p = {patient[p.name] for p in data.images}
    assert train_p.isdisjoint({patient[p.name] for p in data.val_images})


def test_a_prepared_manifest_trains_as_it_is(tmp_path):
    """finetune.prepare's columns (report, patient, split) are used without renaming flags: 'train' rows train,
    'validate' rows validate, 'test' rows never reach training; a bad split value names its line."""
    lines = ["image,report,labels,patient,split"]
    for i, split in enumerate(["train", "train", "validate", "test", "train", "test"]):
        write_png(tmp_path / f"img{i}.png", pattern(CAPTIONS[i % 2], 16))
        lines.append(f"img{i}.png,FINDINGS: {CAPTIONS[i % 2]}.,,p{i},{split}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    data = load_train_data(TrainConfig(train_data=str(path)), clip_tokenizer())
    assert [p.name for p in data.images] == ["img0.png", "img1.png", "img4.png"]
    assert [p.name for p in data.val_images] == ["img2.png"]
    assert data.captions[0] == CAPTIONS[0] + "."
    path.write_text(path.read_text().replace("p4,train", "p4,holdout"))
    with pytest.raises(UserError, match=r"manifest.csv:6: 'split' is 'holdout'"):
        load_train_data(TrainConfig(train_data=str(path)), clip_tokenizer())
    data = load_train_data(TrainConfig(train_data=str(path), split_column="none", val_fraction=0.0), clip_tokenizer())
    assert len(data.images) == 6  # no split column: every row, as before


def test_cache_key_changes_with_resolution_model_and_data(tmp_path):
    from cxrcommon.tiny import tiny_components
    vae_a, vae_b = tiny_components(0)["vae"], tiny_components(1)["vae"]
    imgs = [pattern(CAPTIONS[0], 16)]
    cfg = TrainConfig(resolution=16)
    base = latent_key(vae_a, ["x"], cfg)
    assert latent_key(vae_a, ["x"], cfg) == base
    assert latent_key(vae_a, ["x"], TrainConfig(resolution=32)) != base
    assert latent_key(vae_b, ["x"], cfg) != base
    assert latent_key(vae_a, ["y"], cfg) != base
    from finetune.data import describe_images
    assert describe_images(imgs) != describe_images([1 - imgs[0]])


@pytest.mark.parametrize("device,bf16,expect", [("cpu", False, "no"), ("cuda", True, "bf16"),
                                                ("cuda", False, "fp16"), ("xpu", False, "bf16")])
def test_mixed_precision_follows_the_device(monkeypatch, device, bf16, expect):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert accel.resolve_mixed_precision("auto", torch.device(device)) == expect
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # `accelerate launch --mixed_precision fp16`
    assert accel.resolve_mixed_precision("auto", torch.device(device)) == "fp16"
    with pytest.raises(ValueError, match="not supported on CPU"):
        accel.resolve_mixed_precision("fp16", torch.device("cpu"))


def test_accelerator_built_for_the_device_accelerate_reports(monkeypatch, tmp_path):
    """An XPU machine (mocked) gets bf16 and no forced CPU: nothing hard-codes CUDA."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    seen = {}
    fake_state = mock.Mock(device=torch.device("xpu"))
    monkeypatch.setattr("accelerate.PartialState", lambda cpu=False: seen.setdefault("cpu_state", cpu) or fake_state)
    monkeypatch.setattr("accelerate.Accelerator", lambda **kw: seen.setdefault("kw", kw))
    kw = accel.build_accelerator(TrainConfig(output_dir=str(tmp_path), report_to="none"), str(tmp_path))
    assert kw["mixed_precision"] == "bf16" and kw["cpu"] is False and seen["cpu_state"] is False
    fake_bnb = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit="AdamW8bit"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake_bnb)
    monkeypatch.setattr(accel.importlib.util, "find_spec", lambda name: object())
    assert accel.optimizer_class("auto", torch.device("xpu")) == "AdamW8bit"
    assert accel.optimizer_class("auto", torch.device("cpu")) is torch.optim.AdamW
    sources = "\n".join(p.read_text() for p in (ROOT / "finetune").glob("*.py"))
    assert '"cuda"' not in sources and ".cuda(" not in sources


def test_help_explains_laterality(capsys):
    from finetune.train import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "laterality" in text and "--resume" in text and "--snr-gamma" in text


def test_sigkill_leaves_a_resumable_directory(tmp_path):
    """Kill a real CLI run with SIGKILL mid-training; every checkpoint left must load and resume."""
    model = save_toy_model(tmp_path / "model", resolution=16)
    manifest = _manifest(tmp_path)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model}\ntrain_data: {manifest}\noutput_dir: {out}\nresolution: 16\n"
                   "train_batch_size: 2\nmax_train_steps: 400\ncheckpointing_steps: 1\ncheckpoints_total_limit: 2\n"
                   "validation_steps: 0\nreport_to: none\ndevice: cpu\nval_fraction: 0.0\nlearning_rate: 0.001\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "finetune.train", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list_checkpoints(out / "checkpoints")) < 2:
            time.sleep(0.05)
        time.sleep(0.37)  # land somewhere inside a step or a save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    found = list_checkpoints(out / "checkpoints")
    assert found, "no checkpoint was written before the kill"
    for c in found:  # every folder named checkpoint-* is whole
        assert (c / STATE).is_file()
        load_file(str(c / "trainable.safetensors"))
        load_file(str(c / "optimizer.safetensors"))
    last = int(found[-1].name.split("-")[1])
    from cxrcommon.config import from_dict, load_yaml
    from finetune.train import train
    resumed = from_dict(TrainConfig, {**load_yaml(cfg), "resume": "latest", "max_train_steps": last + 2})
    result = train(resumed)
    assert result.resumed_from == found[-1] and result.steps == last + 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert np.isfinite(result.losses).all()
