"""synthcxr's Gradio UI: generate from a report, build a dataset from a prompt file, clean burnt-in
text, and compare two image sets. It wires the stages' public APIs together and holds no logic of its own.

    python app.py [--model M] [--lora L] [--inpaint-model M] [--sam-checkpoint P]
                  [--host 127.0.0.1] [--port 7860] [--auth user:pass]
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

import gradio as gr
import numpy as np

from cxrcommon.atomic import atomic_write_text, pid_alive
from cxrcommon.config import field, parse_config
from cxrcommon.errors import UserError
from cxrcommon.limits import MAX_BYTES, check_bytes
from cxrcommon.paths import walk_files

log = logging.getLogger("synthcxr.app")

EXAMPLES = [
    "Moderate left pleural effusion. Heart size is normal.",
    "Large right pleural effusion with adjacent atelectasis.",
    "Cardiomegaly. No focal consolidation, pleural effusion or pneumothorax.",
    "Small right apical pneumothorax. Endotracheal tube in standard position.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "No acute cardiopulmonary process.",
]
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff"]
ROOT_PREFIX = "synthcxr-app-"  # + "<pid>-<random>": the app's temp root, swept on start once its app is gone
ERROR_CHARS = 2000  # longest message shown for a failed request
PRIVATE_UMASK = 0o077  # while the app runs, what it and Gradio write is its user's only: 0700 folders, 0600 files
# an absolute path in a message (POSIX, or a Windows drive): shown by its last part only, never the server's folders
_ABS_PATH = re.compile(r"(?<![\w.~/\\:])(?:/|[A-Za-z]:[\\/])[^\s'\"`<>|;,()\[\]{}]*")


@dataclasses.dataclass
class AppConfig:
    model: str = field("embedded", "text-to-image model: hub id, local folder, or 'embedded' (offline demonstrator)")
    lora: str | None = field(None, "optional LoRA (folder or .safetensors) fused into the model")
    lora_scale: float = field(1.0, "LoRA strength")
    inpaint_model: str | None = field(None, "SD inpainting model for the Clean tab (default: OpenCV Telea, offline)")
    sam_checkpoint: str | None = field(None, "Segment Anything checkpoint for text masks (default: glyph masks)")
    host: str = field("127.0.0.1", "interface to bind; keep 127.0.0.1 unless you mean to serve a network")
    port: int = field(7860, "port")
    auth: str | None = field(None, "require a login, given as user:pass")
    concurrency: int = field(1, "requests run at once per model (others wait in the queue)")
    queue_size: int = field(64, "requests allowed to wait in the queue before new ones are refused")
    demographics_template: str = field("auto", "how the Generate tab's sex/age/race (and a batch file's columns) "
                                               "are written in front of the report: auto = the form in the model's "
                                               "card (none named: the fields are refused), roentgen, chexgen, or "
                                               "none (the fields are refused)")
    max_file_size: str = field("50mb", "largest upload accepted")
    max_images: int = field(8, "most images one Generate request may ask for")
    max_batch_images: int = field(200, "most images one Batch request may produce")
    max_unzip_mb: int = field(MAX_BYTES >> 20, "most megabytes the zips of one Evaluate set may unpack to")
    max_zip_members: int = field(10_000, "most entries one uploaded zip may hold")
    device: str = field("auto", "auto, cpu, cuda, xpu, mps")
    precision: str = field("auto", "auto, fp32, fp16, bf16")


class ModelGate:
    """One request on the shared models at a time, interactive ones first: a batch takes the gate per chunk
    of images and waits while any Generate/Clean request is waiting, so one user's long batch delays the
    others by at most one chunk (docs/BENCHMARKS.md, "App latency under a batch")."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._interactive_waiting = 0

    @contextlib.contextmanager
    def hold(self, interactive: bool = True) -> Iterator[None]:
        with self._cond:
            self._interactive_waiting += interactive
            try:
                self._cond.wait_for(lambda: not self._busy and (interactive or not self._interactive_waiting))
            finally:
                self._interactive_waiting -= interactive
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class BatchSampler:
    """The shared sampler as one batch job sees it: each `generate` call (one chunk) takes the gate at low
    priority and first restores the job's own scheduler, which an interactive request may have swapped."""

    def __init__(self, sampler: Any, gate: ModelGate):
        self._sampler, self._gate = sampler, gate
        self.scheduler_name = sampler.scheduler_name

    def use_scheduler(self, name: str) -> None:
        self.scheduler_name = name

    def generate(self, requests: Sequence[Any], **kwargs: Any) -> np.ndarray:
        with self._gate.hold(interactive=False):
            if self._sampler.scheduler_name != self.scheduler_name:
                self._sampler.use_scheduler(self.scheduler_name)
            return self._sampler.generate(requests, **kwargs)

    def __getattr__(self, name: str) -> Any:  # tokenizer, dtype, device, native_size, ...
        return getattr(self._sampler, name)


