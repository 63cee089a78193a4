"""JSON + Markdown reports with PNG plots, written atomically, one shape for every eval command."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxrcommon.atomic import atomic_path, atomic_write_text  # noqa: E402


def _no_nan(obj: Any) -> Any:
    """NaN/inf become null, so the JSON is strict and any reader can load it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of dict rows (columns default to the first row's keys)."""
    if not rows:
        return "_(none)_"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig: "plt.Figure", path: str | Path) -> Path:
    """Save and close a matplotlib figure atomically as PNG."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, name: str, result: Mapping[str, Any], *, title: str,
                 notes: Sequence[str] = (), warnings: Sequence[str] = (), sections: Mapping[str, str] | None = None,
                 figures: Mapping[str, "plt.Figure"] | None = None) -> dict[str, str]:
    """Write `<name>.json` (the result), `<name>.md` (warnings, notes, scalar results, sections, plots), plots.

    Returns the written paths, so callers (the app) can show them.

    Args:
        out_dir: folder the files are written to (created; existing files of the same names are replaced).
        name: file stem: <name>.json, <name>.md, <name>_<figure>.png.
        result: the result mapping, written whole as strict JSON (NaN/inf become null; paths, numpy values
            and arrays converted); its int/float/bool values and strings under 120 characters form the
            markdown's Results table.
        title: the markdown's heading.
        notes: markdown lines shown under the heading.
        warnings: texts shown as "> **Warning:**" lines before the notes.
        sections: heading -> markdown body, each a section after the results, or None.
        figures: figure name -> matplotlib Figure, each saved as PNG (and closed) and embedded, or None.
    Returns: {"json": path, "markdown": path, <figure name>: png path, ...} as strings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}
    atomic_write_text(paths["json"], json.dumps(_no_nan(result), indent=2, default=_jsonable, allow_nan=False) + "\n")
    scalars = [{"metric": k, "value": v} for k, v in result.items()
               if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) < 120)]
    md = [f"# {title}", ""] + [f"> **Warning:** {w}\n" for w in warnings] + [f"{n}  " for n in notes]
    md += ["", "## Results", "", markdown_table(scalars), ""]
    for head, body in (sections or {}).items():
        md += [f"## {head}", "", body, ""]
    for fname, fig in (figures or {}).items():
        png = save_figure(fig, out / f"{name}_{fname}.png")
        paths[fname] = str(png)
        md += [f"![{fname}]({png.name})", ""]
    atomic_write_text(paths["markdown"], "\n".join(md))
    return paths
