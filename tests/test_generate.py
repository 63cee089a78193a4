"""The generation job end to end on the tiny model: provenance, resume, settings guard, shards, LoRA, formats."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrcommon.atomic import read_jsonl
from cxrcommon.imageio import dicom_provenance, read_image, read_png_text, write_png
from cxrcommon.provenance import file_sha256
from inference.config import GenerateConfig
from inference.generate import MANIFEST, SettingsChangedError, generate, main

PROMPTS = ("Moderate left pleural effusion. Heart size is normal.\n"
           "No acute cardiopulmonary process.\n"
           "Right lower lobe consolidation.\n")


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    return GenerateConfig(prompts=str(prompts), out=str(tmp_path / "out"), model=str(tiny_model_dir),
                          n_per_prompt=2, batch_size=4, steps=3, height=32, width=32, seed=11)


def images(out):
    """key -> pixels of every image the manifest lists (asserting one row per key, file present)."""
    rows = read_jsonl(out / MANIFEST)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate manifest rows"
    assert not list(out.rglob("*.tmp*")), "temp files left behind"
    return {k: read_image(out / k) for k in keys}


def same_pixels(a: dict, b: dict) -> bool:
    """Same keys and bitwise the same pixels."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_provenance_and_manifest_in_every_file(cfg, capsys):
    s = generate(dataclasses.replace(cfg, negative_prompt="letters"))
    out = s.out
    files = sorted(out.glob("*.png"))
    assert s.generated == len(files) == 6 and s.skipped == 0
    rows = {r["key"]: r for r in read_jsonl(out / MANIFEST)}
    assert set(rows) == {f.name for f in files}
    for f in files:
        tags = read_png_text(f)
        row = rows[f.name]
        assert tags["synthetic"] == "true" and row["synthetic"] is True
        assert tags["prompt"] == row["prompt"] and tags["prompt"] in PROMPTS
        assert tags["seed"] == str(row["seed"]) and tags["negative_prompt"] == "letters"
        assert (tags["steps"], tags["guidance"], tags["scheduler"]) == ("3", "4.0", "ddim")
        assert tags["model"] == Path(cfg.model).name and tags["software"].startswith("synthcxr ")
        assert "model_path" not in tags and len(tags["model_sha256"]) == 16     # no server path (issue #24)
        assert tags["prompt_source"].startswith("prompts.txt:")
        assert "lora_sha256" not in tags and "created" in tags
    assert len({rows[k]["seed"] for k in rows}) == 6
    assert json.loads((out / "settings.json").read_text())["steps"] == 3


def test_same_pixels_whatever_the_batch_size(cfg, tmp_path):
    a = images(generate(dataclasses.replace(cfg, batch_size=1, out=str(tmp_path / "b1"))).out)
    b = images(generate(dataclasses.replace(cfg, batch_size=4, out=str(tmp_path / "b4"))).out)
    assert len(a) == 6 and same_pixels(a, b)


def test_resume_after_crash_gives_exactly_the_uninterrupted_set(cfg, tmp_path):
    reference = images(generate(dataclasses.replace(cfg, out=str(tmp_path / "ref"))).out)
    seen = []

    def crash(path):
        seen.append(path)
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C after the third image is on disk

    with pytest.raises(KeyboardInterrupt):
        generate(cfg, on_image=crash)
    out = tmp_path / "out"
    with open(out / MANIFEST, "a") as fh:
        fh.write('{"key": "torn')  # a crash in the middle of a manifest append
    (out / seen[0].name).unlink()  # and one finished image lost
    s = generate(cfg)
    assert (s.skipped, s.generated) == (2, 4)
    assert same_pixels(images(out), reference)
    assert generate(cfg).generated == 0  # a third run has nothing left to do


def test_changed_settings_are_refused_unless_forced(cfg):
    generate(cfg)
    for change in (dict(guidance=5.0), dict(scheduler="euler"), dict(seed=12), dict(format="png16")):
        with pytest.raises(SettingsChangedError, match=f"{next(iter(change))}.*--force"):
            generate(dataclasses.replace(cfg, **change))
    assert generate(dataclasses.replace(cfg, batch_size=1)).skipped == 6  # batch size does not change pixels
    s = generate(dataclasses.replace(cfg, guidance=5.0, force=True))
    assert s.generated == 6 and s.skipped == 0
    assert all(read_png_text(s.out / r["key"])["guidance"] == "5.0" for r in read_jsonl(s.out / MANIFEST))
    assert generate(dataclasses.replace(cfg, guidance=5.0)).skipped == 6