class Services:
    """Models loaded once and shared by every session; a gate keeps one request on a model at a time."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.gate = ModelGate()
        self._sampler: Any = None
        self._removers: dict[tuple[bool, bool], Any] = {}

    def sampler(self) -> Any:
        from inference.sampler import CXRSampler
        if self._sampler is None:
            self._sampler = CXRSampler.load(self.cfg.model, lora=self.cfg.lora, lora_scale=self.cfg.lora_scale,
                                            device=self.cfg.device, precision=self.cfg.precision)
        return self._sampler

    def remover(self, keep_markers: bool, deidentify: bool = False) -> Any:
        from textremoval.config import TextRemovalConfig
        from textremoval.remover import TextRemover
        key = (keep_markers, deidentify)
        if key not in self._removers:
            tr = TextRemovalConfig(keep_markers=keep_markers, deidentify=deidentify,
                                   sam_checkpoint=self.cfg.sam_checkpoint, device=self.cfg.device,
                                   precision=self.cfg.precision)
            if self.cfg.inpaint_model:
                tr = dataclasses.replace(tr, inpainter="sd", sd_model=self.cfg.inpaint_model, sd_lora=self.cfg.lora)
            self._removers[key] = TextRemover.from_config(tr)
        return self._removers[key]

    @functools.cached_property
    def caption_form(self) -> str | None:
        """The form the Generate tab writes a patient in, as the CLI chooses it (`inference.captions`); None:
        this model takes none (its card names no form, or the app was started with --demographics-template none)."""
        from cxrcommon.models import lora_weights, resolve_model
        from inference.captions import caption_form, model_cards
        lora = lora_weights(self.cfg.lora) if self.cfg.lora else None
        return caption_form(self.cfg.demographics_template, model_cards(resolve_model(self.cfg.model), lora))

    def no_patient(self) -> str:
        """Why this app refuses sex/age/race (when `caption_form` is None), and what to do."""
        if self.cfg.demographics_template == "none":
            return ("this app was started with --demographics-template none, which leaves sex, age and race out — "
                    "clear those fields")
        return ("this model's card names no demographics template: it was not trained with sex, age and race and "
                "would not follow them — clear those fields, or start the app with --demographics-template roentgen "
                "(or chexgen)")

    def model_name(self) -> str:
        """The model as clients see it: its name and content fingerprint, never its folder on the server."""
        from cxrcommon.models import resolve_model
        from cxrcommon.provenance import model_identity
        name, sha = model_identity(self.cfg.model, resolve_model(self.cfg.model))
        return f"{name} (sha256 {sha})" if sha else name

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` holding the model gate as an interactive request."""
        with self.gate.hold():
            return fn(*args, **kwargs)

    def batch_sampler(self) -> BatchSampler:
        """The shared sampler for a batch job, which takes the gate per chunk instead of for the whole job."""
        return BatchSampler(self.run(self.sampler), self.gate)


def session_path(request: Any, root: Path) -> Path:
    """A session's folder under the app's temp root (not created)."""
    name = getattr(request, "session_hash", None) or "anonymous"
    return root / ("".join(c for c in name if c.isalnum())[:64] or "anonymous")


