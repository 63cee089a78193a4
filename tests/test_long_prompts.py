"""Long-prompt encoding: whole reports condition the image in sampling, generation jobs and training."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cxrcommon.atomic import read_jsonl
from cxrcommon.imageio import read_image, read_png_text
from cxrcommon.prompt_windows import (
    WINDOW_LEN,
    count_tokens,
    encode_windows,
    key_mask,
    pad_pair,
    pipeline_embeds,
    window_ids,
)
from inference.sampler import CXRSampler, Request

BROAD = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "conv_in", "conv_out", "conv1", "conv2"]

SIZE = dict(height=32, width=32)
# Findings as long as a real report's, so the impression starts after CLIP's 77th token.
FINDINGS = ("FINDINGS: The patient is status post median sternotomy and CABG. There is a left-sided dual-lead "
            "pacemaker with leads terminating in the right atrium and right ventricle. The cardiac silhouette is "
            "mildly enlarged. Mediastinal and hilar contours are unremarkable. There is mild pulmonary vascular "
            "congestion without frank interstitial edema. No pneumothorax.")
REPORT = {side: f"{FINDINGS} IMPRESSION: Large {side} pleural effusion." for side in ("left", "right")}


def test_the_impression_starts_past_token_77(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert count_tokens(tok, [FINDINGS])[0].tokens > 77 and count_tokens(tok, [REPORT["left"]])[0].windows == 2


def test_windows_hold_every_token_each_wrapped_in_bos_and_eos(tiny_pipe):
    tok = tiny_pipe.tokenizer
    ids = window_ids(tok, REPORT["left"])
    content = tok(REPORT["left"], add_special_tokens=False)["input_ids"]
    assert ids.shape == (2, 77)
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert ids[0, 1:76].tolist() == content[:75] and ids[0, 76] == tok.eos_token_id
    rest = content[75:]
    assert ids[1, 1:1 + len(rest)].tolist() == rest and ids[1, 1 + len(rest)] == tok.eos_token_id
    assert window_ids(tok, REPORT["left"], max_windows=1).shape == (1, 77)


def test_a_one_window_prompt_is_encoded_and_sampled_exactly_as_before(tiny_pipe):
    """Bitwise: our embedding is the stock pipeline's, and the stock pipeline fed our embeddings
    (prompt_embeds=/negative_prompt_embeds=) makes the very latents it makes from the text."""
    prompt = "Small right pneumothorax."
    ours = CXRSampler(tiny_pipe).encode_prompts([prompt])[0]
    stock = tiny_pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]
    assert ours.shape == (77, stock.shape[-1]) and torch.equal(ours, stock)

    def latents(**kw):
        return tiny_pipe(**kw, **SIZE, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                         generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(latents(prompt=prompt), latents(**pipeline_embeds(tiny_pipe, prompt)))


@pytest.mark.numerics
def test_the_stock_pipeline_cannot_see_the_impression_and_we_can(tiny_pipe):
    """The defect: left and right reports give bitwise the same stock image. Encoded whole they differ,
    and the stock pipeline given our embeddings agrees with our sampler (plain-diffusers users)."""
    from inference.sampler import make_scheduler
    tiny_pipe.scheduler = make_scheduler("ddim", tiny_pipe.scheduler.config)

    def stock(**kw):
        return tiny_pipe(**kw, **SIZE, num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                         generator=torch.Generator().manual_seed(5)).images
    assert torch.equal(stock(prompt=REPORT["left"]), stock(prompt=REPORT["right"]))
    whole = {s: stock(**pipeline_embeds(tiny_pipe, REPORT[s])) for s in REPORT}
    assert (whole["left"] - whole["right"]).abs().max() > 1e-3
    ours = CXRSampler(tiny_pipe).sample_latents([Request(REPORT["left"], 5)], **SIZE, steps=3, guidance=4.0)
    assert torch.allclose(ours, whole["left"], atol=1e-4, rtol=0)  # measured 1.0e-5


def count_calls(module, store):
    return module.register_forward_hook(lambda m, args, kwargs, out: store.append(
        (args[0].shape[0], kwargs["encoder_hidden_states"].shape[1])), with_kwargs=True)


def test_rows_of_different_window_counts_share_a_batch_and_stay_batch_independent(tiny_pipe):
    s = CXRSampler(tiny_pipe)
    reqs = [Request("Clear lungs.", 1), Request(REPORT["left"], 2), Request("Left effusion.", 3),
            Request("Clear lungs.", 4, negative_prompt=FINDINGS + " " + FINDINGS)]  # a 3-window negative
    calls: list = []
    hook = count_calls(s.unet, calls)
    together = s.generate(reqs, **SIZE, steps=2, guidance=4.0)
    hook.remove()
    # per step, one UNet call per embedding length: rows 0+2 (1 window), row 1 (2), row 3 (3); CFG doubles rows
    assert sorted(calls[:3]) == [(2, 2 * WINDOW_LEN), (2, 3 * WINDOW_LEN), (4, WINDOW_LEN)] and len(calls) == 6
    alone = np.concatenate([s.generate([r], **SIZE, steps=2, guidance=4.0) for r in reqs])
    assert np.array_equal(together, alone)  # bitwise, as for one-window batches
    same = s.generate([reqs[0]], **SIZE, steps=2, guidance=4.0)
    assert np.array_equal(same[0], together[0])


def test_padding_the_empty_negative_changes_nothing_but_rounding(tiny_pipe):
    """A long prompt's empty negative is padded with copies of itself: the same keys repeated, so the
    unconditional prediction is unchanged up to float rounding."""
    s = CXRSampler(tiny_pipe)
    cond, empty = s.encode_prompts([REPORT["left"], ""])
    _, padded = pad_pair(cond, empty, empty)
    assert padded.shape == cond.shape
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = s.unet(x, 500, encoder_hidden_states=empty[None]).sample
        b = s.unet(x, 500, encoder_hidden_states=padded[None]).sample
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_training_masks_the_padding_of_shorter_captions(tiny_pipe):
    """In a training batch a one-window caption is padded to the longest; with the key mask it
    conditions the UNet as it does alone, without it the padding would leak in."""
    te, tok, unet = tiny_pipe.text_encoder, tiny_pipe.tokenizer, tiny_pipe.unet
    with torch.no_grad():
        short = encode_windows(te, window_ids(tok, "Left effusion."))
        empty = encode_windows(te, window_ids(tok, ""))
        long = encode_windows(te, window_ids(tok, REPORT["left"]))
    from cxrcommon.prompt_windows import pad_batch
    hidden, mask = pad_batch([short, long], empty)
    assert hidden.shape[1] == 2 * WINDOW_LEN and mask[0].sum() == WINDOW_LEN and mask[1].all()
    assert key_mask(torch.tensor([2, 2]), 2) is None  # equal lengths: no mask, the unmasked code path
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = unet(x[:1], 500, encoder_hidden_states=short[None]).sample
        masked = unet(x, 500, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
        unmasked = unet(x, 500, encoder_hidden_states=hidden).sample
    assert torch.allclose(masked[:1], alone, atol=1e-5, rtol=0)
    assert (unmasked[:1] - alone).abs().max() > 1e-4


def test_generate_records_the_whole_report_and_what_was_encoded(tmp_path, tiny_model_dir, caplog):
    from inference.config import GenerateConfig
    from inference.generate import MANIFEST, generate
    prompts = tmp_path / "reports.txt"
    prompts.write_text(f"{REPORT['left']}\n{REPORT['right']}\nClear lungs.\n")
    cfg = GenerateConfig(prompts=str(prompts), out=str(tmp_path / "whole"), model=str(tiny_model_dir), steps=2,
                         seed=1, batch_size=3, **SIZE)
    with caplog.at_level("INFO", logger="inference.generate"):
        s = generate(dataclasses.replace(cfg, seed=1))
    assert "3 prompt(s): 2 longer than one CLIP window (encoded whole, up to 3 windows), 0 cut" in caplog.text
    rows = {r["prompt_index"]: r for r in read_jsonl(s.out / MANIFEST)}
    assert rows[1]["prompt"] == REPORT["left"] and rows[1]["prompt_windows"] == "2"
    assert "prompt_truncated" not in rows[1] and "prompt_original" not in rows[1]
    left, right = (read_image(s.out / rows[i]["file"]) for i in (1, 2))
    assert np.abs(left - right).max() > 1e-3  # the impression reaches the image

    cut = generate(dataclasses.replace(cfg, out=str(tmp_path / "cut"), max_windows=1))
    rows = {r["prompt_index"]: r for r in read_jsonl(cut.out / MANIFEST)}
    assert rows[1]["prompt"].startswith("IMPRESSION: Large left pleural effusion. FINDINGS: The patient")
    assert rows[1]["prompt_truncated"] == "true" and rows[1]["prompt_original"] == REPORT["left"]
    tags = read_png_text(cut.out / rows[1]["file"])
    assert tags["prompt_original"] == REPORT["left"] and tags["prompt_windows"] == "1"
    assert tags["prompt_truncated"] == "true" and tags["synthetic"] == "true"
    left, right = (read_image(cut.out / rows[i]["file"]) for i in (1, 2))
    assert np.abs(left - right).max() > 1e-3  # even cut to one window, the impression is what was kept
    with pytest.raises(ValueError, match=r"reports.txt:1 has \d+ CLIP tokens, more than 1 window"):
        generate(dataclasses.replace(cfg, out=str(tmp_path / "e"), max_windows=1, clip_policy="error"))


# Findings that fill the first 75-token window exactly: the toy caption after them is the whole second window.
FIRST_WINDOW = FINDINGS.rsplit(" No pneumothorax.", 1)[0]


@pytest.mark.numerics
def test_a_lora_learns_a_finding_after_token_77_only_when_encoded_whole(tmp_path):
    """The toy task with each caption behind 75 tokens of report text: cut at 77 tokens the two captions
    are one and the LoRA cannot tell them apart; in windows it learns each pattern. The LoRA then loads
    in plain diffusers, which conditions on the same embeddings through prompt_embeds=.

    Issue #19: at learning rate 1e-2 (and with the caption behind 81 tokens) the toy either learned or
    ignored the caption entirely (own/other 0.23 or 1.00) depending on the training seed, the thread
    count and the CPU's vector width. At 3e-3 with the caption filling the second window it learns on
    every run measured. Measured on the 4 generated latents per caption, as `sep` (mean projection on
    the left-minus-right pattern direction, left minus right; 1.0 = the two patterns exactly, 0 = the
    caption is ignored) and `worst` (the least projection of any one image on its own side, 0.5 = its
    pattern), training seeds 0/1/2 (finetune seed; toy model seed 0):
      full route (torch 2.14.1+cu130), AVX-512:         sep 2.09 / 2.18 / 1.21, worst 0.525 / 0.507 / 0.549
      full route, AVX2 only (ATEN_CPU_CAPABILITY=avx2):  sep 2.09 / 2.22 / 1.21, worst 0.523 / 0.507 / 0.552
      cpu route (torch 2.13.0+cpu), AVX-512:            sep 2.09 / 2.18 / 1.21, worst 0.525 / 0.507 / 0.549
      cpu route, AVX2 only:                             sep 2.09 / 2.22 / 1.21, worst 0.523 / 0.507 / 0.552
    (own/other mean squared distance, the old measure, 0.15-0.32; it also counts overshoot past the pattern
    as a miss, so it is no longer the assertion). The bounds below are half the worst case measured."""
    from diffusers import StableDiffusionPipeline

    from finetune.config import TrainConfig
    from finetune.toy import CAPTIONS, pattern, save_toy_model, toy_data
    from finetune.train import train
    r = 16
    model = save_toy_model(tmp_path / "toy", resolution=r)
    data = toy_data(8, r)
    data.captions = [f"{FIRST_WINDOW} {c}" for c in data.captions]
    data.val_captions = [f"{FIRST_WINDOW} {c}" for c in data.val_captions]
    long = [f"{FIRST_WINDOW} {c}" for c in CAPTIONS]
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert count_tokens(pipe.tokenizer, [FIRST_WINDOW])[0].tokens == WINDOW_LEN - 2  # the caption starts at token 77
    with torch.no_grad():
        x = {c: torch.from_numpy(pattern(c, r))[None, None].expand(1, 3, r, r) * 2 - 1 for c in CAPTIONS}
        target = {c: pipe.vae.encode(x[c]).latent_dist.mean * pipe.vae.config.scaling_factor for c in CAPTIONS}

    def trained_latents(max_windows: int, steps: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"w{max_windows}"
        train(TrainConfig(model=str(model), output_dir=str(out), resolution=r, train_batch_size=8, learning_rate=3e-3,
                          lr_warmup_steps=0, checkpointing_steps=0, validation_steps=0, validation_seeds=[],
                          report_to="none", device="cpu", val_fraction=0.0, lora_rank=16, lora_alpha=32,
                          max_train_steps=steps, max_windows=max_windows, lora_target_modules=BROAD), data)
        pipe.load_lora_weights(out)
        lat = {c: pipe(**pipeline_embeds(pipe, text, max_windows=max_windows), height=r, width=r,
                       num_inference_steps=10, guidance_scale=3.0, output_type="latent", num_images_per_prompt=4,
                       generator=torch.Generator().manual_seed(0)).images for c, text in zip(CAPTIONS, long)}
        pipe.unload_lora_weights()
        return lat

    left, right = (target[c] for c in CAPTIONS)
    direction, middle = left - right, (left + right) / 2

    def side(lat: torch.Tensor) -> torch.Tensor:  # per image: +0.5 = the left pattern, -0.5 = the right one
        return ((lat - middle) * direction).flatten(1).sum(1) / direction.pow(2).sum()

    lat = trained_latents(3, 160)
    on_left, on_right = side(lat[CAPTIONS[0]]), side(lat[CAPTIONS[1]])
    sep, worst = (on_left.mean() - on_right.mean()).item(), min(on_left.min().item(), -on_right.max().item())
    assert sep > 0.6 and worst > 0.2, (sep, on_left, on_right)  # each caption makes ITS pattern, every image
    cut = trained_latents(1, 10)
    assert torch.equal(cut[CAPTIONS[0]], cut[CAPTIONS[1]])  # cut at 77 tokens the captions are one


def test_a_negative_longer_than_the_prompt_does_not_dilute_it(tiny_pipe):
    """The prompt is padded to the negative's length; its padding is masked, so the conditional
    prediction is the prompt's own (without the mask it would attend to the empty prompt too)."""
    s = CXRSampler(tiny_pipe)
    (group,) = s.embedding_groups([Request("Left effusion.", 1, negative_prompt=REPORT["right"])], cfg=True)
    assert group.cond.shape[1] == 2 * WINDOW_LEN and group.uncond_mask is None
    assert group.cond_mask is not None and group.cond_mask.sum() == WINDOW_LEN
    alone = s.encode_prompts(["Left effusion."])[0][None]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        own = s.unet(x, 500, encoder_hidden_states=alone).sample
        masked = s.guided_noise(x, torch.tensor(500), group.cond, None, 1.0, cond_mask=group.cond_mask)
        diluted = s.guided_noise(x, torch.tensor(500), group.cond, None, 1.0)
    assert torch.allclose(masked, own, atol=1e-5, rtol=0) and (diluted - own).abs().max() > 1e-4
    # a long prompt with the usual empty negative needs no mask at all (repeated keys only)
    (plain,) = s.embedding_groups([Request(REPORT["left"], 1)], cfg=True)
    assert plain.cond_mask is None and plain.uncond_mask is None


