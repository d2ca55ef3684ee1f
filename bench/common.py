"""Shared helpers of the benchmark scripts in `bench/`: run header (command, machine, date), the shared data
root, peak memory, atomic JSON/Markdown writing and Markdown tables.

The scripts are run as `python bench/<script>.py ...`, which puts this folder on `sys.path`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from modeling_missrec.atomic import write_atomically

if TYPE_CHECKING:
    import matplotlib.figure

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA_ENV = "MISSREC_SHARED_DATA"


def command_line() -> str:
    """The command that started this process, as one shell-quoted line (`python bench/x.py --flag value`)."""
    return shlex.join(["python", *sys.argv])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    """CPU model, core counts, torch/transformers versions, torch threads and, when used, the GPU."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    return info


def git_commit() -> str | None:
    """The commit of the code being measured (None outside a git checkout), marked `+dirty` with local edits."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def checkout_env() -> dict[str, str]:
    """The environment for a child process that must import this checkout's package (e.g. a git worktree pinned
    to the commit being measured), not whatever an editable install points at."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def run_header(device: str = "cpu") -> dict:
    """What every result file starts with: the exact command, the code's commit, the date (UTC), the machine."""
    return {
        "command": command_line(),
        "commit": git_commit(),
        "date": utc_now(),
        "cwd": os.getcwd(),
        "machine": machine_info(device),
    }


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timer measures it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def resolve_data_root(data_root: str | None) -> Path:
    """The shared data root: `--data_root`, else the environment variable MISSREC_SHARED_DATA. Exits with a
    clear message when neither is set or the folder does not exist."""
    source = "--data_root"
    if not data_root:
        data_root, source = os.environ.get(SHARED_DATA_ENV), f"${SHARED_DATA_ENV}"
    if not data_root:
        sys.exit(
            f"error: no shared data root: pass --data_root DIR or set {SHARED_DATA_ENV}=DIR "
            "(the folder that holds scientific_full/ and scientific_mm/)."
        )
    root = Path(os.path.expanduser(data_root)).resolve()
    if not root.is_dir():
        sys.exit(f"error: shared data root {root} (from {source}) is not an existing folder.")
    return root


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


def header_markdown(header: Mapping) -> str:
    """The command / date / machine lines at the top of a result's Markdown file."""
    machine = header["machine"]
    parts = [
        f"- command: `{header['command']}` (run from `{header.get('cwd', '?')}`"
        + (f", commit {header['commit']})" if header.get("commit") else ")"),
        f"- date (UTC): {header['date']}",
        f"- machine: {machine['cpu_model']}, {machine['cpu_count']} cores ({machine['cpu_count_usable']} usable), "
        f"torch {machine['torch_version']} with {machine['torch_num_threads']} threads"
        + (f", GPU {machine['gpu']}" if "gpu" in machine else ""),
    ]
    return "\n".join(parts) + "\n"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows the script's docstring as written and every flag's default."""