class Sessions:
    """Per-session output folders under the app's temp root: a request's outputs never leave its session's
    folder, which goes when the browser tab closes, but never from under a request still running (then it
    goes when that request ends, instead of being recreated by its next write and left behind).

    `uploads`: Gradio's upload folder (one `<sha>/<name>` folder per uploaded file). The uploads a session
    sent are adopted by it and go with its folder, unless another open session sent the same bytes."""

    def __init__(self, root: Path, uploads: Path | None = None):
        self.root, self._lock = root, threading.Lock()
        self.uploads = uploads.resolve() if uploads is not None else None
        self._busy: dict[Path, int] = {}
        self._closed: set[Path] = set()
        self._adopted: dict[Path, set[Path]] = {}

    def adopt(self, request: Any, files: Any) -> None:
        """Record the uploads (paths, or lists of them) this session sent, to remove them when it ends."""
        if self.uploads is None:
            return
        path = session_path(request, self.root)
        items = files if isinstance(files, (list, tuple)) else [files]
        for f in items:
            if not f:
                continue
            folder = Path(f).resolve().parent
            if folder.parent == self.uploads and not folder.is_relative_to(self.root.resolve()):
                with self._lock:
                    self._adopted.setdefault(path, set()).add(folder)

    def _remove(self, path: Path) -> None:
        """A session's folder and the uploads no other open session sent."""
        shutil.rmtree(path, ignore_errors=True)
        with self._lock:
            mine = self._adopted.pop(path, set())
            others = set().union(*self._adopted.values())
        for folder in mine - others:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def folder(self, request: Any) -> Iterator[Path]:
        path = session_path(request, self.root)
        with self._lock:
            self._busy[path] = self._busy.get(path, 0) + 1
            self._closed.discard(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            yield path
        finally:
            with self._lock:
                self._busy[path] -= 1
                idle = self._busy[path] == 0
                if idle:
                    del self._busy[path]
                drop = idle and path in self._closed
                if drop:
                    self._closed.remove(path)
            if drop:
                self._remove(path)

    def close(self, request: Any) -> None:
        """The tab closed: remove the session's folder now, or when its last running request ends."""
        path = session_path(request, self.root)
        with self._lock:
            busy = path in self._busy
            if busy:
                self._closed.add(path)
        if not busy:
            self._remove(path)


def make_root() -> Path:
    """The app's temp root; first removes roots left by apps that were killed (their pid is gone)."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{ROOT_PREFIX}*"):
        pid = old.name[len(ROOT_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))  # mkdtemp: 0700


def go_private(root: Path) -> Any:
    """Point Gradio's upload/cache folder (GRADIO_TEMP_DIR) at the app's private root and set a 0077 umask, so
    every upload and derived file is its user's only (0600 in 0700 folders) and lies where the app removes it.
    Must run before any component is built (each reads the folder then). Returns the undo."""
    import gradio.route_utils
    import gradio.routes
    before_env, before_mask = os.environ.get("GRADIO_TEMP_DIR"), os.umask(PRIVATE_UMASK)
    os.environ["GRADIO_TEMP_DIR"] = str(root)
    # a few Gradio modules read the variable once, at import (before this ran): the routes make a folder there
    modules = [m for m in (gradio.routes, gradio.route_utils) if isinstance(getattr(m, "DEFAULT_TEMP_DIR", 0), str)]
    before_modules = [m.DEFAULT_TEMP_DIR for m in modules]
    for m in modules:
        m.DEFAULT_TEMP_DIR = str(root)

    def undo() -> None:
        if os.environ.get("GRADIO_TEMP_DIR") == str(root):  # a later app may have pointed it elsewhere
            if before_env is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = before_env
            for m, value in zip(modules, before_modules):
                m.DEFAULT_TEMP_DIR = value
        os.umask(before_mask)
    return undo


def hide_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part: a message never shows a server folder."""
    return _ABS_PATH.sub(lambda m: PurePosixPath(m.group(0).replace("\\", "/")).name or "/", text)


def user_message(exc: BaseException) -> str:
    """The whole message on one line: a multi-line one (a prompt file's bad lines) keeps every reason; files
    are named by their names, never by where they lie on the server."""
    lines = [line.strip() for line in hide_paths(str(exc)).splitlines() if line.strip()]
    text = lines[0] + (" " + "; ".join(lines[1:]) if lines[1:] else "") if lines else type(exc).__name__
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


def user_errors(fn: Any) -> Any:
    """Show bad input as a one-line message in the UI/API instead of a stack trace."""
    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, RuntimeError) as exc:  # UserError and MissingPackageError are ValueErrors
            # a user's mistake is logged in one line; anything else may be a bug, so its traceback is kept
            log.warning("request failed: %s", exc, exc_info=not isinstance(exc, UserError))
            raise gr.Error(user_message(exc)) from exc
    return handler


# --- handlers (thin: each calls one stage API) -------------------------------------------------

def patient(services: Services, sex: Any, age: Any, race: Any) -> Any:
    """The Generate tab's optional fields as `Demographics`, read as strictly as a prompt file's columns; a
    UserError for a value the template does not know, or for any value where this model takes none."""
    from cxrcommon.demographics import parse_demographics
    if isinstance(age, float) and age.is_integer():
        age = int(age)
    d = parse_demographics(sex, "" if age is None else age, race)
    if d and services.caption_form is None:
        raise UserError(services.no_patient())
    return d