def test_compiled_calls_are_padded_only_to_a_shape_of_the_same_text_length(tiny_pipe):
    s = CXRSampler(tiny_pipe)
    seen: list = []

    def stub(x, t, encoder_hidden_states, encoder_attention_mask=None, return_dict=False):
        seen.append((x.shape[0], encoder_hidden_states.shape[1]))
        return (x,)
    s.unet, s.compiled = stub, True
    s._compiled_rows = {(16, (WINDOW_LEN, False, True)): None}
    for rows, length, cfg in ((10, WINDOW_LEN, True), (5, 2 * WINDOW_LEN, True), (7, WINDOW_LEN, True),
                              (8, WINDOW_LEN, False)):
        out = s._unet_rows(torch.zeros(rows, 4, 2, 2), torch.tensor(1), torch.zeros(rows, length, 32), cfg=cfg)
        assert out.shape[0] == rows
    # 10 rows fill a 16-row graph; a 2-window text never rides a 1-window graph; 7 rows would more than
    # double the work; a conditional-only call (guidance interval) never rides a CFG graph
    assert seen == [(16, WINDOW_LEN), (5, 2 * WINDOW_LEN), (7, WINDOW_LEN), (8, WINDOW_LEN)]


def test_a_folder_started_before_windows_resumes_when_every_prompt_fits_one(tmp_path, tiny_model_dir):
    import json

    from inference.config import GenerateConfig
    from inference.generate import SETTINGS, SettingsChangedError, generate
    prompts = tmp_path / "p.txt"
    prompts.write_text("Clear lungs.\nLeft effusion.\n")
    cfg = GenerateConfig(prompts=str(prompts), out=str(tmp_path / "o"), model=str(tiny_model_dir), steps=1, **SIZE)
    generate(cfg)
    settings = json.loads((tmp_path / "o" / SETTINGS).read_text())
    del settings["max_windows"]  # as written by the version before long prompts
    (tmp_path / "o" / SETTINGS).write_text(json.dumps(settings))
    assert generate(cfg).skipped == 2  # same images as then: resumed, nothing remade
    assert json.loads((tmp_path / "o" / SETTINGS).read_text())["max_windows"] == 3  # and now recorded
    (tmp_path / "o" / SETTINGS).write_text(json.dumps(settings))
    prompts.write_text(f"Clear lungs.\nLeft effusion.\n{REPORT['left']}\n")  # now one prompt needs 2 windows
    with pytest.raises(SettingsChangedError, match="max_windows: None -> 3"):
        generate(cfg)


