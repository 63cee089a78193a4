"""Speed levers: the CPU-visible half of the GPU defaults (issue #15) and the trainer's sync-free step log."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cxrcommon.device import persistent_compile_cache, with_index
from finetune.steplog import PendingLosses, Throughput
from inference.config import GenerateConfig
from inference.sampler import CXRSampler, Request

SIZE = dict(height=32, width=32)
REQS = [Request("Left effusion.", 1), Request("Clear lungs.", 2)]
TOL = 1e-5  # compiled (dynamo eager / aot_eager backends) vs eager images, on [0, 1] pixels, fp32 CPU


def test_generate_defaults_compile_auto_and_leave_channels_last_off_on_cpu(tiny_pipe):
    cfg = GenerateConfig()
    assert (cfg.compile, cfg.channels_last, cfg.fuse_qkv) == ("auto", "auto", False)
    s = CXRSampler(tiny_pipe, compile=cfg.compile, channels_last=cfg.channels_last)
    assert not s.compiled and s._compile_after_s is None  # CPU: auto never compiles
    conv = next(m for m in s.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)
    s.generate(REQS, **SIZE, steps=2, guidance=4.0)
    assert not s.compiled


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_auto_compiles_after_the_eager_budget_and_pads_a_partial_batch(tiny_pipe, backend, caplog):
    """compile=auto samples eagerly until `compile_after_s` of sampling, then compiles; a smaller later
    batch is zero-padded to the compiled shape instead of compiling another one; images agree with eager."""
    eager = CXRSampler(tiny_pipe)
    ref_pair = eager.generate(REQS, **SIZE, steps=3, guidance=4.0)
    ref_one = eager.generate(REQS[:1], **SIZE, steps=3, guidance=4.0)
    torch._dynamo.reset()
    s = CXRSampler(tiny_pipe, compile="auto", compile_backend=backend, compile_after_s=0.0)
    assert not s.compiled
    first = s.generate(REQS, **SIZE, steps=3, guidance=4.0)  # eager; its time reaches the 0 s budget
    assert s.compiled and isinstance(s.unet, torch._dynamo.eval_frame.OptimizedModule)
    rows: list[int] = []
    hook = s.unet._orig_mod.register_forward_hook(lambda m, a, kw, out: rows.append(a[0].shape[0]), with_kwargs=True)
    with caplog.at_level(logging.INFO, logger="inference.sampler"):
        pair = s.generate(REQS, **SIZE, steps=3, guidance=4.0)
        one = s.generate(REQS[:1], **SIZE, steps=3, guidance=4.0)
    hook.remove()
    assert set(rows) == {4}  # CFG doubles 2 rows to 4; the single image's 2 rows were padded to 4
    assert list(s._compiled_rows) == [(4, (77, False, True))]  # 4 rows, one text window, unmasked, CFG
    assert sum("torch.compile of the UNet for 4 rows" in r.message for r in caplog.records) == 1
    np.testing.assert_array_equal(first, ref_pair)
    np.testing.assert_allclose(pair, ref_pair, atol=TOL, rtol=0)
    np.testing.assert_allclose(one, ref_one, atol=TOL, rtol=0)


def test_with_index_and_compile_cache(monkeypatch, tmp_path):
    assert with_index("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert with_index("cuda") == torch.device("cuda", 3)  # torch 2.11's set_device refuses a bare "cuda"
    assert with_index("cuda:1") == torch.device("cuda", 1)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("SYNTHCXR_CACHE", str(tmp_path))
    assert persistent_compile_cache() == tmp_path / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert persistent_compile_cache() == tmp_path / "mine"  # a user's choice wins


def test_pending_losses_read_in_one_go_and_stop_at_the_first_non_finite():
    p = PendingLosses(accum=2)
    p.add(1, [torch.tensor([1.0]), torch.tensor([3.0])], lr=0.1)
    p.add(2, [torch.tensor([2.0]), torch.tensor([2.0])], lr=0.2)
    assert [(d.step, d.loss, d.lr) for d in p.flush(lambda *a: AssertionError(a))] == [(1, 2.0, 0.1), (2, 2.0, 0.2)]
    assert p.flush(lambda *a: AssertionError(a)) == []
    p.add(3, [torch.tensor([1.0]), torch.tensor([1.0])], lr=0.1)
    p.add(4, [torch.tensor([1.0]), torch.tensor([float("nan")])], lr=0.1)
    p.add(5, [torch.tensor([float("inf")]), torch.tensor([1.0])], lr=0.1)
    with pytest.raises(ValueError, match=r"step 3 micro 1"):  # 0-based step 3 = optimizer step 4
        p.flush(lambda losses, step, micro: ValueError(f"step {step} micro {micro} {losses.tolist()}"))


def test_throughput_times_warmup_apart():
    syncs: list[int] = []
    clock = Throughput(2, lambda: syncs.append(1))
    clock.step(8)
    assert clock.rates()[1] == 0.0  # still warming up: no steady rate yet
    clock.step(8)
    assert clock.warmup_s > 0 and syncs  # the warm-up boundary waited for the device
    for _ in range(3):
        clock.step(8)
    overall, steady = clock.rates()
    assert clock.images == 40 and steady > 0 and overall > 0
    assert clock.since_last() > 0 and Throughput(0, lambda: None).warmup_s == 0.0


def test_trainer_reads_losses_only_at_log_points(monkeypatch, tmp_path):
    from finetune.config import TrainConfig
    from finetune.toy import save_toy_model, toy_data
    from finetune.train import train

    reads: list[int] = []
    real = PendingLosses.flush

    def spy(self, on_bad):
        out = real(self, on_bad)
        reads.append(len(out))
        return out
    monkeypatch.setattr(PendingLosses, "flush", spy)
    model = save_toy_model(tmp_path / "toy", resolution=16)
    cfg = TrainConfig(model=str(model), output_dir=str(tmp_path / "run"), resolution=16, train_batch_size=2,
                      max_train_steps=6, logging_steps=3, timing_warmup_steps=2, lr_warmup_steps=0,
                      checkpointing_steps=0, validation_steps=0, validation_seeds=[], report_to="none",
                      device="cpu", val_fraction=0.0)
    result = train(cfg, toy_data(4, 16))
    assert [n for n in reads if n] == [3, 3]  # two reads of three steps each, not one sync per step
    assert len(result.losses) == 6 and np.isfinite(result.losses).all()
    assert result.warmup_steps == 2 and result.warmup_s > 0 and result.steady_images_per_s > 0
