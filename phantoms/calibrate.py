"""Labelled phantom sets for the analytic scorer, and the calibration of its thresholds:
`python -m phantoms.calibrate [--n 200] [--size 128]` prints the thresholds for phantoms.score.Thresholds.

Why apart from the scorer: the scorer reads any image and needs no generator; calibration and the scorer's
tests draw phantoms of known class. Calibration uses seeds from CALIBRATION_SEED on, tests use others, so
the thresholds are always checked on held-out phantoms. Rerun after changing the generator."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cxrcommon.cli import cli_entry
from cxrcommon.config import field, parse_config

from .generator import render, sample_spec
from .score import CALIBRATION_SEED, Thresholds, _effusion_from, _pneumothorax_from, measure


def effusion_set(n: int, size: int, seed: int, sizes: Sequence[str] = ("moderate", "large"),
                 classes: Sequence[str] = ("none", "left", "right", "bilateral")):
    """n phantoms per class (other findings random), for calibration and tests.

    Yields (image, expected class). Seeds are `seed + i`, so disjoint ranges give disjoint sets."""
    def with_effusion(spec, side, rng):
        return dataclasses.replace(spec, effusion=side, effusion_size=str(rng.choice(list(sizes))))
    return _finding_set("effusion", with_effusion, n, size, seed, classes)


def pneumothorax_set(n: int, size: int, seed: int, collapse: tuple[float, float] = (0.15, 0.40),
                     classes: Sequence[str] = ("none", "left", "right")):
    """Like effusion_set, for pneumothorax (collapsed fraction drawn from `collapse`, the generator's range)."""
    def with_pneumothorax(spec, side, rng):
        return dataclasses.replace(spec, pneumothorax=side, pneumothorax_size=float(rng.uniform(*collapse)))
    return _finding_set("pneumothorax", with_pneumothorax, n, size, seed, classes)


def _finding_set(finding: str, add, n: int, size: int, seed: int, classes: Sequence[str]):
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        spec = sample_spec(rng, exclude=(finding,))
        for side in classes:
            yield render(spec if side == "none" else add(spec, side, rng), size)[0], side


def calibrate(n: int = 200, size: int = 128, seed: int = CALIBRATION_SEED) -> Thresholds:
    """Pick the effusion threshold that best separates none/left/right/bilateral, and the pneumothorax
    threshold for none/left/right, on phantoms from `seed` on (the middle of each best plateau).

    The cardiomegaly threshold is the generator's own CTR cut-off (the CTR is measured directly)."""
    def best(rule, images, grid: np.ndarray, key: str) -> float:
        scores = [(measure(img), side) for img, side in images]
        acc = [np.mean([rule(m, Thresholds(**{key: float(t)})) == side for m, side in scores]) for t in grid]
        top = np.flatnonzero(np.asarray(acc) >= max(acc) - 1e-9)
        return round(float(grid[top].mean()), 4)
    return Thresholds(effusion=best(_effusion_from, effusion_set(n, size, seed), np.linspace(0.02, 0.5, 97),
                                    "effusion"),
                      pneumothorax=best(_pneumothorax_from, pneumothorax_set(n, size, seed),
                                        np.linspace(0.0, 0.03, 61), "pneumothorax"))


@dataclass
class CalibrateConfig:
    n: int = field(200, "phantoms per class")
    size: int = field(128, "phantom side in pixels")
    seed: int = field(CALIBRATION_SEED, "first seed (keep it apart from the seeds the tests use)")


@cli_entry
def main(argv: list[str]) -> Thresholds:
    cfg = parse_config(CalibrateConfig, argv, __doc__.splitlines()[0])
    thresholds = calibrate(cfg.n, cfg.size, cfg.seed)
    print(json.dumps(asdict(thresholds), indent=1))
    return thresholds


if __name__ == "__main__":
    main()
