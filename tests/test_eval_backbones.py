"""eval: RAD-DINO, CLIP and torchxrayvision DenseNet backbones from local weights (random weights of the real
architectures, tiny where the architecture allows), their preprocessing, the weights-keyed cache and the errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import needs_torchvision
from test_eval_metrics import blobs, write_set

from eval import backbones as bb
from eval import features as feats
from eval.fid import FidConfig, evaluate, main

SMALL_PROCESSOR = {**bb.RAD_DINO_PROCESSOR, "size": {"shortest_edge": 42}, "crop_size": {"height": 42, "width": 42},
                   "image_processor_type": "BitImageProcessor"}
# microsoft/rad-dino's config.json (ViT-B/14 at 518 px, DINOv2 layout)
RAD_DINO_CONFIG = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 768,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4, "patch_size": 14,
                   "image_size": 518, "num_channels": 3, "layer_norm_eps": 1e-6, "layerscale_value": 1.0,
                   "qkv_bias": True, "use_swiglu_ffn": False, "hidden_act": "gelu", "drop_path_rate": 0.0}


def save_dino(folder, seed=0, processor=SMALL_PROCESSOR, hidden=32):
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    cfg = Dinov2Config(**{**RAD_DINO_CONFIG, "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 42})
    Dinov2Model(cfg).save_pretrained(folder)
    if processor:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def save_clip(folder, vision_only=False):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=99), vision_config=dict(small, image_size=224, patch_size=32),
                     projection_dim=16)
    (CLIPVisionModel(cfg.vision_config) if vision_only else CLIPModel(cfg)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_dino(tmp_path_factory.mktemp("w") / "rad-dino")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return write_set(root / "real", blobs(0, 8)), write_set(root / "fake", blobs(1, 8, noise=0.2))


def test_rad_dino_embeds_the_cls_pooler_output_of_its_processor(dino_dir):
    from transformers import Dinov2Model
    backbone = feats.load_backbone("rad-dino", weights=dino_dir, device="cpu")
    img = blobs(0, 1, size=60)[0]
    out = backbone.embed([img])
    assert out.shape == (1, 32) and backbone.family == "rad-dino" and len(backbone.weights_sha256) == 64
    assert "299x299 bilinear" in backbone.resize and "shortest edge 42 bicubic" in backbone.resize
    # by hand: 299 bilinear, uint8, 42 bicubic, uint8, /255, (x - 0.5307) / 0.2583 on 3 channels, CLS pooler
    x = feats.to_square_tensor(img, 299)
    x = torch.nn.functional.interpolate((x * 255).round(), size=(42, 42), mode="bicubic", antialias=True)
    pixels = ((x.round().clamp(0, 255) / 255 - 0.5307) / 0.2583).expand(-1, 3, -1, -1)
    model = Dinov2Model.from_pretrained(dino_dir, local_files_only=True)
    with torch.inference_mode():
        want = model(pixel_values=pixels).pooler_output
        assert torch.allclose(out, want, atol=1e-5)
        assert torch.equal(want, model(pixel_values=pixels).last_hidden_state[:, 0])  # CLS after the layer norm


@pytest.mark.numerics
def test_rad_dino_preprocessing_matches_transformers_bit_processor(dino_dir):
    """CheXGenBench hands its uint8 299x299 batch to AutoImageProcessor (BitImageProcessor); ours must give the
    same pixel values up to the resize kernels' rounding."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    steps = bb.ProcessorSteps(bb.RAD_DINO_PROCESSOR)
    uint8 = (feats.to_square_tensor(blobs(4, 1, size=300, noise=0.05)[0], 299) * 255).round()
    ours = steps(uint8)
    processor = BitImageProcessorPil(**{k: v for k, v in bb.RAD_DINO_PROCESSOR.items()})
    rgb = uint8.to(torch.uint8)[0].expand(3, -1, -1).permute(1, 2, 0).numpy()
    theirs = processor(images=[rgb], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 518, 518)
    levels = (ours - theirs).abs() * 0.2583 * 255
    # measured (blob seeds 4-6, noise 0 and 0.05): 10-20% of the pixels one uint8 level apart, none further
    # (torch's antialiased bicubic in float, then rounded, vs PIL's fixed-point bicubic on uint8)
    assert levels.max() <= 1.01 and (levels > 0.5).float().mean() < 0.3


