"""`python -m inference.generate`: a prompt file -> a folder of synthetic CXRs, each with provenance.

Streams (memory does not grow with the number of images), writes every image atomically with a
manifest.jsonl row, resumes where a crashed or interrupted run stopped, refuses to mix images made
with different settings in one folder, and shards work over processes under `accelerate launch`."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from cxrcommon.atomic import append_jsonl, atomic_write_text, read_jsonl, remove_stale_temps
from cxrcommon.cli import cli_entry
from cxrcommon.config import parse_config, to_dict
from cxrcommon.demographics import Demographics
from cxrcommon.errors import UserError
from cxrcommon.imageio import read_image, save_image, to_square
from cxrcommon.logs import setup_logging
from cxrcommon.models import lora_weights, resolve_model
from cxrcommon.paths import check_out_dir
from cxrcommon.prompt_windows import count_tokens
from cxrcommon.provenance import SOFTWARE, file_sha256, model_identity, provenance

from .captions import asked_of, caption_form, model_cards
from .config import FORMATS, GenerateConfig, check_generate_config
from .prompts import FittedRow, PromptFits, PromptRow, check_savenames, read_prompts, write_prompts_jsonl
from .qc import QCStats, check_and_regenerate, retry_seed
from .qc import finished as qc_final
from .qc import tags as qc_tags
from .sampler import CXRSampler, Request, Translation, derive_seed

if TYPE_CHECKING:
    from eval.demographic_models import DemographicModels

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
    named: bool = False     # the prompt file named the image (CheXGenBench's img_savename), not its hash
    demographics: Demographics = Demographics()  # the patient asked for (already in `prompt`'s caption)


@dataclass
class GenerateSummary:
    """What one process of a job did; the CLI prints it and the app shows it."""
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
    negative prompt and seed, so an edited prompt file never reuses a finished image for new text; a row
    with its own name (CheXGenBench's img_savename) is written under that name instead (see `_done`).

    Arguments:
      rows (sequence(PromptRow)): the prompts in file order; row i yields its `n` images.
      base_seed (int): >= 0, the job's --seed, for rows without a seed of their own.
      negative_prompt (str): for rows without a negative prompt of their own ("" = none).
      fmt (str): a key of `FORMATS` (png, png16, dcm); picks the file suffix.
      label_folders (bool): put each image in a sub-folder named after its row's label.

    Returns:
      (iterator(Job)): lazily, so a row with n = 10**9 costs nothing until it is reached.
    """
    for row in rows:
        for k in range(row.n):
            yield row_job(row, k, base_seed=base_seed, negative_prompt=negative_prompt, fmt=fmt,
                          label_folders=label_folders)


def row_job(row: PromptRow, k: int, *, base_seed: int, negative_prompt: str, fmt: str, label_folders: bool) -> Job:
    """Image k of `row`, computed directly (so counting finished images never expands the plan).

    Arguments:
      row (PromptRow): the prompt row.
      k (int): 0 <= k < row.n, the image's number within the row.
      base_seed, negative_prompt, fmt, label_folders: as for `plan_jobs`.

    Returns:
      (Job): its key (relative path), seed, prompt and negative prompt.
    """
    neg = row.negative_prompt if row.negative_prompt is not None else negative_prompt
    seed = row.seed + k if row.seed is not None else derive_seed(base_seed, row.index, k)
    if row.savename:
        return Job(row.savename, row.index, k, seed, row.prompt, neg, row.label, named=True,
                   demographics=row.demographics)
    tag = hashlib.sha256(json.dumps([row.prompt, neg, seed]).encode()).hexdigest()[:8]
    name = f"{row.index:05d}_{k:04d}_{tag}{FORMATS[fmt]}"
    folder = _safe_label(row.label or "unlabelled") + "/" if label_folders else ""
    return Job(folder + name, row.index, k, seed, row.prompt, neg, row.label, demographics=row.demographics)


def _done(job: Job, rec: dict | None) -> bool:
    """Whether manifest row `rec` is this job's finished image. A hashed name already implies prompt and seed;
    a given name does not, so there the row's prompt, negative prompt and seed must match too (an edited
    prompt file remakes that image)."""
    if rec is None or rec.get("key") != job.key:
        return False
    return not job.named or (rec.get("prompt"), rec.get("negative_prompt"), rec.get("seed")) == (
        job.prompt, job.negative_prompt, job.seed)


