"""Precision, recall, density and coverage on feature matrices (Naeem et al. 2020, k nearest neighbours).

torchmetrics has none of these and torch-fidelity has precision/recall only (k=3 by default), so the four
are computed here from one set of distances; precision/recall agree with torch-fidelity's for the same k
(tests check that). Balls are closed (distance <= radius), as in torch-fidelity."""
from __future__ import annotations

import torch

CHUNK = 2048  # rows of a distance matrix held at once


def knn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (self excluded)."""
    out = [torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(CHUNK)]
    return torch.cat(out)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """precision/density: are fakes inside real k-NN balls; recall: reals inside fake balls; coverage: real
    balls that hold at least one fake. Identical sets give ~1 on all four; disjoint sets give 0."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall/density/coverage with k={k} need more than {k} images per set; "
                         f"got {len(real)} real and {len(fake)} fake")
    real, fake = real.double(), fake.double()
    r_real, r_fake = knn_radius(real, k), knn_radius(fake, k)
    inside_real = torch.zeros(len(fake), dtype=torch.float64)   # how many real balls hold each fake
    real_recalled = []
    real_covered = []
    for rows, radius in zip(real.split(CHUNK), r_real.split(CHUNK)):
        d = torch.cdist(rows, fake)                                   # (chunk of real, fake)
        within = d <= radius[:, None]
        inside_real += within.sum(0)
        real_covered.append(within.any(1))
        real_recalled.append((d <= r_fake[None, :]).any(1))
    return {"precision": (inside_real > 0).double().mean().item(),
            "recall": torch.cat(real_recalled).double().mean().item(),
            "density": (inside_real.sum() / (k * len(fake))).item(),
            "coverage": torch.cat(real_covered).double().mean().item()}
