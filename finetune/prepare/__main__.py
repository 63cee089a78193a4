"""CLI of `finetune.prepare` (see the package docstring and README "Real datasets")."""
from __future__ import annotations

from typing import Sequence

from cxrcommon.cli import cli_entry, parse
from cxrcommon.logs import setup_logging

from .config import PrepareConfig
from .runner import prepare


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse(PrepareConfig, argv, "Turn a public chest X-ray dataset's download into one training manifest "
                "(manifest.csv, images/, summary.md, excluded.csv).", positional=("dataset",))
    setup_logging(cfg.verbose)
    summary = prepare(cfg)
    print(f"{summary['dataset']}: {summary['kept']} images kept of {summary['rows_read']} rows; "
          f"manifest {cfg.out}/manifest.csv, summary {cfg.out}/summary.md")
    return summary


if __name__ == "__main__":
    main()
