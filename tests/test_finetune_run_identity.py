"""A checkpoint records the run identity (processes, batch size, accumulation, seed) that fixes the data
position of a step, and resuming with another identity is refused before any step runs."""
from __future__ import annotations

import dataclasses
import json

import pytest

from cxrcommon.errors import UserError
from finetune.config import TrainConfig
from finetune.toy import save_toy_model, toy_data
from finetune.train import train

R = 16


def test_checkpoint_records_the_run_identity_and_resume_checks_it(tmp_path):
    model = save_toy_model(tmp_path / "model", resolution=R)
    cfg = TrainConfig(model=str(model), output_dir=str(tmp_path / "run"), resolution=R, train_batch_size=2,
                      max_train_steps=2, checkpointing_steps=2, validation_steps=0, validation_seeds=[0],
                      validation_inference_steps=1, lr_warmup_steps=0, report_to="none", device="cpu",
                      val_fraction=0.0, lora_rank=4, seed=5)
    train(cfg, toy_data(4, R, n_val=0))
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert {k: state[k] for k in ("world", "train_batch_size", "accum", "seed")} == \
        {"world": 1, "train_batch_size": 2, "accum": 1, "seed": 5}
    other = dataclasses.replace(cfg, train_batch_size=4, resume="latest", max_train_steps=4)
    with pytest.raises(UserError, match=r"checkpoint-2 was made with .*'train_batch_size': 2.* this run has "
                                        r".*'train_batch_size': 4.*Resume with the same values"):
        train(other, toy_data(4, R, n_val=0))
