"""Diversity of samples that share a prompt: mean pairwise MS-SSIM per group (lower = more diverse).

A generator that ignores its seed (mode collapse) gives near-duplicates for a prompt and MS-SSIM near 1.
`--by COLUMN` (a column of the folder's manifest.jsonl: sex, age_band, race, label, ...; eval.subgroups) also
reports the mean per group, over pairs whose two images are both in the group, with a bootstrap interval that
resamples prompts (pairs of one prompt are not independent)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cxrcommon.atomic import read_jsonl
from cxrcommon.cli import cli_entry
from cxrcommon.config import field
from cxrcommon.errors import UserError
from cxrcommon.logs import setup_logging

from .cli import parse, user_errors
from .features import to_square_tensor
from .sources import list_images
from .subgroups import check_by, groups, per_group, rows_for, sections, split_by

log = logging.getLogger(__name__)
PATH_KEYS = ("image", "file", "file_name", "path")


@dataclasses.dataclass
class DiversityConfig:
    dir: str = field("", "folder of generated images (positional DIR works too)")
    group_by: str = field("prompt", "PNG text chunk / manifest.jsonl key whose equal values form a group")
    size: int = field(256, "side images are resized to before MS-SSIM (>= 176 for the 5 standard scales)")
    max_pairs: int = field(200, "at most this many random pairs per group (0 = all)")
    seed: int = field(0, "seed for pair sampling and the --by bootstrap")
    by: list[str] = field([], "also report MS-SSIM per group of these manifest.jsonl columns: sex, age_band, race, "
                          "label (each '|' label) or any column (`--by sex race` or `--by sex,race`)")
    n_boot: int = field(1000, "--by: bootstrap resamples (of prompts) per group")
    out: str = field("eval_out/diversity", "folder for diversity.json, diversity.md and plots")
    verbose: bool = field(False, "debug logging")


def group_images(folder: str | Path, key: str = "prompt") -> dict[str, list[Path]]:
    """Images grouped by `key`, from each PNG's text chunk, else from the folder's manifest.jsonl."""
    from cxrcommon.imageio import ImageReadError, read_png_text
    folder = Path(folder)
    from_manifest: dict[str, str] = {}
    for row in read_jsonl(folder / "manifest.jsonl"):
        name = next((row[k] for k in PATH_KEYS if k in row), None)
        if name is not None and key in row:
            from_manifest[Path(name).name] = str(row[key])
    groups: dict[str, list[Path]] = defaultdict(list)
    missing = 0
    for p in list_images(folder):
        try:
            value = read_png_text(p).get(key) if p.suffix.lower() == ".png" else None
        except (ImageReadError, OSError):
            value = None  # a broken PNG: its pixels will not read either, diversity() skips it
        value = value if value is not None else from_manifest.get(p.name)
        if value is None:
            missing += 1
        else:
            groups[value].append(p)
    if missing:
        log.warning("%d image(s) in %s carry no %r (PNG text chunk or manifest.jsonl); left out", missing, folder, key)
    return dict(groups)


def ms_ssim_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MS-SSIM (torchmetrics, 5 scales, data range 1) of each pair of (N, 1, S, S) images."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
    return ms_ssim(a, b, data_range=1.0, reduction="none").reshape(-1)


def diversity(folder: str | Path, group_by: str = "prompt", *, size: int = 256, max_pairs: int = 200,
              seed: int = 0, by: Sequence[str] = (), n_boot: int = 1000) -> dict[str, Any]:
    """Per-group and pooled mean pairwise MS-SSIM; groups with one image are reported but not scored. With `by`
    (manifest.jsonl columns, checked first), `by[column]` holds the per-subgroup rows (see `_by_subgroup`)."""
    from cxrcommon.imageio import ImageReadError, read_image
    by = split_by(by)
    if by:
        check_by(by, {"DIR": folder})
    if size < 176:
        raise ValueError(f"--size {size}: MS-SSIM with 5 scales and an 11-px window needs images of at least 176 px")
    prompts = group_images(folder, group_by)
    if not prompts:
        raise ValueError(f"{folder}: no image carries a {group_by!r} value; generate with the synthcxr generator "
                         f"(it writes the prompt into each PNG) or add a manifest.jsonl with {group_by!r}")
    rng = random.Random(seed)
    rows, scores, skipped, scored = [], [], [], []
    for value, paths in sorted(prompts.items()):
        imgs, read = [], []
        for p in paths:
            try:
                imgs.append(to_square_tensor(read_image(p), size))
                read.append(p)
            except (ImageReadError, OSError) as exc:
                log.warning("skipping %s: %s", p, exc)
                skipped.append(f"{p}: {exc}")
        pairs = list(itertools.combinations(range(len(imgs)), 2))
        if max_pairs and len(pairs) > max_pairs:
            pairs = rng.sample(pairs, max_pairs)
        row = {"group": value[:80], "n_images": len(imgs), "n_pairs": len(pairs), "ms_ssim": float("nan")}
        if pairs:
            imgs = torch.cat(imgs)
            i, j = (torch.tensor(x) for x in zip(*pairs))
            s = ms_ssim_pairs(imgs[i], imgs[j])
            row["ms_ssim"] = float(s.mean())
            scores.append(s)
            scored.append((read, pairs, s))
        rows.append(row)
    pooled = torch.cat(scores) if scores else torch.zeros(0)
    result = {"folder": str(folder), "group_by": group_by, "size": size, "n_groups": len(prompts),
            "n_scored_groups": len(scores), "n_images": sum(r["n_images"] for r in rows), "skipped": skipped,
            "n_pairs": int(pooled.numel()),
            "ms_ssim_mean": float(pooled.mean()) if pooled.numel() else float("nan"),
            "ms_ssim_std": float(pooled.std()) if pooled.numel() > 1 else float("nan"),
            "groups": rows, "pair_scores": pooled.tolist()}
    if by:
        result["by"] = {col: _by_subgroup(scored, folder, col, n_boot, seed) for col in by}
    return result


def _by_subgroup(scored: list[tuple[list[Path], list[tuple[int, int]], torch.Tensor]], folder: str | Path, by: str,
                 n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Mean MS-SSIM per subgroup of column `by`, over the pairs whose two images are both in it.

    Args:
        scored: per prompt, its readable images, its scored pairs (indices into them) and their MS-SSIM.
    Returns: one row per subgroup: group, n_prompts, n_images, ms_ssim, ci, n_boot_used, note."""
    images = [p for paths, _, _ in scored for p in paths]
    members = {g: {images[i] for i in ix} for g, ix in groups(rows_for(images, folder), by).items()}
    parts: list[torch.Tensor] = []            # in-group pair scores of one (prompt, subgroup)
    index: dict[str, list[int]] = {g: [] for g in members}
    for paths, pairs, s in scored:
        for g, inside in members.items():
            keep = torch.tensor([paths[i] in inside and paths[j] in inside for i, j in pairs])
            if keep.any():
                index[g].append(len(parts))
                parts.append(s[keep])

    def mean(ix: np.ndarray) -> dict[str, float]:
        return {"ms_ssim": float(torch.cat([parts[i] for i in ix]).mean())}
    rows = per_group(mean, {g: [np.asarray(ix, dtype=np.int64)] for g, ix in index.items()}, names=("prompts",),
                     n_boot=n_boot, seed=seed)
    return [{**row, "n_images": len(members[row["group"]])} for row in rows]


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(DiversityConfig, argv, "MS-SSIM among samples of the same prompt (lower = more diverse). "
                "Usage: python -m eval.diversity DIR [--group-by prompt]", positional=("dir",))
    setup_logging(cfg.verbose)
    if not cfg.dir:
        raise UserError("give the folder of generated images: python -m eval.diversity DIR")
    import matplotlib.pyplot as plt

    from .outputs import markdown_table, write_report
    with user_errors():
        result = diversity(cfg.dir, cfg.group_by, size=cfg.size, max_pairs=cfg.max_pairs, seed=cfg.seed,
                           by=cfg.by, n_boot=cfg.n_boot)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(np.asarray(result["pair_scores"]), bins=30, range=(0, 1), color="tab:blue")
    ax.set_xlabel("pairwise MS-SSIM within a prompt (lower = more diverse)")
    ax.set_ylabel("pairs")
    notes = [f"**Images:** {result['n_images']} in {result['n_groups']} groups by `{cfg.group_by}`; "
             f"resized to {cfg.size}x{cfg.size}; 5-scale MS-SSIM (torchmetrics)",
             f"**Mean MS-SSIM:** {result['ms_ssim_mean']:.4f} over {result['n_pairs']} pairs"]
    result["report"] = write_report(cfg.out, "diversity", result, title="Diversity (MS-SSIM within prompt)",
                                    notes=notes, sections={"Groups": markdown_table(result["groups"]),
                                                           **sections(result.get("by", {}), ["ms_ssim"])},
                                    figures={"hist": fig})
    print(f"mean MS-SSIM {result['ms_ssim_mean']:.4f} over {result['n_pairs']} pairs; "
          f"report {result['report']['markdown']}")
    return result


if __name__ == "__main__":
    main()
