"""Quality check with regeneration (`inference.generate --qc FOLDER`, issue #21): classifiers read sex, age and
race back from every image, and an image that does not show what its prompt asked for is made again with a new
seed, up to `--qc-tries` times in all.

Anchor: RoentGen-v2's run_inference_w_quality_check.py checks sex, race and age the same way (sex must match,
race must match where the race model knows the group, age fails when more than 16 years off) but only logs
failures to a CSV and leaves the image out; here a failure is regenerated, and an image still failing after the
last try is kept with `qc_pass: false` in its manifest row, so the set stays complete and the user can filter.

Seeds: try 0 is the job's own seed (the image a run without --qc makes); try t > 0 uses `retry_seed(seed, t)`,
a hash of the two, so a resumed run (or one with more --qc-tries) continues with exactly the seeds a single
uninterrupted run would have used."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Generic, Sequence, TypeVar

import numpy as np

from cxrcommon.demographics import Demographics, age_band

if TYPE_CHECKING:  # the classifiers are loaded by the caller; generation without --qc never imports eval
    from eval.demographic_models import DemographicModels, Prediction

log = logging.getLogger(__name__)

T = TypeVar("T")
AGE_TOLERANCE = 16  # years; RoentGen-v2 check_age(sigma=16.0): fails when |requested - np.rint(predicted)| > 16


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Which checks ran on an image and which of them failed (sex, age, race)."""
    checked: tuple[str, ...]
    failed: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failed


def judge(requested: Demographics, predicted: Prediction, race_classes: Sequence[str] = ()) -> Verdict:
    """The rules, one per field the prompt asked for and a model reads:

    sex   the predicted sex must be the requested one;
    age   the predicted age band (<40, 40-65, >65) must be the requested age's, or, from a model that predicts
          years, the whole-year prediction may be at most AGE_TOLERANCE (16) years off (RoentGen-v2);
    race  the predicted group must be the requested one, checked only where the race model can predict that
          group (the xrv model knows Asian, Black, White; RoentGen-v2 skips the rest too).

    A field left blank in the prompt, or without a model, is not checked."""
    checked, failed = [], []
    if requested.sex and predicted.sex is not None:
        checked.append("sex")
        if predicted.sex != requested.sex:
            failed.append("sex")
    if requested.age is not None and predicted.age_band is not None:
        checked.append("age")
        close = predicted.age is not None and abs(requested.age - round(predicted.age)) <= AGE_TOLERANCE
        if predicted.age_band != age_band(requested.age) and not close:
            failed.append("age")
    if requested.race and predicted.race is not None and requested.race in race_classes:
        checked.append("race")
        if predicted.race != requested.race:
            failed.append("race")
    return Verdict(tuple(checked), tuple(failed))


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of try `attempt` (0-based) of an image whose own seed is `seed`: the seed itself first, then a hash
    of (seed, attempt), independent of batching, process count and interruptions."""
    if attempt == 0:
        return seed
    digest = hashlib.sha256(f"synthcxr/qc/{seed}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclasses.dataclass
class Checked(Generic[T]):
    """The image kept for one item: the passing try, or the last try when none passed."""
    item: T
    requested: Demographics
    image: np.ndarray
    prediction: Prediction
    verdict: Verdict
    attempt: int                    # 0-based try of the kept image

    @property
    def tries(self) -> int:
        return self.attempt + 1

    def row(self, seed: int) -> dict[str, Any]:
        """Manifest columns: predictions, qc_pass, qc_failed (the checks it failed), qc_tries, and qc_seed (the
        seed the kept image was made with; `seed` is the job's own)."""
        return {**self.prediction.row(), "qc_pass": self.verdict.passed, "qc_failed": list(self.verdict.failed),
                "qc_checked": list(self.verdict.checked), "qc_tries": self.tries,
                "qc_seed": retry_seed(seed, self.attempt)}


def tags(row: dict[str, Any]) -> dict[str, str]:
    """The image file's QC tags from its manifest columns (`Checked.row`): the seed that made its pixels, tries,
    pass."""
    return {"qc_seed": str(row["qc_seed"]), "qc_tries": str(row["qc_tries"]),
            "qc_pass": "true" if row["qc_pass"] else "false"}


def check_and_regenerate(items: Sequence[T], requested: Sequence[Demographics],
                         make: Callable[[list[T], list[int]], Sequence[np.ndarray]], models: DemographicModels,
                         tries: int, first: Sequence[int] | None = None) -> list[Checked[T]]:
    """Check every item's image; make the failures again with the next try's seed until they pass or `tries`
    tries are used. Failures are remade together, one `make` call per round.

    Arguments:
      items (sequence): what to make (generate's Jobs; anything `make` understands).
      requested (sequence(Demographics)): per item, what its prompt asked for.
      make (callable): (items, 0-based try numbers) -> one gray [0, 1] image per item, in order; the caller turns
        a try number into a seed with `retry_seed`.
      models (DemographicModels): the QC classifiers.
      tries (int): >= 1, tries in all per item (--qc-tries).
      first (sequence(int) or None): per item, the try to start from (a resumed run: the tries an earlier run
        already spent on it); None = 0 for all.

    Returns:
      (list(Checked)): per item, in order, the kept image with its prediction, verdict and try."""
    attempt = list(first) if first is not None else [0] * len(items)
    kept: list[Checked[T] | None] = [None] * len(items)
    pending = list(range(len(items)))
    while pending:
        images = make([items[i] for i in pending], [attempt[i] for i in pending])
        predictions = models.predict(images)
        again = []
        for i, image, prediction in zip(pending, images, predictions, strict=True):
            verdict = judge(requested[i], prediction, models.race_classes())
            kept[i] = Checked(items[i], requested[i], image, prediction, verdict, attempt[i])
            if not verdict.passed and attempt[i] + 1 < tries:
                attempt[i] += 1
                again.append(i)
        pending = again
    return [k for k in kept if k is not None]


def finished(row: dict[str, Any], tries: int) -> bool:
    """Whether a manifest row's image is final under --qc-tries `tries`: it passed, or used every try. A failure
    with tries to spare (a larger --qc-tries than before) is made again from try `row["qc_tries"]`."""
    return row.get("qc_pass") is True or int(row.get("qc_tries") or 0) >= tries


class QCStats:
    """Counts per subgroup (requested sex, age band, race) of images checked, failed at their first try, and still
    failing after the last; `log` prints the failure rates."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}

    def add(self, checked: Checked[Any]) -> None:
        d = checked.requested
        groups = ["all"] + [g for g in (f"sex {d.sex}" if d.sex else "",
                                        f"age {age_band(d.age)}" if d.age is not None else "",
                                        f"race {d.race}" if d.race else "") if g]
        first_failed = checked.attempt > 0 or not checked.verdict.passed
        for group in groups:
            n = self.counts.setdefault(group, [0, 0, 0])
            n[0] += 1
            n[1] += first_failed
            n[2] += not checked.verdict.passed

    def log(self, tries: int) -> None:
        if not self.counts:
            return
        total, first, final = self.counts["all"]
        log.info("QC: %d image(s) checked; %d failed their first try, %d still failed after %d tries (kept with "
                 "qc_pass false in manifest.jsonl)", total, first, final, tries)
        for group, (n, first, final) in sorted(self.counts.items()):
            if group != "all":
                log.info("QC failure rate, %s: %.1f%% at the first try, %.1f%% after %d tries (%d image(s))", group,
                         100 * first / n, 100 * final / n, tries, n)