def test_shards_union_equals_single_process_run(cfg, tmp_path):
    single = images(generate(dataclasses.replace(cfg, out=str(tmp_path / "single"))).out)
    sharded = dataclasses.replace(cfg, out=str(tmp_path / "sharded"))
    counts = [generate(sharded, shard=(i, 3)).generated for i in range(3)]
    assert counts == [2, 2, 2]
    assert generate(sharded).skipped == 6  # a later single-process run finds all of them and merges the parts
    out = tmp_path / "sharded"
    assert not list(out.glob("manifest.part*"))
    assert same_pixels(images(out), single)


def test_accelerate_launch_two_cpu_processes_equals_single_process_run(cfg, tmp_path):
    """The real launcher: `accelerate launch --multi_gpu --num_processes 2` (accelerate's name for its
    torchrun launcher; with no GPU the ranks run on the CPU over gloo) splits the prompts between ranks."""
    single = images(generate(dataclasses.replace(cfg, out=str(tmp_path / "single"))).out)
    out = tmp_path / "launched"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "inference.generate", "--prompts", cfg.prompts, "--out", str(out), "--model", cfg.model,
           "--n-per-prompt", "2", "--batch-size", "4", "--steps", "3", "--height", "32", "--width", "32",
           "--seed", "11"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [line for line in proc.stdout.splitlines() if "image(s) written" in line]
    assert len(written) == 2 and sum(int(line.split()[0]) for line in written) == 6  # two ranks, 6 images
    assert generate(dataclasses.replace(cfg, out=str(out))).skipped == 6  # merges the rank manifests
    assert same_pixels(images(out), single)


