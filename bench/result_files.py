"""Result files of the benchmarks: JSON, Markdown and PNG written whole (a reader never sees half a file),
Markdown tables, and matplotlib where it is installed."""

from __future__ import annotations

import functools
import io
import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from locations import BENCH_DIR

from modeling_missrec.atomic import write_atomically

if TYPE_CHECKING:
    import matplotlib.figure

DEFAULT_RESULTS_DIR = BENCH_DIR / "results"


def write_text_atomically(path: Path, text: str) -> None:
    """`atomic.write_atomically`, creating the folder first: readers never see half a file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text)


def write_json_atomically(path: Path, payload) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@functools.cache
def pyplot() -> types.ModuleType | None:
    """matplotlib's pyplot on the file-only Agg backend, or None (and a note, once) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    return plt


def save_figure_atomically(figure: matplotlib.figure.Figure, path: Path) -> None:
    """Write a figure as PNG, whole (`write_atomically`), and free it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table; floats are printed with 4 significant decimals unless already strings."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