def plan_size(rows: Sequence[PromptRow], finished: Iterable[dict], index: int, count: int,
              **plan: object) -> tuple[int, int]:
    """(images this process is responsible for, how many of them are already finished), in
    O(rows + finished): a prompt with n = 10**9 must not be expanded before the first batch.

    Arguments:
      rows (sequence(PromptRow)): the prompts in file order, as given to `plan_jobs`.
      finished (iterable(dict)): manifest rows whose file is on disk (`finished_rows`).
      index (int): 0 <= index < count, this process's share.
      count (int): >= 1, the number of processes.
      plan: the keyword arguments of `plan_jobs` (base_seed, negative_prompt, fmt, label_folders).

    Returns:
      (tuple(int, int)): images planned for this process, and how many of them are finished.
    """
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
                and _done(row_job(row, k, **plan), rec)):  # type: ignore[arg-type]
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
    """Whether `out`'s earlier images must be discarded to use it with `settings`; raise
    SettingsChangedError where they differ from the folder's and `force` is off.

    Arguments:
      out (Path): the output folder; without a settings file it may always be used.
      settings (dict): this run's settings (`RunRecord.settings`).
      force (bool): allow changed settings (the caller then sets the old images aside).
      absent_ok (iterable(str)): keys a folder started by an older version may lack without its images
        differing (e.g. max_windows when every prompt fits one window).

    Returns:
      (bool): True where the settings changed and `force` allowed it.
    """
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


# ---------------------------------------------------------------- helpers

class _ProgressLog:
    """An INFO line with rate and ETA after the first batch and then every `every` s: tqdm's bar is off
    when stderr is not a terminal (a log file, a cluster job), and a long job must still show it is alive."""

    def __init__(self, total: int, every: float = 30.0):
        self.total = total
        self.every = every
        self.start = time.perf_counter()
        self.last = -math.inf

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


# ---------------------------------------------------------------- one run, described once