def caption_preview(services: Services, report: str, sex: Any = "", age: Any = None, race: Any = "") -> str:
    """What the model will read for the typed report and patient, live under the fields: the caption as the
    CLI builds it (`inference.captions.caption`), or why the fields are refused."""
    from inference.captions import caption
    try:
        d = patient(services, sex, age, race)
    except UserError as exc:
        return f"**Cannot use these fields:** {exc}"
    if not d and not (report or "").strip():
        return ""
    text = caption(report or "", d, services.caption_form)
    form = f" ({services.caption_form} form)" if d else ""
    return f"Caption{form}: `{text.replace('`', chr(39))}`"


def generate_images(services: Services, out_dir: Path, report: str, negative: str, steps: int, guidance: float,
                    scheduler: str, seed: int, n: int, clean_text: bool, sex: Any = "", age: Any = None,
                    race: Any = "") -> tuple[list[str], list[str], int]:
    """Images for one report (and, optionally, the patient asked for: sex, age, race) through the dataset
    generator (same road as the CLI): returns (PNG paths, PNG + DICOM download paths, the seed used; image k
    has seed + k)."""
    from cxrcommon.imageio import read_image, read_png_text, save_image
    from inference.config import GenerateConfig
    from inference.generate import generate

    if not report or not report.strip():
        raise ValueError("type a report first (e.g. 'Moderate left pleural effusion.')")
    n = int(n)
    if not 1 <= n <= services.cfg.max_images:
        raise ValueError(f"number of images must be between 1 and {services.cfg.max_images}")
    d = patient(services, sex, age, race)
    seed = int(seed) if seed is not None and int(seed) >= 0 else int(np.random.default_rng().integers(0, 2**31))
    job = out_dir / f"generate-{seed}-{uuid.uuid4().hex[:8]}"
    prompts = job / "prompts.jsonl"
    row = {"prompt": report.strip(), "n": n, "seed": seed, "negative_prompt": negative or "", "sex": d.sex,
           "age": d.age, "race": d.race}
    atomic_write_text(prompts, json.dumps(row) + "\n")
    cfg = GenerateConfig(prompts=str(prompts), out=str(job / "images"), model=services.cfg.model,
                         lora=services.cfg.lora, lora_scale=services.cfg.lora_scale, steps=int(steps),
                         guidance=float(guidance), scheduler=scheduler, clean=bool(clean_text), batch_size=n,
                         demographics_template=services.cfg.demographics_template,
                         device=services.cfg.device, precision=services.cfg.precision)
    pngs: list[Path] = []
    services.run(lambda: generate(cfg, on_image=pngs.append, sampler=services.sampler()))
    files = []
    for png in pngs:
        dcm = save_image(png.with_suffix(".dcm"), read_image(png), fmt="dcm", tags=read_png_text(png))
        files += [str(png), str(dcm)]
    return [str(p) for p in pngs], files, seed


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    """SD 2.x's CLIP tokenizer (offline), built once for the live token counter."""
    from cxrcommon.tokenizer import clip_tokenizer
    return clip_tokenizer()


def report_length(report: str) -> str:
    """What the model will read of a typed report: its CLIP tokens, the 75-token windows they fill and,
    past the window cap, what the cut keeps (shown live under the Report box)."""
    from cxrcommon.prompt_windows import DEFAULT_MAX_WINDOWS, WINDOW
    from cxrcommon.reports import fit_windows, normalize_report

    text = normalize_report(report or "")
    if not text:
        return f"0 CLIP tokens (reports are encoded whole, up to {DEFAULT_MAX_WINDOWS} windows of {WINDOW})"
    fit = fit_windows(text, _tokenizer(), max_windows=DEFAULT_MAX_WINDOWS)
    if not fit.cut:
        return (f"{fit.tokens} CLIP tokens = {fit.windows} window(s) of {WINDOW}: encoded whole"
                + (" (the stock pipeline would read only the first 75)" if fit.windows > 1 else ""))
    return (f"over {DEFAULT_MAX_WINDOWS} windows of {WINDOW} tokens: cut to {fit.tokens} tokens, impression first"
            + ("; **the impression itself was shortened**" if fit.impression_cut else "")
            + f". Encoded: {fit.text[:200]}{'...' if len(fit.text) > 200 else ''}")