def test_labels_folders_dicom_and_png16(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.csv"
    prompts.write_text('prompt,n,seed,label\n"Effusion, left.",2,40,effusion\nClear lungs.,1,,no finding\n')
    base = GenerateConfig(prompts=str(prompts), model=str(tiny_model_dir), steps=2, height=32, width=32)
    out = generate(dataclasses.replace(base, out=str(tmp_path / "dcm"), format="dcm", label_folders=True)).out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm"))
    assert [f.split("/")[0] for f in files] == ["effusion", "effusion", "no_finding"]
    ds = pydicom.dcmread(out / files[0])
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "SYNTHETIC" in ds.DerivationDescription
    tags = dicom_provenance(ds)
    assert tags["synthetic"] == "true" and tags["prompt"] == "Effusion, left." and tags["seed"] == "40"
    assert tags["label"] == "effusion"
    out16 = generate(dataclasses.replace(base, out=str(tmp_path / "p16"), format="png16")).out
    from PIL import Image
    with Image.open(next(out16.glob("*.png"))) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA trained by nobody: peft adapters on the tiny UNet with random B, saved like finetune saves."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from cxrcommon.tiny import tiny_pipeline
    unet = tiny_pipeline().unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        save_directory=path, safe_serialization=True,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return path


def test_lora_changes_the_images_and_its_hash_is_recorded(cfg, tmp_path, lora_dir):
    base = images(generate(dataclasses.replace(cfg, out=str(tmp_path / "base"))).out)
    weights = next(lora_dir.glob("*.safetensors"))
    s = generate(dataclasses.replace(cfg, out=str(tmp_path / "lora"), lora=str(weights)))
    tuned = images(s.out)
    assert tuned.keys() == base.keys()
    assert np.mean([np.abs(tuned[k] - base[k]).mean() for k in base]) > 1e-3
    for k in tuned:
        assert read_png_text(s.out / k)["lora_sha256"] == file_sha256(weights)
    off = images(generate(dataclasses.replace(cfg, out=str(tmp_path / "off"), lora=str(lora_dir),
                                              lora_scale=0.0)).out)
    assert all(np.abs(off[k] - base[k]).max() <= 1 / 255 for k in base)  # scale 0 = the base model


def test_img2img_strength_zero_writes_the_input(cfg, tmp_path):
    yy, xx = np.mgrid[0:32, 0:32]
    src = ((yy * 7 + xx * 3) % 256 / 255).astype(np.float32)
    write_png(tmp_path / "real.png", src)
    s = generate(dataclasses.replace(cfg, init_image=str(tmp_path / "real.png"), strength=0.0, n_per_prompt=1))
    for k, img in images(s.out).items():
        assert np.array_equal(img, read_image(tmp_path / "real.png"))
        tags = read_png_text(s.out / k)
        assert tags["strength"] == "0.0" and tags["init_image_sha256"] == file_sha256(tmp_path / "real.png")
    mask = np.zeros((32, 32), np.float32)
    mask[10:22, 6:20] = 1.0
    write_png(tmp_path / "mask.png", mask)
    s = generate(dataclasses.replace(cfg, out=str(tmp_path / "inpaint"), init_image=str(tmp_path / "real.png"),
                                     mask=str(tmp_path / "mask.png"), strength=1.0, n_per_prompt=1))
    for k, img in images(s.out).items():
        assert np.array_equal(img[mask == 0], read_image(tmp_path / "real.png")[mask == 0])
        assert np.abs(img - src)[mask == 1].mean() > 0.02
        assert read_png_text(s.out / k)["mask_sha256"] == file_sha256(tmp_path / "mask.png")
    with pytest.raises(ValueError, match="--mask needs --init-image"):
        generate(dataclasses.replace(cfg, mask=str(tmp_path / "real.png")))


def test_balance_generates_what_evens_the_classes(cfg, tmp_path):
    manifest = tmp_path / "real.csv"
    manifest.write_text("image,text,finding\n" + "".join(f"n{i}.png,Normal {i}.,normal\n" for i in range(5))
                        + "e0.png,Left effusion.,effusion\ne1.png,Right effusion.,effusion\n"
                        + "p0.png,INDICATION: dyspnea. FINDINGS: Apical pleural line. IMPRESSION: Pneumothorax.,ptx\n")
    s = generate(dataclasses.replace(cfg, prompts=None, balance=str(manifest), label_column="finding",
                                     label_folders=True))
    counts = {d.name: len(list(d.glob("*.png"))) for d in s.out.iterdir() if d.is_dir()}
    assert counts == {"effusion": 3, "ptx": 4}
    plan = read_jsonl(s.out / "balance_prompts.jsonl")
    assert sum(r["n"] for r in plan) == 7
    # the real reports are prompted with their findings and impression, as captions are trained
    assert {r["prompt"] for r in plan if r["label"] == "ptx"} == {"Apical pleural line. Pneumothorax."}


def test_cli_prints_the_model_and_refuses_bad_input(cfg, capsys):
    argv = ["--prompts", cfg.prompts, "--out", cfg.out, "--model", cfg.model, "--steps", "2", "--height", "32",
            "--width", "32", "--guidance-interval", "0.2", "0.8"]
    assert main(argv) == 0
    assert f"model {cfg.model}" in capsys.readouterr().out
    assert read_png_text(next(Path(cfg.out).glob("*.png")))["guidance_interval"] == "[0.2, 0.8]"
    with pytest.raises(SystemExit, match="--format 'jpg'") as exc:
        main(argv + ["--format", "jpg"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--lora-scale" in capsys.readouterr().out


def test_yaml_config_maps_one_to_one_onto_the_dataclass():
    import yaml

    from cxrcommon.config import parse_config
    ROOT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "generate.yaml"
    keys = set(yaml.safe_load(ROOT_CONFIG.read_text()))
    assert keys == {f.name for f in dataclasses.fields(GenerateConfig)}
    cfg = parse_config(GenerateConfig, ["--config", str(ROOT_CONFIG), "--steps", "7"], "")
    assert cfg == dataclasses.replace(GenerateConfig(), steps=7, out="out/generated", prompts="examples/prompts.txt")


def test_clean_runs_textremoval_on_each_image_and_failures_are_retried(cfg, monkeypatch):
    import textremoval.remover
    calls = []

    def fake_clean(image):  # stands in for OCR + inpainting: blank the top rows, fail once
        calls.append(image.shape)
        if len(calls) == 2:
            raise RuntimeError("detector crashed")
        cleaned = image.copy()
        cleaned[:4] = 0.0
        return textremoval.remover.CleanResult(cleaned, cleaned == 0, [])

    monkeypatch.setattr(textremoval.remover, "clean_image", fake_clean)
    s = generate(dataclasses.replace(cfg, clean=True))
    assert (s.generated, s.failed) == (5, 1) and calls[0] == (32, 32)
    for k, img in images(s.out).items():
        assert img[:4].max() == 0 and read_png_text(s.out / k)["text_removed"] == "true"
    assert generate(dataclasses.replace(cfg, clean=True)).generated == 1  # the failed one is retried


def test_reports_past_the_window_cap_are_cut_at_sentences_or_refused(cfg, tmp_path):
    long = " ".join(f"Finding number {i} is described here in some detail." for i in range(30))  # > 3 windows
    prompts = tmp_path / "long.txt"
    prompts.write_text(f"Clear lungs.\n{long}\n")
    s = generate(dataclasses.replace(cfg, prompts=str(prompts), n_per_prompt=1, steps=1))
    tags = [read_png_text(s.out / k) for k in images(s.out)]
    cut = [t for t in tags if t.get("prompt_truncated") == "true"]
    assert len(cut) == 1 and cut[0]["prompt"].endswith("detail.") and len(cut[0]["prompt"]) < len(long)
    assert cut[0]["prompt_original"] == long and cut[0]["prompt_windows"] == "3"
    with pytest.raises(ValueError, match=r"long.txt:2 has \d+ CLIP tokens, more than 3 window"):
        generate(dataclasses.replace(cfg, prompts=str(prompts), out=str(tmp_path / "e"), clip_policy="error"))
