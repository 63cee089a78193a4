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
from cxrcommon.demographics import AGE_BANDS

from .generator import AGE_RANGE, SEXES, render, sample_spec
from .score import (
    CALIBRATION_SEED,
    Thresholds,
    _age_band_from,
    _effusion_from,
    _pneumothorax_from,
    _sex_from,
    measure,
    measure_demographics,
)


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


def demographics_set(n: int, size: int, seed: int):
    """n phantoms per sex and age band (findings as sample_spec draws them, age uniform in the band within
    AGE_RANGE). Yields (image, sex, age band); seeds are `seed + i`, as in effusion_set."""
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        spec = sample_spec(rng)
        for sex in SEXES:
            for band, lo, hi in AGE_BANDS:
                age = int(rng.integers(max(lo, AGE_RANGE[0]), min(hi, AGE_RANGE[1] + 1)))
                yield render(dataclasses.replace(spec, sex=sex, age=age), size)[0], sex, band


def _finding_set(finding: str, add, n: int, size: int, seed: int, classes: Sequence[str]):
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        spec = sample_spec(rng, exclude=(finding,))
        for side in classes:
            yield render(spec if side == "none" else add(spec, side, rng), size)[0], side


def calibrate(n: int = 200, size: int = 128, seed: int = CALIBRATION_SEED) -> Thresholds:
    """Pick the effusion threshold that best separates none/left/right/bilateral, the pneumothorax
    threshold for none/left/right, and the sex and age-band thresholds, on phantoms from `seed` on (the
    middle of each best plateau).

    The cardiomegaly threshold is the generator's own CTR cut-off (the CTR is measured directly)."""
    def best(rule, scores, grid: np.ndarray, key: str, base: Thresholds = Thresholds()) -> float:
        acc = [np.mean([rule(m, dataclasses.replace(base, **{key: float(t)})) == label for m, label in scores])
               for t in grid]
        top = np.flatnonzero(np.asarray(acc) >= max(acc) - 1e-9)
        return round(float(grid[top].mean()), 4)
    demo = [(measure_demographics(img), sex, band) for img, sex, band in demographics_set(n, size, seed)]
    # the knob threshold on the two bands it decides (calcified knobs are >65 whatever their width)
    young = [(m, band) for m, _, band in demo if band != ">65"]
    knob = best(_age_band_from, young, np.linspace(0.05, 0.25, 81), "knob", Thresholds(calcification=np.inf))
    return Thresholds(effusion=best(_effusion_from, [(measure(img), side) for img, side in
                                                     effusion_set(n, size, seed)], np.linspace(0.02, 0.5, 97),
                                    "effusion"),
                      pneumothorax=best(_pneumothorax_from, [(measure(img), side) for img, side in
                                                             pneumothorax_set(n, size, seed)],
                                        np.linspace(0.0, 0.03, 61), "pneumothorax"),
                      breast=best(_sex_from, [(m, sex) for m, sex, _ in demo], np.linspace(-0.1, 0.1, 81), "breast"),
                      knob=knob,
                      calcification=best(_age_band_from, [(m, band) for m, _, band in demo],
                                         np.linspace(0.0, 0.6, 121), "calcification", Thresholds(knob=knob)))


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