def test_rad_dino_real_config_shape_builds_without_allocating():
    from transformers import Dinov2Config, Dinov2Model
    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(**RAD_DINO_CONFIG))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(86.6e6, rel=0.01)
    assert model.embeddings.position_embeddings.shape == (1, 37 * 37 + 1, 768)
    assert bb.ProcessorSteps(bb.RAD_DINO_PROCESSOR)(torch.zeros(1, 1, 299, 299)).shape == (1, 3, 518, 518)


def test_fid_with_rad_dino_carries_chexgenbench_names(dino_dir, sets, tmp_path):
    real, fake = sets
    r = evaluate(FidConfig(real=str(real), fake=str(fake), features="rad-dino", weights=str(dino_dir),
                           kid_subset_size=0, cache_dir=str(tmp_path / "c"), out="", device="cpu"))
    names = r["chexgenbench"]
    assert set(names) == {"FID (RadDino)", "KID (RadDino)", "Precision", "Recall", "Density", "Coverage"}
    assert names["FID (RadDino)"] == r["fid"] > 0 and names["Coverage"] == r["coverage"]
    assert (r["n_real"], r["n_fake"], r["features"], r["kid_subset_size"]) == (8, 8, "rad-dino", 8)
    assert r["backbone"].startswith("rad-dino") and r["weights_sha256"]
    other_k = evaluate(FidConfig(real=str(real), fake=str(fake), features="rad-dino", weights=str(dino_dir), k=3,
                                 cache_dir=str(tmp_path / "c"), out="", device="cpu"))
    assert set(other_k["chexgenbench"]) == {"FID (RadDino)", "KID (RadDino)"}  # their PRDC is k = 5
    assert other_k["cache"]["real_hits"] == 8 and other_k["fid"] == pytest.approx(r["fid"])


def test_cache_misses_when_weights_or_preprocessing_change(sets, tmp_path):
    real, _ = sets
    weights = save_dino(tmp_path / "w", seed=0)
    cfg = FidConfig(real=str(real), fake=str(real), features="rad-dino", weights=str(weights),
                    cache_dir=str(tmp_path / "c"), out="", device="cpu")
    first = evaluate(cfg)
    assert first["cache"]["real_extracted"] == 8 and abs(first["fid"]) < 1e-3
    assert evaluate(cfg)["cache"]["fake_hits"] == 8
    (weights / "README.md").write_text("hub card")             # not part of the weights: still a hit
    assert evaluate(cfg)["cache"]["real_hits"] == 8
    save_dino(weights, seed=1)                                  # same names, new weights
    changed = evaluate(cfg)
    assert changed["cache"]["real_hits"] == 0 and changed["cache"]["real_extracted"] == 8
    (weights / "preprocessor_config.json").write_text(json.dumps({**SMALL_PROCESSOR, "image_std": [0.3] * 3}))
    assert evaluate(cfg)["cache"]["real_hits"] == 0
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 3