def batch_dataset(services: Services, out_dir: Path, prompt_file: str, n_per_prompt: int, steps: int,
                  guidance: float, seed: int, fmt: str) -> tuple[str, str]:
    """Run the dataset generator on an uploaded prompt file; return (zip path, summary)."""
    from inference.config import GenerateConfig
    from inference.generate import generate
    from inference.prompts import read_prompts

    if not prompt_file:
        raise ValueError("upload a prompt file (.txt, .csv or .jsonl) first")
    rows = read_prompts(prompt_file, default_n=int(n_per_prompt))
    total = sum(r.n for r in rows)
    if total > services.cfg.max_batch_images:
        raise ValueError(f"that file asks for {total} images; this app allows {services.cfg.max_batch_images} "
                         f"per request: use `python -m inference.generate` for large jobs")
    job = out_dir / "dataset"
    shutil.rmtree(job, ignore_errors=True)
    cfg = GenerateConfig(prompts=str(prompt_file), out=str(job), model=services.cfg.model, lora=services.cfg.lora,
                         lora_scale=services.cfg.lora_scale, n_per_prompt=int(n_per_prompt), steps=int(steps),
                         guidance=float(guidance), seed=int(seed), format=fmt,
                         demographics_template=services.cfg.demographics_template,
                         device=services.cfg.device, precision=services.cfg.precision)
    summary = generate(cfg, sampler=services.batch_sampler())
    archive = out_dir / "dataset.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(walk_files(job)):
            if p.name == "settings.json" and p.parent == job:  # names the model by name, not its server folder
                settings = json.loads(p.read_text(encoding="utf-8"))
                settings["model"] = services.model_name()
                zf.writestr("settings.json", json.dumps(settings, indent=1, sort_keys=True))
            elif p.is_file():
                zf.write(p, p.relative_to(job))
    return str(archive), f"{summary.generated} images from {len(rows)} prompts → {archive.name}"


def clean_upload(services: Services, out_dir: Path, path: str, keep_markers: bool,
                 deidentify: bool = False) -> tuple[Any, ...]:
    """Clean one uploaded image: (annotated view, cleaned PNG, mask PNG, downloads, regions table).
    `deidentify`: a DICOM also gets the PS3.15 header profile; its audit is in the regions JSON."""
    from cxrcommon.imageio import read_image, write_png
    from textremoval.clean import clean_file

    if not path:
        raise ValueError("upload a PNG, JPEG or DICOM image first")
    src = Path(path)
    if src.suffix.lower() not in UPLOAD_TYPES:
        raise ValueError(f"{src.name}: unsupported file type; upload PNG, JPEG, TIFF or DICOM")
    original = read_image(src)  # raises ImageReadError with a clear message on bad uploads
    remover = services.remover(bool(keep_markers), bool(deidentify))
    job = out_dir / "clean"
    shutil.rmtree(job, ignore_errors=True)
    record = services.run(clean_file, src, job, remover=remover)
    cleaned_view = write_png(job / "cleaned_view.png", read_image(record["output"]))
    # the boxes are drawn on a file in the session's folder (Gradio would cache an array in its shared folder);
    # a de-identifying request shows them on the cleaned image: the original's burnt-in identifiers never
    # leave the upload
    annotated = cleaned_view if deidentify else write_png(job / "detected_view.png", original)
    regions = record["regions"]
    boxes = [(tuple(int(v) for v in r["box"]), f"{r.get('text') or '?'} ({r['action']})") for r in regions]
    table = [[r.get("text") or "", round(float(r.get("score") or 0), 3), r["action"], str(r["box"])] for r in regions]
    files = [record["output"], record["mask"], record["mask"].removesuffix(".mask.png") + ".regions.json"]
    return (str(annotated), boxes), str(cleaned_view), record["mask"], files, table