@dataclass(frozen=True)
class RunRecord:
    """What one run is, kept once and written three ways: settings.json (what a resumed run must match),
    each image's tags and each manifest row. Metadata names files and the model, never a path on this
    machine (issue #24): names plus content hashes."""
    cfg: GenerateConfig
    height: int                     # output size in pixels: the config's, else the model's native size
    width: int
    dtype: str                      # the sampler's weights, e.g. "torch.float32"
    model_name: str                 # the model as metadata names it (`model_identity`)
    model_sha256: str | None        # its folder's fingerprint; None where there is no local folder
    lora_sha256: str | None
    init_image_sha256: str | None
    mask_sha256: str | None
    source: str                     # the prompt file (for --balance, the plan written into the output folder)
    form: str | None                # the demographics template of the captions (`_Inputs.form`)
    qc: dict[str, str] | None = None  # --qc's classifiers, task -> file name and hash (`DemographicModels.identity`)

    @classmethod
    def describe(cls, cfg: GenerateConfig, sampler: CXRSampler, inputs: _Inputs,
                 qc: DemographicModels | None = None) -> RunRecord:
        """Hash the input files and fingerprint the model (and the QC classifiers) once, for every image of the run."""
        model_name, model_sha = model_identity(cfg.model, inputs.model_source)
        return cls(cfg=cfg, height=cfg.height or sampler.native_size, width=cfg.width or sampler.native_size,
                   dtype=str(sampler.dtype), model_name=model_name, model_sha256=model_sha,
                   lora_sha256=file_sha256(cfg.lora) if cfg.lora else None,
                   init_image_sha256=file_sha256(cfg.init_image) if cfg.init_image else None,
                   mask_sha256=file_sha256(cfg.mask) if cfg.mask else None, source=inputs.source, form=inputs.form,
                   qc=qc.identity() if qc else None)

    @property
    def translated(self) -> bool:
        """Whether images start from --init-image, so that --strength shapes them."""
        return bool(self.cfg.init_image)

    def settings(self) -> dict[str, Any]:
        """settings.json: what changes pixels or file layout, which every run into the folder must share."""
        settings = {k: getattr(self.cfg, k) for k in IMAGE_SETTINGS}
        settings.update(height=self.height, width=self.width, model=str(self.cfg.model), lora_sha256=self.lora_sha256,
                        dtype=self.dtype, init_image_sha256=self.init_image_sha256, mask_sha256=self.mask_sha256)
        if not self.translated:
            settings.pop("strength")
        if self.qc:  # the classifiers decide which seed's image is kept; absent without --qc, as in older folders
            settings["qc"] = self.qc
        return settings

    def tags(self, job: Job, text: dict[str, str | None]) -> dict[str, str]:
        """An image's provenance tags; `text`: how its prompt was encoded (`FittedText.tags`). Defaults
        (no rescale, the full guidance interval, no LoRA) are left out."""
        cfg = self.cfg
        full_interval = list(cfg.guidance_interval) == [0.0, 1.0]
        return provenance(prompt=job.prompt, negative_prompt=job.negative_prompt, seed=job.seed, label=job.label,
                          prompt_source=f"{Path(self.source).name}:{job.prompt_index}", image_index=job.k, **text,
                          steps=cfg.steps, guidance=cfg.guidance, guidance_rescale=cfg.guidance_rescale or None,
                          guidance_interval=None if full_interval else cfg.guidance_interval,
                          scheduler=cfg.scheduler, model=self.model_name, model_sha256=self.model_sha256,
                          lora=_file_name(cfg.lora), lora_sha256=self.lora_sha256,
                          lora_scale=cfg.lora_scale if cfg.lora else None, height=self.height, width=self.width,
                          dtype=self.dtype, init_image=_file_name(cfg.init_image),
                          init_image_sha256=self.init_image_sha256,
                          strength=cfg.strength if self.translated else None, mask=_file_name(cfg.mask),
                          mask_sha256=self.mask_sha256, text_removed="true" if cfg.clean else None,
                          **asked_of(job.demographics, self.form))

    def manifest_row(self, job: Job, text: dict[str, str | None], created: str) -> dict[str, Any]:
        """An image's manifest.jsonl row; `created` is its tags' time, so file and row agree."""
        return {"key": job.key, "file": job.key, "prompt": job.prompt,
                **{k: v for k, v in text.items() if v is not None},
                "negative_prompt": job.negative_prompt, "seed": job.seed, "label": job.label,
                "prompt_index": job.prompt_index, "k": job.k, **asked_of(job.demographics, self.form),
                "model": self.model_name, "lora_sha256": self.lora_sha256, "synthetic": True, "software": SOFTWARE,
                "created": created}


# ---------------------------------------------------------------- the steps of `generate`

@dataclass(frozen=True)
class _Inputs:
    """Everything the command line names, read and checked before a model is loaded or a file written."""
    out: Path
    model_source: str               # what `from_pretrained` loads for cfg.model
    lora: Path | None               # the LoRA's .safetensors file
    init_image: np.ndarray | None   # float32 H x W in [0, 1], as read
    mask: np.ndarray | None         # float32 H x W in [0, 1], as read; 1 = regenerate
    rows: list[PromptRow]
    source: str                     # the name the prompts are cited by (`_load_rows`)
    form: str | None                # how rows' demographics are captioned (`_caption_form`); None: not at all


@dataclass(frozen=True)
class _Layout:
    """This process's place in the job: share `index` of `count`, its device, and a wait for every process."""
    index: int
    count: int
    device: str
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class _Prompts:
    """The rows with their prompts fitted to CLIP windows on first use, and each negative prompt's windows."""
    fits: PromptFits
    rows: list[FittedRow]
    negative_windows: dict[str, int]
    guided: bool                    # guidance > 1: each UNet call also encodes the negative prompt

    def windows(self, job: Job) -> int:
        """The embedding length a job's UNet call needs (prompt and negative padded alike)."""
        own = self.fits[job.prompt_index][1].windows
        if not self.guided:
            return own
        return max(own, self.negative_windows.get(job.negative_prompt, 1))

    def one_window(self) -> bool:
        """Whether every text fits one window uncut; fits every prompt, but all() stops at the first long one."""
        return (set(self.negative_windows.values()) <= {1}
                and all(f.windows == 1 and not f.cut for _, f in self.fits.values()))


