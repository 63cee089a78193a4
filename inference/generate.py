"""`python -m inference.generate`: a prompt file -> a folder of synthetic CXRs, each with provenance.

Streams (memory does not grow with the number of images), writes every image atomically with a
manifest.jsonl row, resumes where a crashed or interrupted run stopped, refuses to mix images made
with different settings in one folder, and shards work over processes under `accelerate launch`."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from cxrcommon.atomic import append_jsonl, atomic_write_text, read_jsonl, remove_stale_temps
from cxrcommon.cli import cli_entry
from cxrcommon.config import parse_config, to_dict
from cxrcommon.errors import UserError
from cxrcommon.imageio import read_image, save_image, to_square
from cxrcommon.logs import setup_logging
from cxrcommon.models import lora_weights, resolve_model
from cxrcommon.paths import check_out_dir
from cxrcommon.provenance import SOFTWARE, file_sha256, model_identity, provenance
from cxrcommon.prompt_windows import count_tokens

from .config import FORMATS, GenerateConfig, check_generate_config
from .prompts import PromptFits, PromptRow, read_prompts, write_prompts_jsonl
from .sampler import CXRSampler, Request, Translation, derive_seed

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
# options that change pixels or file layout; a folder is made with one value of each
IMAGE_SETTINGS = ("steps", "guidance", "guidance_rescale", "guidance_interval", "scheduler", "seed",
                  "negative_prompt", "height", "width", "format", "label_folders", "strength", "lora_scale",
                  "clean", "clip_policy", "max_windows")


class SettingsChangedError(UserError, RuntimeError):
    """The output folder was started with other image-affecting settings."""


@dataclass
class Job:
    """One image to make; `key` (its path relative to the output folder) identifies it across runs."""
    key: str
    prompt_index: int
    k: int
    seed: int
    prompt: str
    negative_prompt: str
    label: str | None


@dataclass
class GenerateSummary:
    out: Path
    model: str
    planned: int       # images this process is responsible for
    generated: int     # made by this run
    skipped: int       # already finished by an earlier run
    failed: int        # skipped after an error (logged); a rerun retries them
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "unlabelled"


def plan_jobs(rows: Sequence[PromptRow], *, base_seed: int, negative_prompt: str, fmt: str,
              label_folders: bool) -> Iterator[Job]:
    """Expand prompt rows into images. A row's own seed s gives images s, s+1, ...; otherwise image k
    of the row on line i gets `derive_seed(base_seed, i, k)`. The file name carries a hash of prompt,
    negative prompt and seed, so an edited prompt file never reuses a finished image for new text."""
    for row in rows:
        for k in range(row.n):
            yield row_job(row, k, base_seed=base_seed, negative_prompt=negative_prompt, fmt=fmt,
                          label_folders=label_folders)


def row_job(row: PromptRow, k: int, *, base_seed: int, negative_prompt: str, fmt: str, label_folders: bool) -> Job:
    """Image k of `row`, computed directly (so counting finished images never expands the plan)."""
    neg = row.negative_prompt if row.negative_prompt is not None else negative_prompt
    seed = row.seed + k if row.seed is not None else derive_seed(base_seed, row.index, k)
    tag = hashlib.sha256(json.dumps([row.prompt, neg, seed]).encode()).hexdigest()[:8]
    name = f"{row.index:05d}_{k:04d}_{tag}{FORMATS[fmt]}"
    folder = _safe_label(row.label or "unlabelled") + "/" if label_folders else ""
    return Job(folder + name, row.index, k, seed, row.prompt, neg, row.label)


def plan_size(rows: Sequence[PromptRow], finished: Iterable[dict], index: int, count: int,
              **plan: object) -> tuple[int, int]:
    """(images this process is responsible for, how many of them are already finished), in
    O(rows + finished): a prompt with n = 10**9 must not be expanded before the first batch.
    `finished`: manifest rows whose file is on disk; `plan`: the keyword arguments of `plan_jobs`."""
    first: dict[int, tuple[int, PromptRow]] = {}
    total = 0
    for row in rows:
        first[row.index] = (total, row)
        total += row.n
    done = 0
    for rec in finished:
        start, row = first.get(rec.get("prompt_index"), (0, None))
        k = rec.get("k")
        if (row is not None and isinstance(k, int) and 0 <= k < row.n and (start + k) % count == index
                and row_job(row, k, **plan).key == rec["key"]):  # type: ignore[arg-type]
            done += 1
    return len(range(index, total, count)), done


def shard_jobs(jobs: Iterable[Job], index: int, count: int) -> Iterator[Job]:
    """This process's share: every count-th job from `index`, the same split on every rerun."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is outside 0..{count - 1}")
    return itertools.islice(jobs, index, None, count)


