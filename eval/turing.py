"""Visual Turing test: build a blinded reading set, then score readers' answer sheets.

`build` re-encodes every image as a plain 8-bit PNG with a neutral name, so neither file names, formats
nor PNG/EXIF provenance chunks give the answer away; the key goes to a hidden folder the organiser keeps.
`score` reports accuracy, sensitivity (synthetic called synthetic), specificity, exact binomial p-values
against guessing (50%) and Fleiss' kappa between readers."""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxrcommon.atomic import atomic_write_text
from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.csv_cells import safe_dict, unescape
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging
from cxrcommon.paths import read_user_text
from cxrcommon.provenance import file_sha256

from .cli import parse, user_errors
from .sources import list_images, subsample

log = logging.getLogger(__name__)
KEY = Path(".key") / "key.csv"
SHEET = "answer_sheet.csv"
CATEGORIES = ("real", "synthetic")
ANSWERS = {"real": "real", "r": "real", "0": "real", "synthetic": "synthetic", "s": "synthetic", "fake": "synthetic",
           "f": "synthetic", "1": "synthetic", "generated": "synthetic"}


@dataclasses.dataclass
class BuildConfig:
    real: str = field("", "folder or manifest of real images")
    fake: str = field("", "folder or manifest of synthetic images")
    n: int = field(50, "images drawn from EACH set (the study holds 2n)")
    out: str = field("", "study folder to create")
    size: int = field(512, "square side every image is resized to (centre crop), so size gives nothing away; "
                      "0 keeps sizes")
    seed: int = field(0, "seed for sampling and shuffling")
    image_column: str = field("image", "manifest column holding image paths")
    verbose: bool = field(False, "debug logging")


@dataclasses.dataclass
class ScoreConfig:
    study: str = field("", "study folder made by `build` (positional STUDY works too)")
    answers: list[str] = field([], "answer CSVs, one per reader (columns image, answer[, reader])")
    out: str = field("", "report folder (default: STUDY/results)")
    verbose: bool = field(False, "debug logging")


def _csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(safe_dict(r) for r in rows)
    return buf.getvalue()


def build_study(real: str | Path, fake: str | Path, out: str | Path, n: int = 50, *, size: int = 512, seed: int = 0,
                image_column: str = "image") -> dict[str, Any]:
    """Sample n real + n synthetic images, shuffle, write neutral PNGs, the hidden key and a blank answer sheet.

    Args:
        real: the real images: a folder (recursive) or a manifest.
        fake: the synthetic images: a folder or a manifest.
        out: the study folder; refused (FileExistsError) if it already holds a key.
        n: images drawn from each set, >= 0 (0 or more than the set: all of it).
        size: side in pixels each image is resized to (short side) and centre-cropped to, or 0 to keep its size.
        seed: seeds the two draws and the shuffle.
        image_column: the manifests' image-path column.
    Returns: {"study": folder, "n_images", "n_real", "n_synthetic", "size", "skipped": unreadable sources}."""
    from cxrcommon.imageio import ImageReadError, read_image, to_square, write_png
    out = Path(out)
    if (out / KEY).exists():
        raise FileExistsError(f"{out} already holds a study (key {out / KEY}); choose a new --out")
    items = [(p, "real") for p in subsample(list_images(real, image_column), n, seed, "real images")]
    items += [(p, "synthetic") for p in subsample(list_images(fake, image_column), n, seed + 1, "synthetic images")]
    random.Random(seed).shuffle(items)
    key, width, skipped = [], len(str(len(items))), []
    for src, truth in items:
        try:
            arr = read_image(src)
        except (ImageReadError, OSError) as exc:
            log.warning("skipping %s: %s", src, exc)
            skipped.append(str(src))
            continue
        if size:
            arr = to_square(arr, size, mode="crop")
        name = f"case_{len(key) + 1:0{width}d}.png"
        write_png(out / "images" / name, arr, bits=8)  # pixels only: no text chunks, no EXIF
        key.append({"image": name, "truth": truth, "source": str(src), "source_sha256": file_sha256(src)})
    atomic_write_text(out / KEY, _csv(key, ["image", "truth", "source", "source_sha256"]))
    atomic_write_text(out / SHEET, _csv([{"image": k["image"], "answer": "", "confidence": ""} for k in key],
                                        ["image", "answer", "confidence"]))
    atomic_write_text(out / "README.txt", (
        f"Reading set of {len(key)} chest X-rays, some real and some synthetic.\n"
        f"Give each reader images/ and a copy of {SHEET}; they fill `answer` with real or synthetic\n"
        "(and optionally `confidence` 1-5), and save it as answers_<reader>.csv.\n"
        f"The key is in {KEY}: move it away before sharing this folder. Score with\n"
        f"  python -m eval.turing score {out} answers_*.csv\n"))
    return {"study": str(out), "n_images": len(key), "n_real": sum(k["truth"] == "real" for k in key),
            "n_synthetic": sum(k["truth"] == "synthetic" for k in key), "size": size, "skipped": skipped}


