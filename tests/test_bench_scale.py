"""`bench/scale.py` measures both training losses end to end: a small catalogue, one step each, records written
with the keys the README and the issue quote (the bench builds the trainer itself, so a change of the
trainer's signature breaks it without this test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_scale_bench_measures_full_and_sampled_softmax(tmp_path):
    command = [
        sys.executable, str(REPO_ROOT / "bench" / "scale.py"), "--num_items", "1500", "--num_users", "1200",
        "--losses", "full", "sampled", "--num_negatives", "256", "--warmup_steps", "1", "--train_steps", "1",
        "--batch_size", "128", "--eval_users", "100", "--kmeans", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    records = json.loads((tmp_path / "scale.json").read_text())["records"]
    assert [(r["num_items"], r["loss"]) for r in records] == [(1500, "full"), (1500, "sampled")]
    for record in records:
        assert "error" not in record, record["error"]
        assert record["train_samples_per_s"] > 0 and record["eval_users_per_s"] > 0
    assert records[1]["num_negatives"] == 256 and records[0]["num_negatives"] is None
    assert "sampled softmax" in (tmp_path / "scale.md").read_text()