def _zip_images(up: Path, zf: zipfile.ZipFile, max_members: int) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The image members of an uploaded zip and their safe relative paths; an unsafe or repeated name is
    refused with a message (never dropped, so the image count N stays what the user sent)."""
    members = zf.infolist()
    if len(members) > max_members:
        raise UserError(f"{up.name}: {len(members)} entries exceeds the limit of {max_members} — split the zip")
    found: dict[PurePosixPath, zipfile.ZipInfo] = {}
    for member in members:
        rel = PurePosixPath(member.filename.replace("\\", "/"))
        if member.is_dir() or rel.suffix.lower() not in UPLOAD_TYPES:
            continue
        if rel.is_absolute() or ".." in rel.parts or ":" in rel.parts[0]:
            raise UserError(f"{up.name}: entry {member.filename!r} points outside the archive (absolute path or "
                            f"'..') — rebuild the zip with relative paths")
        if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # zipfile bounds what one read of a deflated member inflates, not of LZMA/BZIP2 ones
            raise UserError(f"{up.name}: entry {member.filename!r} is compressed with method {member.compress_type} "
                            f"— rebuild the zip with the standard (deflate) or no compression")
        if rel in found:
            raise UserError(f"{up.name}: entry {member.filename!r} appears twice — rebuild the zip so every image "
                            f"has its own path")
        found[rel] = member
    return [(m, rel) for rel, m in found.items()]


def unpack_uploads(uploads: Sequence[str], folder: Path, *, max_bytes: int, max_members: int) -> None:
    """Copy uploaded images, and the images inside uploaded zips, into `folder`, each upload in its own
    subfolder so `a/x.png` and `b/x.png` stay two images. Zip members are streamed in 1 MiB chunks under
    a budget of `max_bytes` uncompressed for the whole set, checked on the declared sizes before anything is
    unpacked and again on the bytes actually written (a zip may lie about its sizes); only stored and
    deflated members are accepted, whose reads zipfile bounds, so a zip bomb costs neither memory nor disk."""
    written = 0
    for i, up in enumerate(map(Path, uploads)):
        if up.suffix.lower() in UPLOAD_TYPES:
            written += up.stat().st_size
            check_bytes(f"the uploaded images ({up.name})", written, max_bytes)
            shutil.copy(up, folder / f"{i:03d}-{up.name}")
            continue
        if up.suffix.lower() != ".zip":
            raise UserError(f"{up.name}: not an image or a .zip — upload PNG/JPEG/TIFF/DICOM images or a zip of them")
        try:
            with zipfile.ZipFile(up) as zf:
                images = _zip_images(up, zf, max_members)
                check_bytes(f"{up.name} (uncompressed)", written + sum(m.file_size for m, _ in images), max_bytes)
                for member, rel in images:
                    target = folder / f"{i:03d}-{up.stem}" / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            written += len(chunk)
                            check_bytes(f"{up.name} (uncompressed)", written, max_bytes)
                            dst.write(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
            raise UserError(f"{up.name}: cannot unpack ({exc}) — upload a plain, unencrypted zip") from exc


def evaluate_sets(out_dir: Path, real: Sequence[str] | None, fake: Sequence[str] | None, features: str, *,
                  max_bytes: int = MAX_BYTES, max_members: int = 10_000) -> tuple[str, str]:
    """FID/KID/PRDC between two uploaded sets (zips or images); returns (Markdown report, JSON path)."""
    from eval.fid import FidConfig, evaluate
    from eval.sources import list_images

    sets = {}
    for name, uploads in (("real", real), ("fake", fake)):
        if not uploads:
            raise ValueError(f"upload the {name} images (a .zip or several images)")
        folder = out_dir / "eval" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            unpack_uploads(uploads, folder, max_bytes=max_bytes, max_members=max_members)
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            n_images = len(list_images(folder))
        except FileNotFoundError:  # no image at all
            n_images = 0
        if n_images < 2:
            raise ValueError(f"the {name} set needs at least 2 images (PNG/JPEG/DICOM, or a zip of them)")
        sets[name] = folder
    # no feature cache: it would keep features of the uploaded images in the user cache after the session
    result = evaluate(FidConfig(real=str(sets["real"]), fake=str(sets["fake"]), features=features,
                                out=str(out_dir / "eval" / "report"), no_cache=True))
    return Path(result["report"]["markdown"]).read_text(encoding="utf-8"), result["report"]["json"]


def slider_defaults(model: str | None) -> tuple[int, float]:
    """(steps, guidance) the sliders start at: the embedded demonstrator's measured best, else SD's usual."""
    from cxrcommon.models import EMBEDDED, EMBEDDED_DIR, EMBEDDED_GUIDANCE, EMBEDDED_STEPS
    if model in (None, EMBEDDED) or Path(model).resolve() == EMBEDDED_DIR.resolve():
        return EMBEDDED_STEPS, EMBEDDED_GUIDANCE
    return 30, 4.0


# --- UI --------------------------------------------------------------------------------------

def build_app(cfg: AppConfig, services: Services | None = None) -> Any:
    """The Blocks app (not launched), so tests and other servers can mount it."""
    from cxrcommon.demographics import RACES
    from inference.sampler import SCHEDULERS

    services = services or Services(cfg)
    root = make_root()
    atexit.register(shutil.rmtree, root, True)
    undo_private = go_private(root)  # before any component reads GRADIO_TEMP_DIR
    default_steps, default_guidance = slider_defaults(cfg.model)

    progress = gr.Progress(track_tqdm=True)

    # sessions' folders lie inside Gradio's folder, so their files are served as they are, not copied into it
    sessions = Sessions(root / "sessions", uploads=root)

    @user_errors
    def on_generate(report, negative, steps, guidance, scheduler, seed, n, clean_text, sex="", age=None, race="",
                    request: gr.Request = None, progress=progress):
        with sessions.folder(request) as folder:
            return generate_images(services, folder, report, negative, steps, guidance, scheduler, seed, n,
                                   clean_text, sex, age, race)

    def on_caption(report, sex="", age=None, race=""):
        return caption_preview(services, report, sex, age, race)

    @user_errors
    def on_batch(prompt_file, n_per_prompt, steps, guidance, seed, fmt, request: gr.Request, progress=progress):
        sessions.adopt(request, prompt_file)
        with sessions.folder(request) as folder:
            return batch_dataset(services, folder, prompt_file, n_per_prompt, steps, guidance, seed, fmt)

    @user_errors
    def on_clean(upload, keep_markers, deidentify, request: gr.Request, progress=progress):
        sessions.adopt(request, upload)
        with sessions.folder(request) as folder:
            return clean_upload(services, folder, upload, keep_markers, deidentify)

    @user_errors
    def on_evaluate(real, fake, features, request: gr.Request, progress=progress):
        sessions.adopt(request, [*(real or []), *(fake or [])])
        with sessions.folder(request) as folder:
            return evaluate_sets(folder, real, fake, features, max_bytes=cfg.max_unzip_mb << 20,
                                 max_members=cfg.max_zip_members)

    def on_unload(request: gr.Request) -> None:
        """The browser tab closed: this session's outputs and uploads go (API clients' go when the app stops)."""
        sessions.close(request)

    def on_upload(files, request: gr.Request) -> None:
        """A browser upload belongs to its session from the start, used by a request or not."""
        sessions.adopt(request, files)

    def adopt_uploads(*components: Any) -> None:
        for c in components:
            c.upload(on_upload, c, None, queue=False, api_visibility="private", show_progress="hidden")

    # delete_cache: what Gradio itself writes to its (private) folder, e.g. the annotation masks, goes after a day
    # (checked hourly); uploads and outputs go with their session, and everything when the app stops
    with gr.Blocks(title="synthcxr", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# synthcxr\nModel: `{services.model_name()}` — every image is **synthetic** and marked so "
                    "in its metadata. Not for diagnosis.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    report = gr.Textbox(label="Report", lines=4, placeholder="Findings / impression text")
                    length = gr.Markdown(report_length(""))
                    gr.Examples(EXAMPLES, inputs=report)
                    negative = gr.Textbox(label="Negative prompt", value="")
                    with gr.Row():  # free text is accepted too (API clients); the handler reads it strictly
                        sex = gr.Dropdown([("—", ""), ("female", "F"), ("male", "M")], value="",
                                          allow_custom_value=True, label="Sex (optional)")
                        age = gr.Number(value=None, precision=0, label="Age in years (optional)")
                        race = gr.Dropdown([("—", ""), *((r, r) for r in RACES)], value="", allow_custom_value=True,
                                           label="Race (optional)")
                    preview = gr.Markdown(caption_preview(services, ""))
                    with gr.Row():
                        steps = gr.Slider(1, 150, value=default_steps, step=1, label="Steps")
                        guidance = gr.Slider(1.0, 15.0, value=default_guidance, step=0.5, label="Guidance")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                        n = gr.Slider(1, cfg.max_images, value=2, step=1, label="Images")
                    clean_text = gr.Checkbox(label="Clean burnt-in text", value=False)
                    go = gr.Button("Generate", variant="primary")
                with gr.Column():
                    gallery = gr.Gallery(label="Synthetic X-rays", columns=2, format="png")
                    used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                    downloads = gr.File(label="Downloads (PNG with provenance, DICOM)", file_count="multiple")
            report.change(report_length, report, length, api_name="report_length", queue=False,
                          show_progress="hidden")
            gr.on([report.change, sex.change, age.change, race.change], on_caption, [report, sex, age, race], preview,
                  api_name="caption", queue=False, show_progress="hidden")
            go.click(on_generate, [report, negative, steps, guidance, scheduler, seed, n, clean_text, sex, age, race],
                     [gallery, downloads, used_seed], api_name="generate", concurrency_id="generate",
                     concurrency_limit=cfg.concurrency)
        with gr.Tab("Batch"):
            prompt_file = gr.File(label="Prompt file (.txt / .csv / .jsonl; columns prompt and, optionally, n, seed, "
                                        "label, negative_prompt, sex, age, race)",
                                  file_types=[".txt", ".csv", ".jsonl"])
            with gr.Row():
                b_n = gr.Number(value=1, precision=0, label="Images per prompt (where the file gives no n)")
                b_steps = gr.Slider(1, 150, value=default_steps, step=1, label="Steps")
                b_guidance = gr.Slider(1.0, 15.0, value=default_guidance, step=0.5, label="Guidance")
                b_seed = gr.Number(value=0, precision=0, label="Base seed")
                b_fmt = gr.Dropdown(["png", "png16", "dcm"], value="png", label="Format")
            b_go = gr.Button("Build dataset", variant="primary")
            b_zip = gr.File(label="Dataset (.zip with manifest.jsonl)")
            b_summary = gr.Markdown()
            b_go.click(on_batch,
                       [prompt_file, b_n, b_steps, b_guidance, b_seed, b_fmt], [b_zip, b_summary],
                       api_name="batch", concurrency_id="batch", concurrency_limit=cfg.concurrency)
        with gr.Tab("Clean"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="X-ray (PNG / JPEG / DICOM)", file_types=UPLOAD_TYPES)
                    keep = gr.Checkbox(label="Keep laterality markers (L/R, D/I)", value=True)
                    deid = gr.Checkbox(label="De-identify DICOM (PS3.15 header profile; the patient's name and ID "
                                             "are erased from the pixels too)", value=False)
                    c_go = gr.Button("Clean", variant="primary")
                with gr.Column():
                    detected = gr.AnnotatedImage(label="Detected text")
                    cleaned = gr.Image(label="Cleaned", type="filepath", format="png")
                    mask = gr.Image(label="Mask", type="filepath", format="png")
            regions = gr.Dataframe(headers=["text", "score", "action", "box"], label="Regions")
            c_files = gr.File(label="Downloads", file_count="multiple")
            c_go.click(on_clean, [upload, keep, deid],
                       [detected, cleaned, mask, c_files, regions], api_name="clean", concurrency_id="clean",
                       concurrency_limit=cfg.concurrency)
        with gr.Tab("Evaluate"):
            with gr.Row():
                real = gr.File(label="Real images (.zip or images)", file_count="multiple")
                fake = gr.File(label="Synthetic images (.zip or images)", file_count="multiple")
            features = gr.Dropdown(["inception", "xrv", "tiny"], value="inception", label="Features")
            e_go = gr.Button("Evaluate", variant="primary")
            e_report = gr.Markdown()
            e_json = gr.File(label="Report (JSON)")
            e_go.click(on_evaluate, [real, fake, features], [e_report, e_json],
                       api_name="evaluate", concurrency_id="evaluate", concurrency_limit=1)
        adopt_uploads(prompt_file, upload, real, fake)
        demo.unload(on_unload)
    demo.queue(max_size=cfg.queue_size, default_concurrency_limit=cfg.concurrency)
    demo.synthcxr_root = root
    close = demo.close

    def close_and_remove(verbose: bool = True) -> None:
        """Stopping the app removes every session's outputs and every upload, and undoes `go_private`."""
        try:
            close(verbose)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            undo_private()

    demo.close = close_and_remove
    return demo


