"""Shared test setup: an offline, throw-away Hugging Face environment and the shared real-data folder."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set at import time of conftest, i.e. before any test module imports transformers / datasets, so that the
# libraries read these values when they initialise: no network, no progress bars, and no writes to the
# user's real Hugging Face cache.
_HF_HOME = tempfile.mkdtemp(prefix="missrec-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": _HF_HOME,
        "HF_DATASETS_CACHE": os.path.join(_HF_HOME, "datasets"),
    }
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_hf_environment(monkeypatch):
    """Keep the offline settings in force for every test, even if an earlier test changed them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", _HF_HOME)
    monkeypatch.setenv("HF_DATASETS_CACHE", os.path.join(_HF_HOME, "datasets"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared real-data folder: `$MISSREC_SHARED_DATA`, else `<repo>/../shared/data`; skips if absent."""
    configured = os.environ.get("MISSREC_SHARED_DATA")
    # An explicit setting wins (and skips when it points nowhere); the sibling folder is only the default.
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not candidate.is_dir():
        pytest.skip(f"shared data folder {candidate} not found (set MISSREC_SHARED_DATA)")
    return candidate
