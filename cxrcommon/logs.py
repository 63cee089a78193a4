"""One logging set-up for every command, so logs read the same everywhere."""
from __future__ import annotations

import logging
import os
import warnings


def setup_logging(verbose: bool = False) -> None:
    """INFO (or DEBUG) to stderr with time and module; quiet the chattiest libraries."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated.*")


class RepeatedWarning:
    """One kind of per-item warning (a cut prompt, a shortened impression) over a batch of many items:
    the first `show` are logged in full, the rest only counted, and `summary()` logs one line saying how
    many were not shown — so 20,000 long reports give a few examples and a count, not 20,000 lines."""

    def __init__(self, logger: logging.Logger, what: str, show: int = 3, where: str = ""):
        self.logger, self.what, self.show, self.where = logger, what, show, where
        self.count = 0

    def __call__(self, msg: str, *args: object) -> None:
        self.count += 1
        if self.count <= self.show:
            self.logger.warning(msg, *args)

    def summary(self) -> None:
        """Log how many were held back (nothing when all were shown); the count restarts."""
        if self.count > self.show:
            self.logger.warning("%d %s in all; the first %d are shown above, the other %d are not logged%s",
                                self.count, self.what, self.show, self.count - self.show,
                                f" ({self.where})" if self.where else "")
        self.count = 0