def _batches(items: Iterable[Job], size: int, length: Callable[[Job], int] = lambda job: 1) -> Iterator[list[Job]]:
    """Batches of `size` jobs of equal `length` (text windows): one UNet call each. Jobs wait in one
    bucket per length, so memory stays bounded by (lengths x size) however long the plan."""
    buckets: dict[int, list[Job]] = {}
    for job in items:
        bucket = buckets.setdefault(length(job), [])
        bucket.append(job)
        if len(bucket) >= max(1, size):
            yield buckets.pop(length(job))
    yield from (b for b in buckets.values() if b)


# ---------------------------------------------------------------- settings and manifest

def check_settings(out: Path, settings: dict, force: bool, absent_ok: Iterable[str] = ()) -> bool:
    """True if `out` may be (re)used with `settings`; raise if they differ and not `force`.
    Returns whether earlier results must be discarded. `absent_ok`: keys a folder started by an older
    version may lack without its images differing (e.g. max_windows when every prompt fits one window)."""
    path = out / SETTINGS
    if not path.is_file():
        return False
    old = json.loads(path.read_text(encoding="utf-8"))
    old.update({k: settings.get(k) for k in absent_ok if k not in old})
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if not changed:
        return False
    detail = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
    if not force:
        raise SettingsChangedError(f"{out} was started with other settings ({detail}); its images would not match. "
                                   f"Use another --out, restore the settings, or pass --force to regenerate everything")
    log.warning("--force: settings changed (%s); regenerating every image in %s", detail, out)
    return True


def _lacks_setting(out: Path, key: str) -> bool:
    """Whether `out` holds a settings file written without `key` (a folder started by an older version)."""
    try:
        return key not in json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _part_name(index: int, count: int) -> str:
    return f"manifest.part{index:03d}-of{count:03d}.jsonl"


def manifest_rows(out: Path) -> list[dict]:
    """Rows of manifest.jsonl and of any per-process parts, one per key (the latest wins)."""
    rows: dict[str, dict] = {}
    for path in [out / MANIFEST, *sorted(out.glob("manifest.part*.jsonl"))]:
        for row in read_jsonl(path):
            rows[row["key"]] = row
    return list(rows.values())


