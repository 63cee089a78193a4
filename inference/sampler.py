"""Batched classifier-free-guidance sampling on diffusers' components.

`CXRSampler` holds the unet, vae, text encoder, tokenizer and a diffusers scheduler of a loaded
StableDiffusionPipeline and composes them the way the stock pipeline does, with three differences
that matter for dataset generation: rows of different prompts share one batch, each prompt is encoded
once (LRU cache), and each image draws its noise from its own seeded generator, so its pixels do not
depend on which batch it landed in. The conditional and unconditional halves go through ONE UNet call.
Attention uses PyTorch SDPA (diffusers' default `AttnProcessor2_0`)."""
from __future__ import annotations

import collections
import hashlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrcommon.prompt_windows import encode_windows, key_mask, n_windows, pad_pair, window_ids

log = logging.getLogger(__name__)

# name -> (diffusers class, extra config); swapped in with `from_config` on the model's scheduler config
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


# torch.compile modes for the UNet: reduce-overhead and max-autotune add CUDA graphs (on GPUs), max-autotune also
# tunes GEMMs and convolutions; max-autotune-no-cudagraphs tunes without graphs; auto: see COMPILE_AFTER_S
COMPILE_MODES = ("off", "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# compile="auto" on CUDA samples eagerly until this many seconds of sampling have run, then compiles (mode
# default) for the rest of the job: a job too small to repay the compile never pays it, and a large one loses
# at most this much sampling at the eager speed. 90 s = the measured cold compile of the SD 2.1-base UNet on
# an H100 (docs/BENCHMARKS.md), so no job pays more than twice the best choice made knowing its size.
COMPILE_AFTER_S = 90.0


def make_scheduler(name: str, config: Any) -> Any:
    """A diffusers scheduler by short name, built from the model's own scheduler config."""
    import diffusers
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


class SharedTimestep(torch.nn.Module):
    """The UNet's timestep projection, computed on ONE row when the whole batch shares its timestep.

    diffusers expands a scalar timestep to the batch size, so the time-embedding MLP runs as a GEMM with
    M = batch rows, and a CPU GEMM rounds differently for different M. That was the one op in the UNet
    whose per-row result depended on the batch size; with a single row the embedding broadcasts over
    the batch (the resnets add it with broadcasting) and an image's pixels are bitwise the same in any
    batch. An expanded scalar has stride 0, so the check needs no device sync."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim == 1 and timesteps.shape[0] > 1 and timesteps.stride(0) == 0:
            timesteps = timesteps[:1]
        return self.inner(timesteps)


def derive_seed(base: int, prompt_index: int, k: int) -> int:
    """Seed of image k of prompt i: a hash of (base, i, k), independent of batching and process count."""
    digest = hashlib.sha256(f"synthcxr/{base}/{prompt_index}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Request:
    """One image to make."""
    prompt: str
    seed: int
    negative_prompt: str = ""


@dataclass
class TextGroup:
    """Rows of a batch whose text embeddings share one length: one UNet call."""
    rows: torch.Tensor | None            # indices into the batch; None = every row
    cond: torch.Tensor                   # (B, L, D)
    uncond: torch.Tensor | None          # (B, L, D); None without CFG
    cond_mask: torch.Tensor | None       # (B, L) keys each row may attend to; None = all
    uncond_mask: torch.Tensor | None


@dataclass
class Translation:
    """Start from a real image: SDEdit img2img (`strength`), optionally only inside `mask` (inpainting).

    `image` and `mask` are float32 H x W in [0, 1] at the output size; mask 1 = regenerate."""
    image: np.ndarray
    strength: float = 0.6
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")
        if self.mask is not None and self.mask.shape != self.image.shape:
            raise ValueError(f"mask shape {self.mask.shape} differs from image shape {self.image.shape}")


class CXRSampler:
    """unet + vae + text encoder + tokenizer + scheduler, composed for batched CFG sampling."""

    def __init__(self, pipe: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 scheduler: str = "ddim", channels_last: bool | str = "auto", fuse_qkv: bool = False,
                 compile: str = "off", compile_backend: str = "inductor", compile_after_s: float | None = None,
                 decode_batch: int = 1, cache_size: int = 1024):
        """`compile_after_s`: with compile="auto", the eager sampling seconds before compiling; None = the
        device's default (`COMPILE_AFTER_S` on CUDA, never elsewhere)."""
        self.device, self.dtype = torch.device(device), dtype
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):  # cast only if needed (diffusers warns on casts)
            if module.dtype == dtype:
                module.to(self.device)
            else:
                module.to(self.device, dtype)
        self.unet, self.vae, self.tokenizer, self.pipe = pipe.unet, pipe.vae, pipe.tokenizer, pipe
        if not isinstance(self.unet.time_proj, SharedTimestep):
            self.unet.time_proj = SharedTimestep(self.unet.time_proj)
        self.use_scheduler(scheduler)
        if str(channels_last).lower() not in ("auto", "true", "false"):
            raise ValueError(f"channels_last must be auto, true or false, got {channels_last!r}")
        if str(channels_last).lower() == "auto":  # measured slower on an H100 (-16 %) and on CPU; untimed elsewhere
            channels_last = self.device.type not in ("cpu", "cuda")
        if str(channels_last).lower() == "true":
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if fuse_qkv:
            self.unet.fuse_qkv_projections()
        if compile not in COMPILE_MODES:  # YAML reads a bare `off` as false, hence the hint
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r} "
                             f"(in YAML quote it: compile: \"off\")")
        self.compiled, self._compile_backend = False, compile_backend
        self._compiled_rows: dict[tuple, None] = {}  # (rows, (text length, masked, cfg)) compiled so far
        self._eager_s = 0.0  # sampling seconds run eagerly so far (compile="auto")
        if compile_after_s is None and self.device.type == "cuda":
            compile_after_s = COMPILE_AFTER_S
        self._compile_after_s = compile_after_s if compile == "auto" else None
        if compile not in ("off", "auto"):
            self._compile_unet(compile)
        self.decode_batch = max(1, decode_batch)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._cache_size = cache_size

    def _compile_unet(self, mode: str) -> None:
        """Wrap the UNet in torch.compile (traced lazily, once per batch shape), with a persistent cache."""
        from cxrcommon.device import persistent_compile_cache

        log.info("torch.compile of the UNet: mode %s, backend %s, cache %s", mode, self._compile_backend,
                 persistent_compile_cache())
        self.unet = torch.compile(self.unet, mode=mode, backend=self._compile_backend, dynamic=False)
        self.compiled = True

    def _count_eager(self, seconds: float) -> None:
        """compile="auto": add a batch's eager time; compile once the total reaches `COMPILE_AFTER_S`."""
        if self._compile_after_s is None or self.compiled:
            return
        self._eager_s += seconds
        if self._eager_s >= self._compile_after_s:
            log.info("compile auto: %.0f s of eager sampling so far, compiling for the rest of the job", self._eager_s)
            self._compile_unet("default")

    def _unet_rows(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor | None = None,
                   cfg: bool = True) -> torch.Tensor:
        """The UNet's prediction (`mask`: the text keys each row may attend to, None = all; `cfg`: both
        guidance halves are in `x`). Compiled, a batch smaller than a compiled shape of the same kind (text
        length, mask, CFG) is zero-padded to it, at most doubling the work: a job's last, partial batch would
        otherwise pay a whole new compile, while conditional-only steps (guidance interval) never ride a
        CFG-sized graph. Each new shape's first call, which compiles it, is timed and logged."""
        if not self.compiled:
            return self.unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask, return_dict=False)[0]
        rows, kind = x.shape[0], (emb.shape[1], mask is not None, cfg)
        fit = min((r for r, k in self._compiled_rows if k == kind and rows <= r <= 2 * rows), default=rows)
        if fit > rows:
            x, emb = (torch.cat([a, a.new_zeros((fit - rows, *a.shape[1:]))]) for a in (x, emb))
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((fit - rows, mask.shape[1]))])
        start = time.perf_counter()
        pred = self.unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask, return_dict=False)[0]
        if (fit, kind) not in self._compiled_rows:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            log.info("torch.compile of the UNet for %d rows x %d text tokens%s: %.1f s (compile + first call)",
                     fit, kind[0], " (masked)" if kind[1] else "", time.perf_counter() - start)
            self._compiled_rows[(fit, kind)] = None
        return pred[:rows]

    @classmethod
    def load(cls, model: str | None = None, *, lora: str | None = None, lora_scale: float = 1.0,
             device: str = "auto", precision: str = "auto", **kwargs: Any) -> "CXRSampler":
        """Load a pipeline through cxrcommon (safetensors, offline-aware), fuse an optional LoRA."""
        from diffusers import StableDiffusionPipeline

        from cxrcommon.device import pick_device, pick_dtype
        from cxrcommon.models import load_pipeline, lora_weights

        dev = pick_device(device)
        dtype = pick_dtype(dev, precision)
        pipe = load_pipeline(StableDiffusionPipeline, model, torch_dtype=dtype)
        if lora:
            pipe.load_lora_weights(str(lora_weights(lora)), use_safetensors=True)  # never torch.load a pickle
            pipe.fuse_lora(lora_scale=lora_scale)  # fused: zero per-step cost
            pipe.unload_lora_weights()  # drops the adapter layers, keeps the fused weights
            log.info("fused LoRA %s at scale %s", lora, lora_scale)
        return cls(pipe, device=dev, dtype=dtype, **kwargs)

    def use_scheduler(self, name: str) -> None:
        """Swap the sampler's scheduler by short name (from the model's own scheduler config)."""
        self.scheduler_name = name
        self.scheduler = make_scheduler(name, self.pipe.scheduler.config)
        self._step_kwargs = set(inspect.signature(self.scheduler.step).parameters)

    @property
    def native_size(self) -> int:
        """The resolution the model was trained at (512 for SD 2.1-base), diffusers' default size."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def inpainting_unet(self) -> bool:
        return self.unet.config.in_channels == 9

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Text embeddings, one (W*77, D) tensor per text (W = its 75-token windows, see
        cxrcommon.prompt_windows); each unique text encoded once and cached.

        Texts are encoded one at a time so an embedding never depends on its batch-mates. A text that
        fits one window is encoded exactly as the stock pipeline encodes it."""
        for text in dict.fromkeys(texts):
            if text in self._cache:
                self._cache.move_to_end(text)
                continue
            emb = encode_windows(self.pipe.text_encoder, window_ids(self.tokenizer, text))
            self._cache[text] = emb.to(self.pipe.text_encoder.dtype)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [self._cache[t] for t in texts]

    def embedding_groups(self, requests: Sequence[Request], cfg: bool) -> list[TextGroup]:
        """The batch's text conditioning, grouped by embedding length (one UNet call per group).

        Each row's prompt and negative prompt are padded to the longer of the two with windows of the
        empty prompt. Padding an empty text only repeats its keys (attention is unchanged but for
        rounding); padding real text would dilute it, so those keys are masked out, as in training.
        Rows of different lengths are never padded to each other, so an image never depends on its
        batch-mates; a batch of equal lengths (the generator buckets them) is one group."""
        cond = self.encode_prompts([r.prompt for r in requests])
        uncond = self.encode_prompts([r.negative_prompt for r in requests]) if cfg else [None] * len(requests)
        natural = [(n_windows(c), n_windows(u) if cfg else 0) for c, u in zip(cond, uncond)]
        if cfg:
            empty = self.encode_prompts([""])[0]
            cond, uncond = zip(*(pad_pair(c, u, empty) for c, u in zip(cond, uncond)))
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(cond):
            by_len.setdefault(c.shape[0], []).append(i)

        def mask(rows: list[int], half: int, texts: list[str]) -> torch.Tensor | None:
            own = [natural[i][half] if texts[i] else n_windows(cond[i]) for i in rows]  # "" needs no mask
            return key_mask(own, n_windows(cond[rows[0]]), self.device)
        prompts, negatives = [r.prompt for r in requests], [r.negative_prompt for r in requests]
        return [TextGroup(None if len(by_len) == 1 else torch.tensor(rows, device=self.device),
                          torch.stack([cond[i] for i in rows]), torch.stack([uncond[i] for i in rows]) if cfg else None,
                          mask(rows, 0, prompts), mask(rows, 1, negatives) if cfg else None)
                for rows in by_len.values()]

    def grouped_noise(self, groups: list[TextGroup], x: torch.Tensor, t: torch.Tensor, use_cfg: bool,
                      guidance: float, rescale: float, extra: torch.Tensor | None) -> torch.Tensor:
        """`guided_noise` over the batch, one UNet call per embedding-length group.

        Args:
            groups: the batch's TextGroups from `embedding_groups` (together covering every row once).
            x: (B, 4, h, w) scheduler-scaled latents at step `t` (h, w = image side / the VAE's downscale, 8
                for SD 2.1).
            t: scalar timestep tensor, on the sampler's device.
            use_cfg: run both guidance halves (needs groups made with cfg=True); False = conditional only.
            guidance: CFG scale, >= 1 (ignored when `use_cfg` is False).
            rescale: guidance rescale phi in [0, 1] (0 = off).
            extra: (B, C, h, w) inpainting-UNet channels concatenated after the latents, or None.
        Returns: (B, 4, h, w) guided noise (or v) prediction, in the UNet's dtype."""
        def noise(g: TextGroup, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
            return self.guided_noise(x, t, g.cond, g.uncond if use_cfg else None, guidance, rescale, extra,
                                     cond_mask=g.cond_mask, uncond_mask=g.uncond_mask)
        if len(groups) == 1:
            return noise(groups[0], x, extra)
        pred = torch.empty_like(x)
        for g in groups:
            pred[g.rows] = noise(g, x[g.rows], None if extra is None else extra[g.rows])
        return pred

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """Per-image Gaussian latents drawn on the CPU, so the same seed gives the same image on any device."""
        shape = (1, self.unet.config.out_channels, height // self.vae_scale, width // self.vae_scale)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        return noise.to(self.device, self.dtype)

    def guided_noise(self, latent_input: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor | None, guidance: float, rescale: float = 0.0,
                     extra: torch.Tensor | None = None, *, cond_mask: torch.Tensor | None = None,
                     uncond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction with CFG; both halves in one UNet call (`uncond=None`: conditional only).

        Args:
            latent_input: (B, 4, h, w) scheduler-scaled latents at step `t` (h, w = image side / the VAE's
                downscale, 8 for SD 2.1).
            t: scalar (or (B,)) timestep tensor, on the sampler's device.
            cond: (B, L, D) text embeddings of the prompts (L = 77 per CLIP window, D = 1024 for SD 2.1).
            uncond: (B, L, D) embeddings of the negative prompts, the same L as `cond`; None = no CFG.
            guidance: CFG scale, >= 1 (1 = the conditional prediction; ignored when `uncond` is None).
            rescale: guidance rescale phi in [0, 1] (diffusers' rescale_noise_cfg; 0 = off).
            extra: (B, C, h, w) channels concatenated after the latents (mask + masked-image latents of an
                inpainting UNet), or None.
            cond_mask, uncond_mask: (B, L) bool, the text keys each half may attend to (False on padded
                windows), or None for all.
        Returns: (B, 4, h, w) guided noise (or v) prediction, in the UNet's dtype."""
        x = latent_input if uncond is None else torch.cat([latent_input, latent_input])
        if extra is not None:
            x = torch.cat([x, extra if uncond is None else torch.cat([extra, extra])], dim=1)
        emb = cond if uncond is None else torch.cat([uncond, cond])
        mask = cond_mask
        if uncond is not None and (cond_mask is not None or uncond_mask is not None):
            full = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
            mask = torch.cat([full if uncond_mask is None else uncond_mask, full if cond_mask is None else cond_mask])
        pred = self._unet_rows(x, t, emb, mask, cfg=uncond is not None)
        if uncond is None:  # a CUDA-graph replay overwrites its output buffer; multistep schedulers keep `pred`
            return pred.clone() if self.compiled else pred
        pred_uncond, pred_cond = pred.chunk(2)
        guided = pred_uncond + guidance * (pred_cond - pred_uncond)
        if rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
            guided = rescale_noise_cfg(guided, pred_cond, guidance_rescale=rescale)
        return guided

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """VAE latent (mean of the posterior, so it is deterministic) of a gray [0, 1] image."""
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].repeat(1, 3, 1, 1)
        x = (x * 2 - 1).to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.inference_mode()
    def sample_latents(self, requests: Sequence[Request], *, height: int, width: int, steps: int,
                       guidance: float, guidance_rescale: float = 0.0,
                       guidance_interval: Sequence[float] = (0.0, 1.0),
                       translation: Translation | None = None) -> torch.Tensor:
        """Denoise one batch of requests to latents with the scheduler's own step rule.

        Args:
            requests: the B images to make (prompt, seed, negative prompt); each seed draws its image's noise.
            height, width: output size in pixels, multiples of 8 (else ValueError).
            steps: scheduler steps of the full schedule, >= 1 (a translation runs only its last
                int(steps * strength)).
            guidance: CFG scale, >= 1 (> 1 enables classifier-free guidance with the negative prompts).
            guidance_rescale: guidance rescale phi in [0, 1] (0 = off).
            guidance_interval: (lo, hi), fractions in [0, 1] of the steps run: CFG is applied at step i of n
                while lo <= i / n < hi (hi >= 1: to the end); outside it the conditional prediction alone.
            translation: start from a real image (img2img strength, optional inpainting mask), or None for
                pure text-to-image.
        Returns: (B, 4, height / s, width / s) latents in the UNet's space (still multiplied by the VAE's
            scaling_factor; s = the VAE's downscale, 8 for SD 2.1), in the sampler's dtype; the init image's
            latents when the translation leaves no step to run (int(steps * strength) = 0)."""
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        lo, hi = guidance_interval
        gens = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests]
        groups = self.embedding_groups(requests, cfg=guidance > 1)
        sched = self.scheduler
        sched.set_timesteps(steps, device="cpu")  # the step rules index CPU tables: no host sync per step
        timesteps = sched.timesteps
        noise = self.initial_noise(gens, height, width)
        init = mask = extra = None
        if translation is not None:
            init_timestep = min(int(steps * translation.strength), steps)
            t_start = steps - init_timestep
            timesteps = timesteps[t_start * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            init = self.encode_image(translation.image).expand(len(requests), -1, -1, -1)
            if translation.mask is not None:
                mask, extra = self._mask_inputs(translation, len(requests))
        if len(timesteps) == 0:
            return init
        if init is None or (translation.strength == 1.0):
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(init, noise, timesteps[:1])
        step_kw = {"generator": gens} if "generator" in self._step_kwargs else {}
        unet_t = timesteps.to(self.device)  # one copy; the UNet reads its step's entry on the device
        for i, t in enumerate(timesteps):
            frac = i / len(timesteps)
            use_cfg = guidance > 1 and lo <= frac and (frac < hi or hi >= 1.0)
            x = sched.scale_model_input(latents, t)
            pred = self.grouped_noise(groups, x, unet_t[i], use_cfg, guidance, guidance_rescale, extra)
            latents = sched.step(pred, t, latents, return_dict=False, **step_kw)[0]
            if mask is not None and extra is None:  # plain UNet: keep the known region on the noisy init path
                known = init if i == len(timesteps) - 1 else sched.add_noise(init, noise, timesteps[i + 1:i + 2])
                latents = (1 - mask) * known + mask * latents
        return latents

    def _mask_inputs(self, translation: Translation, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent-size mask, plus for a 9-channel inpainting UNet its mask + masked-image latents."""
        size = (translation.image.shape[0] // self.vae_scale, translation.image.shape[1] // self.vae_scale)
        m = torch.from_numpy((translation.mask >= 0.5).astype(np.float32))[None, None]
        mask = F.interpolate(m, size=size).to(self.device, self.dtype).expand(n, -1, -1, -1)
        if not self.inpainting_unet:
            return mask, None
        masked = self.encode_image(translation.image * (translation.mask < 0.5)).expand(n, -1, -1, -1)
        return mask, torch.cat([mask, masked], dim=1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> gray float32 images (N, H, W) in [0, 1], `decode_batch` at a time (slices keep
        decode memory flat; slices of 1 keep an image's pixels independent of its batch)."""
        out = []
        for chunk in latents.split(self.decode_batch):
            rgb = self.vae.decode(chunk / self.vae.config.scaling_factor, return_dict=False)[0]
            out.append((rgb.float() / 2 + 0.5).clamp(0, 1).mean(dim=1).cpu().numpy())
        return np.concatenate(out)

    def generate(self, requests: Sequence[Request], *, height: int = 512, width: int = 512, steps: int = 75,
                 guidance: float = 4.0, guidance_rescale: float = 0.0,
                 guidance_interval: Sequence[float] = (0.0, 1.0),
                 translation: Translation | None = None) -> np.ndarray:
        """Requests -> gray images (N, H, W) float32 in [0, 1]. Strength 0 returns the init image;
        with a mask, pixels outside it are the init image's.

        Args:
            requests: the N images to make (prompt, seed, negative prompt); image pixels depend only on their
                own request, not on the batch.
            height, width: output size in pixels, multiples of 8 (512 = SD 2.1-base's native size).
            steps: scheduler steps, >= 1.
            guidance: CFG scale, >= 1 (1 = no guidance; 4.0 by default).
            guidance_rescale: guidance rescale phi in [0, 1] (0 = off).
            guidance_interval: (lo, hi) fractions of the steps in [0, 1] during which CFG is applied.
            translation: img2img / inpainting start, its image and mask (height, width) in [0, 1]; None =
                text-to-image.
        Returns: (N, height, width) float32 gray images in [0, 1]."""
        if translation is not None and translation.image.shape != (height, width):
            raise ValueError(f"init image is {translation.image.shape}, expected {(height, width)}")
        if translation is not None and translation.strength == 0:
            return np.repeat(translation.image[None].astype(np.float32), len(requests), axis=0)
        start = time.perf_counter()
        latents = self.sample_latents(requests, height=height, width=width, steps=steps, guidance=guidance,
                                      guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                                      translation=translation)
        images = self.decode(latents)
        self._count_eager(time.perf_counter() - start)  # decode's copy to numpy synced the device
        if translation is not None and translation.mask is not None:
            keep = (translation.mask < 0.5)[None]
            images = np.where(keep, translation.image[None], images).astype(np.float32)
        return images