def launch(cfg: AppConfig, **kwargs: Any) -> Any:
    """Build and start the app on cfg.host:cfg.port (127.0.0.1 unless told otherwise)."""
    demo = build_app(cfg)
    auth = tuple(cfg.auth.split(":", 1)) if cfg.auth else None
    if cfg.auth and len(auth) != 2:  # type: ignore[arg-type]
        raise SystemExit("--auth must look like user:pass")
    demo.launch(server_name=cfg.host, server_port=cfg.port, auth=auth, max_file_size=cfg.max_file_size,
                allowed_paths=[str(demo.synthcxr_root)], show_error=False, **kwargs)
    return demo


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM stops the app as Ctrl-C does, so its folders are removed (a killed Python runs no cleanup)."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> None:
    from cxrcommon.logs import setup_logging
    setup_logging()
    cfg = parse_config(AppConfig, argv, __doc__.splitlines()[0])
    log.info("starting on http://%s:%d", cfg.host, cfg.port)
    signal.signal(signal.SIGTERM, _stop)
    demo = None
    try:
        demo = launch(cfg)  # blocks until Ctrl-C or SIGTERM, then returns
    except KeyboardInterrupt:
        pass
    finally:
        if demo is not None:
            demo.close()  # removes the app's folder; atexit does it if the app stopped before it launched


if __name__ == "__main__":
    main()