def merge_manifests(out: Path) -> None:
    """Rewrite manifest.jsonl as one row per finished image: fold in per-process parts, drop a torn
    last line and rows whose file has gone (they will be made again, so they must not appear twice)."""
    main, parts = out / MANIFEST, sorted(out.glob("manifest.part*.jsonl"))
    torn = main.is_file() and main.stat().st_size and not main.read_bytes().endswith(b"\n")
    n_lines = len(read_jsonl(main))
    keep = [r for r in manifest_rows(out) if (out / r["key"]).is_file()]
    if not parts and not torn and len(keep) == n_lines:
        return
    atomic_write_text(main, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
    for p in parts:
        p.unlink()


def finished_rows(out: Path) -> list[dict]:
    """Manifest rows of images whose file is on disk."""
    return [r for r in manifest_rows(out) if (out / r["key"]).is_file()]


# ---------------------------------------------------------------- inputs

def _read_translation(cfg: GenerateConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """--init-image and --mask read (and the mask checked) before any model is loaded or file written."""
    if not cfg.init_image:
        return None, None
    mask = read_image(cfg.mask) if cfg.mask else None
    if mask is not None and not (mask >= 0.5).any():
        raise UserError(f"--mask {cfg.mask}: the mask has no white (>= 50%) pixels, so nothing would change — "
                        f"paint the region to regenerate white")
    return read_image(cfg.init_image), mask


def _translation(cfg: GenerateConfig, image: np.ndarray | None, mask: np.ndarray | None) -> Translation | None:
    if image is None:
        return None
    if cfg.height != cfg.width:
        raise UserError(f"--init-image needs a square output; got --height {cfg.height} --width {cfg.width}")
    return Translation(image=to_square(image, cfg.height), strength=cfg.strength,
                       mask=to_square(mask, cfg.height) if mask is not None else None)


def _load_rows(cfg: GenerateConfig, out: Path) -> tuple[list[PromptRow], str]:
    """The prompt rows and the name they are cited by (the balancing plan, written later, for --balance)."""
    rows = read_prompts(cfg.prompts, default_n=cfg.n_per_prompt, skip_bad=cfg.skip_bad_lines) if cfg.prompts else None
    if not cfg.balance:
        return rows, str(cfg.prompts)
    from .balance import balance_prompts
    rows = balance_prompts(cfg.balance, cfg.label_column, prompts=rows, text_column=cfg.text_column,
                           image_column=cfg.image_column)
    return rows, str(out / "balance_prompts.jsonl")


class _ProgressLog:
    """An INFO line with rate and ETA after the first batch and then every `every` s: tqdm's bar is off
    when stderr is not a terminal (a log file, a cluster job), and a long job must still show it is alive."""

    def __init__(self, total: int, every: float = 30.0):
        self.total, self.every, self.start, self.last = total, every, time.perf_counter(), -math.inf

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        log.info("%d/%d image(s) made, %.2f images/s, ETA %s", done, self.total, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 else f"{eta / 86400:.1f} days")


def _file_name(path: str | None) -> str | None:
    """An input file as image metadata names it: its name, not where it lies on this machine."""
    return Path(path).name if path else None


def _process_layout(shard: tuple[int, int] | None, device: str):
    """(index, count, device, barrier): `shard` when given (tests), else accelerate's process state."""
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        from cxrcommon.device import pick_device
        state = PartialState(cpu=pick_device(device).type == "cpu")  # without cpu=True it ignores CPU ranks
        return state.process_index, state.num_processes, str(state.device), state.wait_for_everyone
    index, count = shard or (0, 1)
    return index, count, device, lambda: None


# ---------------------------------------------------------------- the job

def generate(cfg: GenerateConfig, *, shard: tuple[int, int] | None = None,
             on_image: Callable[[Path], None] | None = None, sampler: CXRSampler | None = None) -> GenerateSummary:
    """Run (or resume) a generation job. `shard=(index, count)` overrides the process layout;
    `on_image(path)` is called after each image is on disk (progress for the app; tests use it);
    `sampler`: an already loaded model of `cfg.model` (the app shares one across requests)."""
    check_generate_config(cfg)  # every input is checked before anything is loaded or written
    inputs = [f for f in (cfg.prompts, cfg.init_image, cfg.mask, cfg.balance) if f and Path(f).exists()]
    out = check_out_dir(cfg.out, inputs)  # a missing input is named, with its flag, by its reader below
    model_source = resolve_model(cfg.model)
    lora = lora_weights(cfg.lora) if cfg.lora else None
    init_image, mask = _read_translation(cfg)
    rows, source = _load_rows(cfg, out)
    index, count, device, barrier = _process_layout(shard, cfg.device)
    is_main = index == 0
    cleaner = None
    if cfg.clean:
        from textremoval.remover import clean_image as cleaner  # lazy: only --clean pays for OCR models

    if sampler is None:
        sampler = CXRSampler.load(model_source, lora=lora, lora_scale=cfg.lora_scale, device=device,
                                  precision=cfg.precision, scheduler=cfg.scheduler, channels_last=cfg.channels_last,
                                  fuse_qkv=cfg.fuse_qkv, compile=cfg.compile, decode_batch=cfg.decode_batch)
    elif sampler.scheduler_name != cfg.scheduler:
        sampler.use_scheduler(cfg.scheduler)
    log.info("model: %s%s (%s on %s); LoRA: %s; %sx%s px", cfg.model,
             f" -> {model_source}" if model_source != cfg.model else "", sampler.dtype, sampler.device,
             cfg.lora or "none", cfg.height or sampler.native_size, cfg.width or sampler.native_size)
    cfg = dataclasses.replace(cfg, height=cfg.height or sampler.native_size, width=cfg.width or sampler.native_size)
    translation = _translation(cfg, init_image, mask)
    if sampler.inpainting_unet and (translation is None or translation.mask is None):
        raise UserError(f"{cfg.model} is an inpainting model (9-channel UNet): pass --init-image and --mask, "
                         f"or use a text-to-image model")
    fits = PromptFits(rows, sampler.tokenizer, policy=cfg.clip_policy, max_windows=cfg.max_windows, source=source,
                      logger=log)
    rows = fits.rows()  # each fitted when the job reaches it: the first image never waits for the whole file
    negatives = list(dict.fromkeys([cfg.negative_prompt] + [r.negative_prompt for r in rows if r.negative_prompt]))
    neg_windows = {t: c.windows for t, c in zip(negatives, count_tokens(sampler.tokenizer, negatives))}

    def windows(job: Job) -> int:  # the embedding length its UNet call needs (prompt and negative padded alike)
        own = fits[job.prompt_index][1].windows
        return max(own, neg_windows.get(job.negative_prompt, 1)) if cfg.guidance > 1 else own

    lora_sha = file_sha256(cfg.lora) if cfg.lora else None
    settings = {k: getattr(cfg, k) for k in IMAGE_SETTINGS}
    settings.update(model=str(cfg.model), lora_sha256=lora_sha, dtype=str(sampler.dtype),
                    init_image_sha256=file_sha256(cfg.init_image) if cfg.init_image else None,
                    mask_sha256=file_sha256(cfg.mask) if cfg.mask else None)
    if not translation:
        settings.pop("strength")
    # before windows, every text was cut at 77 tokens: one-window jobs make the same images as then
    # (asked only of such a folder, as it fits every prompt; all() stops at the first long one)
    one_window = (_lacks_setting(out, "max_windows") and set(neg_windows.values()) <= {1}
                  and all(f.windows == 1 and not f.cut for _, f in fits.values()))
    legacy = ("max_windows",) if one_window else ()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if removed := remove_stale_temps(out):
            log.info("removed %d temp file(s) left in %s by an interrupted run", removed, out)
        if check_settings(out, settings, cfg.force, legacy) and (out / MANIFEST).exists():
            (out / MANIFEST).rename(out / f"manifest.replaced-{int(time.time())}.jsonl")
            for part in out.glob("manifest.part*.jsonl"):
                part.unlink()
        merge_manifests(out)
        atomic_write_text(out / SETTINGS, json.dumps(settings, indent=1, sort_keys=True))
        if cfg.balance:
            write_prompts_jsonl(source, rows)
            log.info("balancing plan (%d images) written to %s", sum(r.n for r in rows), source)
    barrier()
    if not is_main:
        check_settings(out, settings, force=False, absent_ok=legacy)

    plan = dict(base_seed=cfg.seed, negative_prompt=cfg.negative_prompt, fmt=cfg.format,
                label_folders=cfg.label_folders)
    finished = finished_rows(out)
    fits.reuse(finished)  # a resumed job does not re-fit the prompts of the images it skips
    done = {r["key"] for r in finished}
    planned, n_done = plan_size(rows, finished, index, count, **plan)
    n_todo = planned - n_done
    manifest = out / (MANIFEST if count == 1 else _part_name(index, count))
    log.info("%d image(s) for this process: %d already done, %d to make (batch %d, %d steps, %s)",
             planned, planned - n_todo, n_todo, cfg.batch_size, cfg.steps, cfg.scheduler)
    # metadata names files and the model, never a path on this machine (issue #24): names plus content hashes
    model_name, model_sha = model_identity(cfg.model, model_source)
    base_tags = dict(steps=cfg.steps, guidance=cfg.guidance, guidance_rescale=cfg.guidance_rescale or None,
                     guidance_interval=None if list(cfg.guidance_interval) == [0.0, 1.0] else cfg.guidance_interval,
                     scheduler=cfg.scheduler, model=model_name, model_sha256=model_sha,
                     lora=_file_name(cfg.lora), lora_sha256=lora_sha, lora_scale=cfg.lora_scale if cfg.lora else None,
                     height=cfg.height, width=cfg.width, dtype=str(sampler.dtype),
                     init_image=_file_name(cfg.init_image), init_image_sha256=settings["init_image_sha256"],
                     strength=cfg.strength if translation else None, mask=_file_name(cfg.mask),
                     mask_sha256=settings["mask_sha256"], text_removed="true" if cfg.clean else None)

    shown = cfg.model if model_source == cfg.model else f"{cfg.model} = {model_source}"
    summary = GenerateSummary(out=out, model=shown, planned=planned, generated=0, skipped=planned - n_todo,
                              failed=0, seconds=0.0)
    start = time.perf_counter()
    progress = _ProgressLog(n_todo)
    todo = (j for j in shard_jobs(plan_jobs(rows, **plan), index, count) if j.key not in done)  # lazy
    with tqdm(total=n_todo, unit="img", desc="generating", disable=not is_main or None) as bar:
        for batch in _batches(todo, cfg.batch_size, windows):
            images = sampler.generate([Request(j.prompt, j.seed, j.negative_prompt) for j in batch],
                                      height=cfg.height, width=cfg.width, steps=cfg.steps, guidance=cfg.guidance,
                                      guidance_rescale=cfg.guidance_rescale,
                                      guidance_interval=cfg.guidance_interval, translation=translation)
            for job, image in zip(batch, images, strict=True):
                if cleaner is not None:
                    try:
                        image = np.clip(cleaner(image).image, 0, 1).astype(np.float32)
                    except Exception as exc:  # one bad image must not end a long job; a rerun retries it
                        log.error("%s: text removal failed (%s); not saved, rerun to retry", job.key, exc)
                        summary.failed += 1
                        continue
                original, fit = fits[job.prompt_index]
                text_tags = fit.tags(original)
                tags = provenance(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed,
                                  label=job.label, prompt_source=f"{Path(source).name}:{job.prompt_index}",
                                  image_index=job.k, **text_tags, **base_tags)
                path = save_image(out / job.key, image, fmt=cfg.format, tags=tags)
                append_jsonl(manifest, {"key": job.key, "file": job.key, "prompt": job.prompt,
                                        **{k: v for k, v in text_tags.items() if v is not None},
                                        "negative_prompt": job.negative_prompt, "seed": job.seed, "label": job.label,
                                        "prompt_index": job.prompt_index, "k": job.k, "model": model_name,
                                        "lora_sha256": lora_sha, "synthetic": True, "software": SOFTWARE,
                                        "created": tags["created"]})
                summary.generated += 1
                bar.update()
                if on_image is not None:
                    on_image(path)
            if is_main:
                progress.update(summary.generated + summary.failed)
    fits.summary()
    summary.seconds = time.perf_counter() - start
    barrier()
    if is_main:
        merge_manifests(out)
    return summary


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(GenerateConfig, argv, "Generate synthetic chest X-rays from a prompt file (resumable; "
                                             "every image is tagged synthetic). Several GPUs: `accelerate launch "
                                             "-m inference.generate ...`; several CPU processes: `accelerate "
                                             "launch --multi_gpu --num_processes N -m inference.generate ...` "
                                             "(accelerate's torchrun launcher; plain `accelerate launch` on a "
                                             "CPU machine starts ONE process) or `torchrun --nproc_per_node N`. "
                                             "Images are bitwise the same whatever the batch size or process "
                                             "count.")
    setup_logging(cfg.verbose)
    log.debug("config: %s", to_dict(cfg))
    s = generate(cfg)
    print(f"{s.generated} image(s) written, {s.skipped} already there, {s.failed} failed -> {s.out} "
          f"(model {s.model}; {s.images_per_s:.2f} images/s; manifest {s.out / MANIFEST})")
    return 1 if s.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