def rate(k: int, n: int) -> dict[str, Any]:
    """k of n with an exact two-sided binomial p-value against 0.5 and a Clopper-Pearson 95% CI."""
    from scipy.stats import binomtest
    if n == 0:
        return {"k": 0, "n": 0, "rate": float("nan"), "p_value": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan")}
    t = binomtest(k, n, 0.5, alternative="two-sided")
    ci = t.proportion_ci(confidence_level=0.95, method="exact")
    return {"k": k, "n": n, "rate": k / n, "p_value": float(t.pvalue), "ci_low": float(ci.low),
            "ci_high": float(ci.high)}


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an (items, categories) table of how many raters chose each category.

    Every item must have the same number of raters (>= 2). statsmodels has this too; it is not a
    dependency of this project, and the formula is five lines (Fleiss 1971)."""
    counts = np.asarray(counts, dtype=float)
    raters = counts.sum(1)
    if counts.ndim != 2 or len(counts) == 0 or not np.allclose(raters, raters[0]) or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs an (items, categories) table with the same number (>= 2) "
                         "of raters per item")
    m = raters[0]
    p_item = ((counts ** 2).sum(1) - m) / (m * (m - 1))
    p_cat = counts.sum(0) / counts.sum()
    p_bar, p_e = p_item.mean(), (p_cat ** 2).sum()
    return float("nan") if np.isclose(p_e, 1.0) else float((p_bar - p_e) / (1 - p_e))


def read_answers(path: str | Path, key: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(reader, image -> answer) from one CSV; unknown images or answers are errors naming the row."""
    path = Path(path)
    with io.StringIO(read_user_text(path, "answers file"), newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "answer"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs columns image and answer (got {reader.fieldnames}); start from "
                             f"the study's {SHEET}")
        name, answers = path.stem, {}
        for line, row in enumerate(reader, start=2):
            image, raw = (row.get("image") or "").strip(), (row.get("answer") or "").strip().lower()
            if (row.get("reader") or "").strip():
                name = row["reader"].strip()
            if image not in key:
                raise ValueError(f"{path}:{line}: image {image!r} is not in this study's key; check the file name")
            if not raw:
                continue
            if raw not in ANSWERS:
                raise ValueError(f"{path}:{line}: answer {raw!r} for {image}; write real or synthetic")
            answers[image] = ANSWERS[raw]
    return name, answers


def _stats(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Rates from (truth, answer) pairs; positives are synthetic images."""
    syn = [said for truth, said in pairs if truth == "synthetic"]
    real = [said for truth, said in pairs if truth == "real"]
    return {"n_answered": len(pairs),
            "accuracy": rate(sum(t == s for t, s in pairs), len(pairs)),
            "sensitivity": rate(syn.count("synthetic"), len(syn)),
            "specificity": rate(real.count("real"), len(real))}


def score_study(study: str | Path, answer_files: Sequence[str | Path]) -> dict[str, Any]:
    """Per-reader and pooled accuracy/sensitivity/specificity with binomial tests, and Fleiss' kappa."""
    study = Path(study)
    if not (study / KEY).is_file():
        raise FileNotFoundError(f"{study / KEY} not found: score needs the study's key (put it back if moved)")
    with open(study / KEY, newline="", encoding="utf-8") as fh:
        key = {unescape(row["image"]): unescape(row["truth"]) for row in csv.DictReader(fh)}
    if not answer_files:
        raise ValueError("no answer CSVs given: python -m eval.turing score STUDY answers_*.csv")
    readers: dict[str, dict[str, str]] = {}
    for f in answer_files:
        name, answers = read_answers(f, key)
        if name in readers:
            name = f"{name} ({Path(f).name})"
        readers[name] = answers
    per_reader = {name: {**_stats([(key[i], said) for i, said in a.items()]), "n_unanswered": len(key) - len(a)}
                  for name, a in readers.items()}
    pooled = _stats([(key[i], said) for a in readers.values() for i, said in a.items()])
    common = [i for i in key if all(i in a for a in readers.values())]
    kappa = (fleiss_kappa(np.array([[sum(readers[r][i] == c for r in readers) for c in CATEGORIES] for i in common]))
             if len(readers) >= 2 and common else float("nan"))
    return {"study": str(study), "n_images": len(key), "n_readers": len(readers), "readers": per_reader,
            "pooled": pooled, "fleiss_kappa": kappa, "kappa_items": len(common)}


def _report(result: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib.pyplot as plt

    from .outputs import markdown_table, write_report
    rows = []
    for name, s in [*result["readers"].items(), ("pooled", result["pooled"])]:
        rows.append({"reader": name, "n": s["n_answered"],
                     **{f"{m}": f"{100 * s[m]['rate']:.1f}% ({s[m]['k']}/{s[m]['n']}), p={s[m]['p_value']:.3g}"
                        for m in ("accuracy", "sensitivity", "specificity")}})
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    for y, (name, s) in enumerate([*result["readers"].items(), ("pooled", result["pooled"])]):
        a = s["accuracy"]
        ax.errorbar(a["rate"], y, xerr=[[a["rate"] - a["ci_low"]], [a["ci_high"] - a["rate"]]], fmt="o", capsize=3)
    ax.axvline(0.5, color="k", ls="--", lw=0.8)
    ax.set_yticks(range(len(rows)), [r["reader"] for r in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy telling real from synthetic (95% exact CI; 0.5 = guessing)")
    notes = ["Sensitivity = synthetic images called synthetic; specificity = real images called real; "
             "p-values are exact two-sided binomial tests against 50% (scipy.stats.binomtest)."]
    return write_report(out, "turing", result, title="Visual Turing test", notes=notes,
                        sections={"Readers": markdown_table(rows)}, figures={"accuracy": fig})


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m eval.turing build --real DIR --fake DIR --n 50 --out STUDY\n"
             "       python -m eval.turing score STUDY answers*.csv   (add --help after build/score)")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        raise SystemExit(0)
    if not argv or argv[0] not in ("build", "score"):
        raise UserError(usage)
    command, rest = argv[0], argv[1:]
    if command == "build":
        cfg = parse(BuildConfig, rest, "Build a blinded, shuffled real/synthetic reading set with a hidden key.")
        setup_logging(cfg.verbose)
        if not (cfg.real and cfg.fake and cfg.out):
            raise UserError("build needs --real, --fake and --out")
        with user_errors():
            result = build_study(cfg.real, cfg.fake, cfg.out, cfg.n, size=cfg.size, seed=cfg.seed,
                             image_column=cfg.image_column)
        print(f"study with {result['n_images']} images in {cfg.out}; key in {Path(cfg.out) / KEY}")
        return result
    cfg = parse(ScoreConfig, rest, "Score readers' answer sheets against a study's key.",
                positional=("study", "answers"))
    setup_logging(cfg.verbose)
    with user_errors():
        result = score_study(cfg.study, cfg.answers)
    result["report"] = _report(result, Path(cfg.out) if cfg.out else Path(cfg.study) / "results")
    p = result["pooled"]["accuracy"]
    print(f"pooled accuracy {100 * p['rate']:.1f}% ({p['k']}/{p['n']}), p={p['p_value']:.3g}; "
          f"Fleiss kappa {result['fleiss_kappa']:.3f}; report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()
