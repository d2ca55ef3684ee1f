"""Where a benchmark finds things: this checkout (its `bench/` folder and repository root), the shared data root
(`--data_root` or `MISSREC_SHARED_DATA`), and the import path that makes a child process use this checkout's
package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SHARED_DATA_ENV = "MISSREC_SHARED_DATA"


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


def checkout_env() -> dict[str, str]:
    """The environment for a child process that must import this checkout's package (e.g. a git worktree pinned
    to the commit being measured), not whatever an editable install points at."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