def test_wrong_architecture_is_refused_naming_the_file(dino_dir, sets, tmp_path):
    clip_dir = save_clip(tmp_path / "clip")
    with pytest.raises(feats.WeightsMismatchError, match=r"clip/config.json: model_type 'clip' \(CLIPModel\), but "
                                                        r"--features rad-dino expects 'dinov2'"):
        feats.load_backbone("rad-dino", weights=clip_dir)
    with pytest.raises(feats.WeightsMismatchError, match="rad-dino/config.json: model_type 'dinov2'.*expects 'clip'"):
        feats.load_backbone("clip", weights=dino_dir)
    odd = save_dino(tmp_path / "odd", hidden=48)                # says dinov2, but its weights are of another size
    (odd / "config.json").write_text((dino_dir / "config.json").read_text())
    with pytest.raises(feats.WeightsMismatchError, match="odd: its safetensors do not fit Dinov2Model.*other shapes"):
        feats.load_backbone("rad-dino", weights=odd)
    real, _ = sets
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="model_type 'clip'"):
        main([str(real), str(real), "--features", "rad-dino", "--weights", str(clip_dir), "--out", str(out),
              "--cache-dir", str(tmp_path / "cache")])
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(feats.WeightsMissingError, match=r"needs --weights DIR.*hf download microsoft/rad-dino "
                                                        r"--local-dir DIR"):
        feats.load_backbone("rad-dino")
    with pytest.raises(feats.WeightsMissingError, match="does not exist.*hf download openai/clip-vit-base-patch32"):
        feats.load_backbone("clip", weights=tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    (tmp_path / "half" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(feats.WeightsMissingError, match=r"half: no model.safetensors there \(found: config.json, "
                                                        r"pytorch_model.bin\)"):
        feats.load_backbone("rad-dino", weights=tmp_path / "half")
    with pytest.raises(SystemExit, match="hf download microsoft/rad-dino"):
        main([str(tmp_path), str(tmp_path), "--features", "rad-dino", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_clip_embeds_the_projected_image_features(tmp_path):
    from transformers import CLIPModel
    folder = save_clip(tmp_path / "clip")
    backbone = feats.load_backbone("clip", weights=folder, device="cpu")
    wide = np.zeros((40, 80), np.float32)
    wide[:, 12:68] = 1.0                                        # white centre (x 20..60); the crop keeps only it
    out = backbone.embed([wide])
    assert out.shape == (1, 16) and "224x224 bicubic" in backbone.resize and "centre crop" in backbone.resize
    mean, std = torch.tensor(bb.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(bb.CLIP_STD).view(1, 3, 1, 1)
    pixels = (torch.ones(1, 3, 224, 224) - mean) / std
    with torch.inference_mode():
        want = CLIPModel.from_pretrained(folder, local_files_only=True).get_image_features(pixel_values=pixels)
    assert torch.allclose(out, getattr(want, "pooler_output", want), atol=1e-5)
    r = evaluate(FidConfig(real=str(write_set(tmp_path / "a", blobs(0, 4))), fake=str(write_set(tmp_path / "b",
                 blobs(1, 4))), features="clip", weights=str(folder), no_cache=True, out="", k=2, device="cpu"))
    assert r["roentgen"] == {"clip": {"fid": r["fid"], "model": "clip_vit_b_32", "n_features": 512}}
    vision = save_clip(tmp_path / "vision", vision_only=True)
    with pytest.raises(feats.WeightsMismatchError, match="without its projection.*CLIPVisionModel"):
        feats.load_backbone("clip", weights=vision)


@needs_torchvision
def test_xrv_densenet_from_a_state_dict(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18
    torch.manual_seed(0)
    net = bb.densenet121_xrv().eval()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, tmp_path / bb.XRV_SAFETENSORS)
    backbone = feats.load_backbone("xrv", weights=tmp_path / bb.XRV_SAFETENSORS, device="cpu")
    img = blobs(2, 1, size=64)[0]
    out = backbone.embed([img])
    assert out.shape == (1, 1024) and "299x299 bicubic" in backbone.resize and "2048 * x - 1024" in backbone.resize
    x = feats.to_square_tensor(img, 299, "bicubic") * 2048 - 1024
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        want = torch.nn.functional.adaptive_avg_pool2d(torch.relu(net.features(x)), 1).flatten(1)
    assert torch.allclose(out, want, atol=1e-4)
    torch.save({**state, "op_threshs": torch.zeros(18)}, tmp_path / "plain.pt")   # a plain .pt state dict loads
    assert torch.allclose(feats.load_backbone("xrv", weights=tmp_path / "plain.pt").embed([img]), out, atol=1e-5)
    torch.save(net, tmp_path / bb.XRV_FILE)                    # the release file: a pickled model
    with pytest.raises(feats.WeightsMismatchError, match="pickled model.*save_file"):
        feats.load_backbone("xrv", weights=tmp_path / bb.XRV_FILE)
    save_file(resnet18().state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(feats.WeightsMismatchError, match="resnet.safetensors: not torchxrayvision's DenseNet-121"):
        feats.load_backbone("xrv", weights=tmp_path / "resnet.safetensors")
    three = {**state, "features.conv0.weight": torch.zeros(64, 3, 7, 7)}
    save_file(three, tmp_path / "imagenet.safetensors")
    with pytest.raises(feats.WeightsMismatchError, match=r"features.conv0.weight is \[64, 3, 7, 7\], expected "
                                                        r"\[64, 1, 7, 7\]"):
        feats.load_backbone("xrv", weights=tmp_path / "imagenet.safetensors")
