"""`python -m finetune.train --config configs/embedded.yaml` reaches the embedded-model recipe."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_train_dispatches_yaml_recipe_to_its_module():
    from finetune import embedded, train
    from phantoms.recipe import EmbeddedConfig
    argv = ["--config", str(ROOT / "configs" / "embedded.yaml"), "--vae-steps", "3"]
    with mock.patch.object(embedded, "run", side_effect=lambda cfg: cfg) as run:
        cfg = train.main(argv)
    run.assert_called_once()
    assert isinstance(cfg, EmbeddedConfig) and cfg.vae_steps == 3 and cfg.out == "models/embedded"


def test_unknown_recipe_is_refused(tmp_path):
    from finetune import train
    bad = tmp_path / "r.yaml"
    bad.write_text("recipe: nonsense\n")
    with pytest.raises(SystemExit, match="unknown recipe 'nonsense'"):
        train.main(["--config", str(bad)])


def test_plain_training_config_has_no_recipe():
    from finetune import train
    assert train._recipe(["--config", str(ROOT / "configs" / "finetune_tiny.yaml")]) is None