@dataclass(frozen=True)
class _Plan:
    """This process's images still to make (lazy: a plan of 10**9 images is never expanded) and where
    their manifest rows go."""
    jobs: Iterator[Job]
    planned: int                    # images this process is responsible for
    skipped: int                    # ... of which an earlier run finished
    manifest: Path
    qc_retry: dict[str, dict] = field(default_factory=dict)  # key -> row of an image that failed --qc with tries left

    def first_try(self, job: Job) -> int:
        """The --qc try a job starts from: past the tries an earlier run spent on this same image, else 0."""
        row = self.qc_retry.get(job.key)
        return int(row["qc_tries"]) if row is not None and _done(job, row) else 0


def _check_inputs(cfg: GenerateConfig) -> _Inputs:
    """Check every flag and read every input file, so a bad one costs no model load and leaves no file."""
    check_generate_config(cfg)
    present = [f for f in (cfg.prompts, cfg.init_image, cfg.mask, cfg.balance) if f and Path(f).exists()]
    out = check_out_dir(cfg.out, present)  # a missing input is named, with its flag, by its reader below
    model_source = resolve_model(cfg.model)
    lora = lora_weights(cfg.lora) if cfg.lora else None
    init_image, mask = _read_translation(cfg)
    rows, source = _load_rows(cfg, out)
    check_savenames(rows, FORMATS[cfg.format], source)
    form, rows = _caption_form(cfg, rows, model_cards(model_source, lora), source)
    return _Inputs(out=out, model_source=model_source, lora=lora, init_image=init_image, mask=mask, rows=rows,
                   source=source, form=form)


def _caption_form(cfg: GenerateConfig, rows: list[PromptRow], cards: list[Path],
                  source: str) -> tuple[str | None, list[PromptRow]]:
    """The form the rows' demographics are written in (`inference.captions.caption_form`: the model card's,
    or --demographics-template), and the rows; with 'none', the rows without their demographics."""
    where = cfg.balance if cfg.balance_target else (cfg.prompts or source)
    form = caption_form(cfg.demographics_template, cards, asked_for=sum(bool(r.demographics) for r in rows),
                        where=str(where))
    if cfg.balance_target and form is None:
        raise UserError("--balance-target plans images by patient, but --demographics-template none leaves the "
                        "patient out of every caption — choose auto, roentgen or chexgen, or drop --balance-target")
    if form is None:
        rows = [replace(r, demographics=Demographics()) if r.demographics else r for r in rows]
    return form, rows


