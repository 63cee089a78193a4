"""Features built on torchvision / torch-fidelity refuse with the fix when the cpu torch route left them out.

Absence is simulated with sys.modules[name] = None, which makes both find_spec and import fail, so these
tests run (and can fail) on either route."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cxrcommon.imageio import write_png
from cxrcommon.optional import MissingPackageError, require


@pytest.fixture
def without(monkeypatch):
    def hide(*names: str) -> None:
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_require_names_feature_packages_and_fix(without):
    require("anything", "torch")                        # present: no error
    without("torchvision")
    with pytest.raises(MissingPackageError) as err:
        require("Some feature", "torch", "torchvision")
    msg = str(err.value)
    assert msg.startswith("Some feature needs torchvision,") and "TORCH_ROUTE=full bash scripts/setup.sh" in msg


def test_sam_without_torchvision(without, tmp_path):
    from textremoval.clean import main
    from textremoval.segment import load_sam
    ckpt = tmp_path / "sam.pth"
    torch.save({}, ckpt)
    without("torchvision", "segment_anything")
    with pytest.raises(MissingPackageError, match="--sam-checkpoint"):
        load_sam(ckpt)
    write_png(tmp_path / "in" / "a.png", np.zeros((32, 32), np.float32))
    with pytest.raises(SystemExit, match="TORCH_ROUTE=full"):
        main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--sam-checkpoint", str(ckpt)])


def test_fid_backbones_without_their_packages(without, tmp_path):
    from eval import features
    from eval.fid import main
    weights = tmp_path / features.INCEPTION_FILE
    torch.save({}, weights)
    without("torch_fidelity")
    with pytest.raises(MissingPackageError, match="torch_fidelity"):
        features.load_backbone("inception", inception_weights=weights)
    without("torchvision")
    with pytest.raises(MissingPackageError, match="--features xrv"):   # before `pip install torchxrayvision`
        features.load_backbone("xrv")
    with pytest.raises(SystemExit, match="TORCH_ROUTE=full"):
        main(["--real", str(tmp_path), "--fake", str(tmp_path), "--inception-weights", str(weights),
              "--out", str(tmp_path / "o")])


def test_augment_without_torchvision(without):
    from eval.augment import train_classifier
    without("torchvision")
    with pytest.raises(MissingPackageError, match="eval.augment"):
        train_classifier(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), 2)