@pytest.mark.numerics
def test_mixed_caption_lengths_train_the_same_cached_and_uncached_and_the_cache_follows_max_windows(tmp_path):
    from finetune.config import TrainConfig
    from finetune.toy import CAPTIONS, save_toy_model, toy_data
    from finetune.train import train
    model = save_toy_model(tmp_path / "toy", resolution=16)
    data = toy_data(4, 16)
    data.captions = [CAPTIONS[0], f"{FINDINGS} {CAPTIONS[1]}", CAPTIONS[0], f"{FINDINGS} {FINDINGS} {CAPTIONS[1]}"]

    def run(name: str, **kw):
        return train(TrainConfig(model=str(model), output_dir=str(tmp_path / name), resolution=16, train_batch_size=4,
                                 max_train_steps=3, lr_warmup_steps=0, checkpointing_steps=0, validation_steps=0,
                                 validation_seeds=[], report_to="none", device="cpu", val_fraction=0.0,
                                 caption_dropout=0.3, cache_dir=str(tmp_path / "cache"), **kw), data).losses
    plain = run("plain")
    assert np.allclose(run("cached", cache_text=True), plain, rtol=1e-5, atol=1e-6)
    one = run("one", max_windows=1)
    assert not np.allclose(one, plain, rtol=1e-5, atol=1e-6)  # cut captions condition differently ...
    assert np.allclose(run("one-cached", max_windows=1, cache_text=True), one, rtol=1e-5, atol=1e-6)  # ... cached too
    assert len(list((tmp_path / "cache").glob("text-*"))) == 2  # one cache per window layout, never mixed