def _read_translation(cfg: GenerateConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """--init-image and --mask read (and the mask checked) before any model is loaded or file written."""
    if not cfg.init_image:
        return None, None
    mask = read_image(cfg.mask) if cfg.mask else None
    if mask is not None and not (mask >= 0.5).any():
        raise UserError(f"--mask {cfg.mask}: the mask has no white (>= 50%) pixels, so nothing would change — "
                        f"paint the region to regenerate white")
    return read_image(cfg.init_image), mask


def _load_rows(cfg: GenerateConfig, out: Path) -> tuple[list[PromptRow], str]:
    """The prompt rows and the name they are cited by (the balancing plan, written later, for --balance)."""
    rows = read_prompts(cfg.prompts, default_n=cfg.n_per_prompt, skip_bad=cfg.skip_bad_lines,
                        savenames=cfg.chexgenbench) if cfg.prompts else None
    if not cfg.balance:
        return rows, str(cfg.prompts)
    from .balance import balance_prompts
    rows = balance_prompts(cfg.balance, cfg.label_column, prompts=rows, text_column=cfg.text_column,
                           image_column=cfg.image_column, target=cfg.balance_total, mix=cfg.balance_target)
    return rows, str(out / "balance_prompts.jsonl")


def _process_layout(shard: tuple[int, int] | None, device: str) -> _Layout:
    """`shard` when given (tests), else accelerate's process state under `accelerate launch`."""
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        from cxrcommon.device import pick_device
        state = PartialState(cpu=pick_device(device).type == "cpu")  # without cpu=True it ignores CPU ranks
        return _Layout(state.process_index, state.num_processes, str(state.device), state.wait_for_everyone)
    index, count = shard or (0, 1)
    return _Layout(index, count, device, lambda: None)


def _text_remover(clean: bool) -> Callable[[np.ndarray], Any] | None:
    """textremoval's `clean_image` for --clean, imported only then: only --clean pays for OCR models."""
    if not clean:
        return None
    from textremoval.remover import clean_image
    return clean_image


def _prepare_sampler(cfg: GenerateConfig, sampler: CXRSampler | None, inputs: _Inputs, device: str) -> CXRSampler:
    """Load cfg.model, or reuse the caller's copy of it with cfg's scheduler (the app shares one model)."""
    if sampler is None:
        sampler = CXRSampler.load(inputs.model_source, lora=inputs.lora, lora_scale=cfg.lora_scale, device=device,
                                  precision=cfg.precision, scheduler=cfg.scheduler, channels_last=cfg.channels_last,
                                  fuse_qkv=cfg.fuse_qkv, compile=cfg.compile, decode_batch=cfg.decode_batch)
    elif sampler.scheduler_name != cfg.scheduler:
        sampler.use_scheduler(cfg.scheduler)
    log.info("model: %s%s (%s on %s); LoRA: %s; %sx%s px", cfg.model,
             f" -> {inputs.model_source}" if inputs.model_source != cfg.model else "", sampler.dtype, sampler.device,
             cfg.lora or "none", cfg.height or sampler.native_size, cfg.width or sampler.native_size)
    return sampler


def _translation(record: RunRecord, image: np.ndarray | None, mask: np.ndarray | None,
                 inpainting: bool) -> Translation | None:
    """The start image (and mask) at the output size; an inpainting model cannot run without both."""
    if image is not None and record.height != record.width:
        raise UserError(f"--init-image needs a square output; got --height {record.height} --width {record.width}")
    if inpainting and (image is None or mask is None):
        raise UserError(f"{record.cfg.model} is an inpainting model (9-channel UNet): pass --init-image and --mask, "
                        f"or use a text-to-image model")
    if image is None:
        return None
    return Translation(image=to_square(image, record.height), strength=record.cfg.strength,
                       mask=to_square(mask, record.height) if mask is not None else None)


def _fit_prompts(cfg: GenerateConfig, inputs: _Inputs, tokenizer: Any) -> _Prompts:
    """Fit each prompt (its demographics in front) when the job reaches it (the first image never waits for the
    whole file); count the negative prompts' windows now, as there are few."""
    fits = PromptFits(inputs.rows, tokenizer, policy=cfg.clip_policy, max_windows=cfg.max_windows,
                      source=inputs.source, logger=log, form=inputs.form)
    fitted = fits.rows()
    negatives = list(dict.fromkeys([cfg.negative_prompt] + [r.negative_prompt for r in fitted if r.negative_prompt]))
    windows = {t: c.windows for t, c in zip(negatives, count_tokens(tokenizer, negatives))}
    return _Prompts(fits=fits, rows=fitted, negative_windows=windows, guided=cfg.guidance > 1)


def _prepare_out_dir(out: Path, record: RunRecord, prompts: _Prompts, layout: _Layout) -> None:
    """The main process clears what an interrupted run left, checks and writes the settings (with --force,
    setting earlier images aside) and merges the manifests; then every other process checks the settings."""
    settings = record.settings()
    # before windows, every text was cut at 77 tokens: one-window jobs make the same images as then
    # (asked only of such a folder, as it fits every prompt)
    legacy = ("max_windows",) if _lacks_setting(out, "max_windows") and prompts.one_window() else ()
    if layout.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if removed := remove_stale_temps(out):
            log.info("removed %d temp file(s) left in %s by an interrupted run", removed, out)
        if check_settings(out, settings, record.cfg.force, legacy) and (out / MANIFEST).exists():
            (out / MANIFEST).rename(out / f"manifest.replaced-{int(time.time())}.jsonl")
            for part in out.glob("manifest.part*.jsonl"):
                part.unlink()
        merge_manifests(out)
        atomic_write_text(out / SETTINGS, json.dumps(settings, indent=1, sort_keys=True))
        if record.cfg.balance:
            write_prompts_jsonl(record.source, prompts.rows)
            log.info("balancing plan (%d images) written to %s", sum(r.n for r in prompts.rows), record.source)
    layout.barrier()
    if not layout.is_main:
        check_settings(out, settings, force=False, absent_ok=legacy)


def _plan(cfg: GenerateConfig, out: Path, prompts: _Prompts, layout: _Layout) -> _Plan:
    """This process's share of the images, less those an earlier run finished (counted without
    expanding the plan)."""
    plan = dict(base_seed=cfg.seed, negative_prompt=cfg.negative_prompt, fmt=cfg.format,
                label_folders=cfg.label_folders)
    finished = finished_rows(out)
    prompts.fits.reuse(finished)  # a resumed job does not re-fit the prompts of the images it skips
    retry: dict[str, dict] = {}
    if cfg.qc:  # an image that failed QC with tries to spare (a larger --qc-tries) is not finished
        retry = {r["key"]: r for r in finished if not qc_final(r, cfg.qc_tries)}
        finished = [r for r in finished if r["key"] not in retry]
    done = {r["key"]: r for r in finished}
    planned, skipped = plan_size(prompts.rows, finished, layout.index, layout.count, **plan)
    log.info("%d image(s) for this process: %d already done, %d to make (batch %d, %d steps, %s)",
             planned, skipped, planned - skipped, cfg.batch_size, cfg.steps, cfg.scheduler)
    jobs = shard_jobs(plan_jobs(prompts.rows, **plan), layout.index, layout.count)
    manifest = out / (MANIFEST if layout.count == 1 else _part_name(layout.index, layout.count))
    return _Plan(jobs=(j for j in jobs if not _done(j, done.get(j.key))), planned=planned, skipped=skipped,
                 manifest=manifest, qc_retry=retry)


def _remove_text(cleaner: Callable[[np.ndarray], Any], job: Job, image: np.ndarray) -> np.ndarray | None:
    """The image with burnt-in text removed, or None where removal failed: one bad image must not end a
    long job, and a rerun retries it."""
    try:
        return np.clip(cleaner(image).image, 0, 1).astype(np.float32)
    except Exception as exc:
        log.error("%s: text removal failed (%s); not saved, rerun to retry", job.key, exc)
        return None


def _save_image(out: Path, manifest: Path, record: RunRecord, prompts: _Prompts, job: Job,
                image: np.ndarray, qc_row: dict[str, Any] | None = None) -> Path:
    """Write the image with its tags, then its manifest row: a row is only ever written for a file on disk.
    `qc_row`: its --qc columns (`inference.qc.Checked.row`), in the row and, in short, in the tags."""
    original, fit = prompts.fits[job.prompt_index]
    text = fit.tags(original)
    tags = {**record.tags(job, text), **(qc_tags(qc_row) if qc_row else {})}
    path = save_image(out / job.key, image, fmt=record.cfg.format, tags=tags)
    append_jsonl(manifest, {**record.manifest_row(job, text, tags["created"]), **(qc_row or {})})
    return path


def _qc_models(cfg: GenerateConfig, rows: list[PromptRow], device: str) -> DemographicModels | None:
    """--qc's classifiers, loaded before the generator and before any file is written: weights of the wrong
    format are refused in one line (`eval.demographic_models.load_models`)."""
    if not cfg.qc:
        return None
    from cxrcommon.device import pick_device
    from eval.demographic_models import load_models
    models = load_models(cfg.qc, pick_device(device))
    log.info("QC: %s; up to %d tries per image", models.describe(), cfg.qc_tries)
    if not any(r.demographics for r in rows):
        log.warning("--qc: no prompt asks for a patient (sex/age/race columns), so no image has anything to check")
    return models


def _image_maker(sampler: CXRSampler, record: RunRecord,
                 translation: Translation | None) -> Callable[[list[Job], list[int]], list[np.ndarray]]:
    """(jobs, --qc tries) -> their images, each made with its try's seed (try 0: the job's own seed)."""
    cfg = record.cfg

    def make(jobs: list[Job], tries: list[int]) -> list[np.ndarray]:
        return sampler.generate([Request(j.prompt, retry_seed(j.seed, t), j.negative_prompt)
                                 for j, t in zip(jobs, tries, strict=True)],
                                height=record.height, width=record.width, steps=cfg.steps, guidance=cfg.guidance,
                                guidance_rescale=cfg.guidance_rescale, guidance_interval=cfg.guidance_interval,
                                translation=translation)
    return make


def _make_batch(batch: list[Job], make: Callable[[list[Job], list[int]], list[np.ndarray]], plan: _Plan,
                qc: DemographicModels | None, tries: int, stats: QCStats) -> list[tuple[np.ndarray, dict | None]]:
    """Each job's image with its --qc manifest columns (None without --qc); with --qc, images that fail the check
    are made again with new seeds (`inference.qc.check_and_regenerate`)."""
    if qc is None:
        return [(image, None) for image in make(batch, [0] * len(batch))]
    checked = check_and_regenerate(batch, [j.demographics for j in batch], make, qc, tries,
                                   first=[plan.first_try(j) for j in batch])
    for c in checked:
        stats.add(c)
    return [(c.image, c.row(c.item.seed)) for c in checked]


# ---------------------------------------------------------------- the job

def generate(cfg: GenerateConfig, *, shard: tuple[int, int] | None = None,
             on_image: Callable[[Path], None] | None = None, sampler: CXRSampler | None = None) -> GenerateSummary:
    """Run (or resume) a generation job, in steps numbered as in diffusers' `StableDiffusionPipeline.__call__`.
    Nothing is written before step 7, so a run refused for a bad input leaves no settings file behind.

    Arguments:
      cfg (GenerateConfig): every option of the job, checked before anything is loaded or written;
        height and width None mean the model's native size.
      shard (tuple(int, int) or None): (index, count), 0 <= index < count: make every count-th image from
        `index`; overrides the process layout (tests). None: accelerate's, or (0, 1) in one process.
      on_image (callable or None): called with each image's path once file and manifest row are on disk
        (the app's progress; tests stop a job with it).
      sampler (CXRSampler or None): an already loaded model of `cfg.model`, switched to `cfg.scheduler`
        (the app shares one across requests). None: load `cfg.model` (with `cfg.lora`).

    Returns:
      (GenerateSummary): this process's counts (planned, generated, skipped, failed) and time.
    """
    # 1. Check inputs: every flag and input file, before a model is loaded or a file written
    inputs = _check_inputs(cfg)
    out = inputs.out

    # 2. Define the process layout: this process's share of the images, and its device
    layout = _process_layout(shard, cfg.device)

    # 3. Load the models
    cleaner = _text_remover(cfg.clean)
    qc = _qc_models(cfg, inputs.rows, layout.device)
    sampler = _prepare_sampler(cfg, sampler, inputs, layout.device)

    # 4. Describe the run: the source of settings.json, every image's tags and every manifest row
    record = RunRecord.describe(cfg, sampler, inputs, qc)

    # 5. Prepare the start image (img2img, inpainting)
    translation = _translation(record, inputs.init_image, inputs.mask, sampler.inpainting_unet)

    # 6. Fit the prompts to CLIP windows
    prompts = _fit_prompts(cfg, inputs, sampler.tokenizer)

    # 7. Prepare the output folder
    _prepare_out_dir(out, record, prompts, layout)

    # 8. Plan jobs
    plan = _plan(cfg, out, prompts, layout)

    # 9. Generate: one sampler call per batch of equal text length; each image saved as it comes
    shown = cfg.model if inputs.model_source == cfg.model else f"{cfg.model} = {inputs.model_source}"
    summary = GenerateSummary(out=out, model=shown, planned=plan.planned, generated=0, skipped=plan.skipped,
                              failed=0, seconds=0.0)
    n_todo = plan.planned - plan.skipped
    start = time.perf_counter()
    progress = _ProgressLog(n_todo)
    make = _image_maker(sampler, record, translation)
    qc_stats = QCStats()
    with tqdm(total=n_todo, unit="img", desc="generating", disable=not layout.is_main or None) as bar:
        for batch in _batches(plan.jobs, cfg.batch_size, prompts.windows):
            for job, (image, qc_row) in zip(batch, _make_batch(batch, make, plan, qc, cfg.qc_tries, qc_stats),
                                            strict=True):
                if cleaner is not None:
                    image = _remove_text(cleaner, job, image)
                if image is None:
                    summary.failed += 1
                    continue
                path = _save_image(out, plan.manifest, record, prompts, job, image, qc_row)
                summary.generated += 1
                bar.update()
                if on_image is not None:
                    on_image(path)
            if layout.is_main:
                progress.update(summary.generated + summary.failed)

    # 10. Finish: report the prompt fits (and QC failure rates), wait for every process, merge their manifests
    prompts.fits.summary()
    qc_stats.log(cfg.qc_tries)
    summary.seconds = time.perf_counter() - start
    layout.barrier()
    if layout.is_main:
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
