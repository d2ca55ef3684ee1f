"""Provenance of a benchmark's result: the exact command, the commit of the code measured, the date (UTC) and
the machine, written at the top of every result file (`run_header`, `header_markdown`).

The scripts are run as `python bench/<script>.py ...`, which puts this folder on `sys.path`.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping

import torch
from locations import REPO_ROOT


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


def run_header(device: str = "cpu") -> dict:
    """What every result file starts with: the exact command, the code's commit, the date (UTC), the machine."""
    return {
        "command": command_line(),
        "commit": git_commit(),
        "date": utc_now(),
        "cwd": os.getcwd(),
        "machine": machine_info(device),
    }


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
