"""CXRSampler on the tiny SD-2 model: CFG batching, agreement with diffusers, seeds, translation modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.sampler import SCHEDULERS, CXRSampler, Request, Translation, make_scheduler

SIZE = dict(height=32, width=32)  # the tiny VAE downsamples 2x: 16x16 latents


@pytest.fixture()
def sampler(tiny_pipe):
    return CXRSampler(tiny_pipe, scheduler="ddim")


def count_calls(module, store):
    return module.register_forward_hook(lambda m, args, kwargs, out: store.append(args[0].shape[0]),
                                        with_kwargs=True)


def test_cfg_in_one_unet_call_equals_two_call_reference(sampler):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    cond = torch.stack(sampler.encode_prompts(["Left effusion.", "Clear lungs.", "Left effusion."]))
    uncond = torch.stack(sampler.encode_prompts(["", "", "text"]))
    t = sampler.scheduler.timesteps[0] if len(sampler.scheduler.timesteps) else torch.tensor(500)
    calls: list[int] = []
    hook = count_calls(sampler.unet, calls)
    with torch.inference_mode():
        guided = sampler.guided_noise(x, t, cond, uncond, guidance=4.0)
    hook.remove()
    assert calls == [6]  # one call with both halves of all three rows
    with torch.inference_mode():
        e_u = sampler.unet(x, t, encoder_hidden_states=uncond).sample
        e_c = sampler.unet(x, t, encoder_hidden_states=cond).sample
    reference = e_u + 4.0 * (e_c - e_u)
    assert torch.allclose(guided, reference, atol=1e-5, rtol=0)
    assert (guided - e_c).abs().max() > 1e-3  # guidance did something


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_matches_stock_pipeline_latents(tiny_pipe, rescale):
    """Same seed, steps, guidance (and rescale) as StableDiffusionPipeline -> the same latents."""
    ours = CXRSampler(tiny_pipe, scheduler="ddim")
    lat = ours.sample_latents([Request("Small right pneumothorax.", 7)], **SIZE, steps=4, guidance=4.0,
                              guidance_rescale=rescale)
    tiny_pipe.scheduler = make_scheduler("ddim", tiny_pipe.scheduler.config)
    stock = tiny_pipe("Small right pneumothorax.", **SIZE, num_inference_steps=4, guidance_scale=4.0,
                      guidance_rescale=rescale, generator=torch.Generator().manual_seed(7),
                      output_type="latent").images
    assert torch.allclose(lat, stock, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a"])  # euler-a draws fresh noise at every step
def test_pixels_do_not_depend_on_batch_size(tiny_pipe, scheduler):
    s = CXRSampler(tiny_pipe, scheduler=scheduler)
    reqs = [Request(p, seed) for p, seed in [("A.", 1), ("B.", 2), ("A.", 3), ("C.", 4)]]
    together = s.generate(reqs, **SIZE, steps=3, guidance=4.0)
    alone = np.concatenate([s.generate([r], **SIZE, steps=3, guidance=4.0) for r in reversed(reqs)])[::-1]
    assert np.array_equal(together, alone)  # bitwise: no op's per-row result depends on the batch size
    assert np.abs(together[0] - together[2]).max() > 1e-3  # same prompt, other seed -> other image


def test_each_unique_prompt_is_encoded_once(sampler):
    calls: list[int] = []
    hook = count_calls(sampler.pipe.text_encoder, calls)
    reqs = [Request("A.", 1), Request("B.", 2), Request("A.", 3, "text"), Request("B.", 4)]
    sampler.generate(reqs, **SIZE, steps=2, guidance=4.0)
    assert len(calls) == 4 and set(calls) == {1}  # "A.", "B.", "" and "text"
    sampler.generate(reqs, **SIZE, steps=2, guidance=4.0)
    hook.remove()
    assert len(calls) == 4  # all cached


def test_guidance_interval_skips_the_unconditional_half(sampler):
    calls: list[int] = []
    hook = count_calls(sampler.unet, calls)
    reqs = [Request("A.", 1), Request("B.", 2)]
    full = sampler.generate(reqs, **SIZE, steps=4, guidance=4.0)
    assert calls == [4] * 4
    calls.clear()
    part = sampler.generate(reqs, **SIZE, steps=4, guidance=4.0, guidance_interval=(0.25, 0.75))
    assert calls == [2, 4, 4, 2]
    calls.clear()
    sampler.generate(reqs, **SIZE, steps=4, guidance=1.0)
    assert calls == [2] * 4  # guidance 1: no unconditional pass at all
    hook.remove()
    assert np.abs(full - part).max() > 1e-4


def test_schedulers_swap_by_name(tiny_pipe):
    for name, (cls_name, _) in SCHEDULERS.items():
        s = make_scheduler(name, tiny_pipe.scheduler.config)
        assert type(s).__name__ == cls_name and s.config.beta_schedule == "scaled_linear"
    assert make_scheduler("dpmpp-karras", tiny_pipe.scheduler.config).config.use_karras_sigmas
    with pytest.raises(ValueError, match="choose one of ddim"):
        make_scheduler("nope", tiny_pipe.scheduler.config)
    s = CXRSampler(tiny_pipe, scheduler="dpmpp")
    img = s.generate([Request("A.", 1)], **SIZE, steps=3, guidance=4.0)
    assert img.shape == (1, 32, 32) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1


def test_compiled_unet_gives_the_eager_images(tiny_pipe):
    """`compile` wraps the UNet in torch.compile (the GPU lever); the eager backend traces the same graph
    through dynamo without minutes of inductor codegen, so CI checks the wiring and the numbers."""
    reqs = [Request("Left effusion.", 1), Request("Clear lungs.", 2)]
    eager = CXRSampler(tiny_pipe).generate(reqs, **SIZE, steps=3, guidance=4.0)
    torch._dynamo.reset()
    compiled = CXRSampler(tiny_pipe, compile="default", compile_backend="eager")
    assert isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.native_size == 64  # config reads go through the wrapper
    np.testing.assert_allclose(compiled.generate(reqs, **SIZE, steps=3, guidance=4.0), eager, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="compile must be one of off"):
        CXRSampler(tiny_pipe, compile="fast")


def init_image():
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    return (0.2 + 0.6 * yy * xx).astype(np.float32)


def test_img2img_strength_zero_returns_the_input_and_more_strength_changes_more(sampler):
    base = init_image()
    reqs = [Request("Effusion.", 1), Request("Effusion.", 2)]
    same = sampler.generate(reqs, **SIZE, steps=4, guidance=4.0, translation=Translation(base, 0.0))
    assert np.array_equal(same, np.stack([base, base]))
    weak = sampler.generate(reqs, **SIZE, steps=4, guidance=4.0, translation=Translation(base, 0.25))
    strong = sampler.generate(reqs, **SIZE, steps=4, guidance=4.0, translation=Translation(base, 1.0))
    again = sampler.generate(reqs, **SIZE, steps=4, guidance=4.0, translation=Translation(base, 0.25))
    assert np.array_equal(weak, again)
    assert 0 < np.abs(weak - base).mean() < np.abs(strong - base).mean()
    with pytest.raises(ValueError, match="between 0 and 1"):
        Translation(base, 1.5)


@pytest.mark.parametrize("inpainting_unet", [False, True])
def test_inpainting_changes_only_the_masked_region(inpainting_unet, tiny_pipe):
    from cxrcommon.tiny import tiny_pipeline
    s = CXRSampler(tiny_pipeline(inpainting=True) if inpainting_unet else tiny_pipe)
    assert s.inpainting_unet == inpainting_unet
    base = init_image()
    mask = np.zeros_like(base)
    mask[8:20, 10:24] = 1.0
    out = s.generate([Request("Nodule.", 3)], **SIZE, steps=4, guidance=4.0,
                     translation=Translation(base, 1.0, mask))[0]
    assert np.array_equal(out[mask < 0.5], base[mask < 0.5])
    assert np.abs(out[mask >= 0.5] - base[mask >= 0.5]).mean() > 1e-2


def test_an_inpainting_model_needs_a_mask(tmp_path, tiny_inpaint_dir):
    from inference.config import GenerateConfig
    from inference.generate import generate
    prompts = tmp_path / "p.txt"
    prompts.write_text("Nodule.\n")
    with pytest.raises(ValueError, match="inpainting model.*--mask"):
        generate(GenerateConfig(prompts=str(prompts), out=str(tmp_path / "o"), model=str(tiny_inpaint_dir),
                                steps=1, height=32, width=32))
