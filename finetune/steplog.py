"""Step bookkeeping that keeps the GPU busy: losses stay on the device until a log or save point reads them
in one host sync, and throughput is timed apart for the warm-up steps (torch.compile, cuDNN autotuning,
allocator growth) and the steady state that follows."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class StepLoss:
    step: int  # 1-based optimizer step
    loss: float  # mean over micro-batches and processes
    lr: float


class PendingLosses:
    """Per-step micro-batch losses not yet read back. A `.item()` per step made the host wait for the
    GPU every step, so the next step's kernels could not be queued while this one ran."""

    def __init__(self, accum: int):
        self.accum = accum
        self._rows: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, micro_losses: list[torch.Tensor], lr: float) -> None:
        """`micro_losses`: one gathered (processes,) tensor per micro-batch of optimizer step `step` (1-based)."""
        self._rows.append((step, torch.stack(micro_losses).detach(), lr))

    def flush(self, on_nonfinite: Callable[[torch.Tensor, int, int], Exception]) -> list[StepLoss]:
        """Read every pending loss (one host sync). At the first non-finite one, raise
        `on_nonfinite(losses, step - 1, micro)` so nothing after the last good step is ever saved."""
        if not self._rows:
            return []
        values = torch.stack([v for _, v, _ in self._rows]).float().cpu()  # (steps, accum, processes)
        out = []
        for (step, _, lr), v in zip(self._rows, values):
            for micro, losses in enumerate(v):
                if not torch.isfinite(losses).all():
                    self._rows.clear()
                    raise on_nonfinite(losses, step - 1, micro)
            out.append(StepLoss(step, sum(m / self.accum for m in v.mean(dim=1).tolist()), lr))
        self._rows.clear()
        return out


@dataclass
class Throughput:
    """Images/s overall, and in steady state after the first `warmup_steps` optimizer steps of this run."""
    warmup_steps: int
    sync: Callable[[], None]  # waits for the device, so a timestamp covers the work queued before it
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    images: int = 0
    warmup_s: float = 0.0
    _steady_start: float | None = None
    _steady_images: int = 0
    _last: tuple[float, int] = (0.0, 0)  # (time, images) at the previous `since_last`

    def __post_init__(self) -> None:
        self._last = (self.start, 0)
        if self.warmup_steps == 0:
            self._steady_start = self.start

    def step(self, images: int) -> None:
        self.steps += 1
        self.images += images
        if self._steady_start is not None:
            self._steady_images += images
        elif self.steps == self.warmup_steps:
            self.sync()
            self._steady_start = time.perf_counter()
            self.warmup_s = self._steady_start - self.start

    def since_last(self) -> float:
        """Images/s since the previous call (or the start); call it after the device has synced."""
        now = time.perf_counter()
        (then, images), self._last = self._last, (now, self.images)
        return (self.images - images) / max(now - then, 1e-9)

    def rates(self) -> tuple[float, float]:
        """(overall images/s, steady images/s; 0.0 when the run was no longer than its warm-up)."""
        self.sync()
        now = time.perf_counter()
        overall = self.images / max(now - self.start, 1e-9)
        if self._steady_start is None or not self._steady_images:
            return overall, 0.0
        return overall, self._steady_images / max(now - self._steady_start, 1e-9)
