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
