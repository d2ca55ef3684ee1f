"""`bench/peers.py` keeps what it finished: a run started again skips the models it recorded, adds new sets to
the same file, pairs missrec with the SASRec of the same set and epoch cap, and `--fresh` runs them again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
import peers  # noqa: E402


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """The two runners replaced by records whose NDCG@10 is the call's number, so a rerun is visible."""
    calls = []

    def record(model: str, dataset: str, mode: str) -> dict:
        calls.append((dataset, model, mode))
        return {
            "model": model, "dataset": dataset, "mode": mode, "test": dict.fromkeys(peers.METRICS, len(calls) / 10),
            "best_epoch": 1, "epochs_run": 2, "train_samples_per_s": 100.0 * len(calls),
            "eval_users_per_s": 10.0, "peak_rss_mb": 1.0,
        }  # fmt: skip

    monkeypatch.setattr(
        peers, "run_sasrec", lambda dataset, folder, args, env: record("SASRec", dataset, "transductive")
    )
    monkeypatch.setattr(
        peers, "run_missrec", lambda dataset, folder, mode, args, env: record("MISSRec (missrec)", dataset, mode)
    )
    monkeypatch.setattr(peers, "dataset_dir", lambda dataset, args, env: tmp_path / dataset)
    monkeypatch.setattr(peers, "resolve_data_root", lambda root: tmp_path)
    return calls


def run(out: Path, *flags: str) -> dict:
    peers.main(["--output_dir", str(out), "--work_dir", str(out / "work"), "--models", "sasrec",
                "missrec-transductive", *flags])  # fmt: skip
    return json.loads((out / "peers.json").read_text())


def test_rerun_skips_recorded_models_and_adds_new_sets(fake_runs, tmp_path):
    first = run(tmp_path, "--datasets", "scientific_mm")
    assert len(fake_runs) == 2 and [r["epochs_cap"] for r in first["records"]] == [300, 300]
    assert all(r["commit"] == first["meta"]["commit"] and r["date"] for r in first["records"])

    second = run(tmp_path, "--datasets", "games", "scientific_mm", "--epochs", "5")
    assert len(fake_runs) == 6  # both sets are new at cap 5: a cap is part of the protocol
    second = run(tmp_path, "--datasets", "games", "scientific_mm")
    assert len(fake_runs) == 8  # games at cap 300 is new; scientific_mm at 300 was recorded
    keys = [(r["dataset"], r["model"], r["epochs_cap"]) for r in second["records"]]
    assert keys == [
        ("scientific_mm", "SASRec", 5), ("scientific_mm", "SASRec", 300),
        ("scientific_mm", "MISSRec (missrec)", 5), ("scientific_mm", "MISSRec (missrec)", 300),
        ("games", "SASRec", 5), ("games", "SASRec", 300),
        ("games", "MISSRec (missrec)", 5), ("games", "MISSRec (missrec)", 300),
    ]  # fmt: skip
    # Each ratio divides by the SASRec run of the same set and cap: calls 1 and 2 were (mm, 300)
    mm_300 = next(r for r in second["ratios"] if r["dataset"] == "scientific_mm" and r["epochs_cap"] == 300)
    assert mm_300["ndcg@10"] == pytest.approx(0.2 / 0.1)
    assert len(second["ratios"]) == 4
    assert "scientific_mm" in (tmp_path / "peers.md").read_text()


def test_fresh_runs_recorded_models_again(fake_runs, tmp_path):
    run(tmp_path, "--datasets", "scientific_mm")
    again = run(tmp_path, "--datasets", "scientific_mm", "--fresh")
    assert len(fake_runs) == 4 and len(again["records"]) == 2
    assert [r["test"]["ndcg@10"] for r in again["records"]] == [0.3, 0.4]


def test_records_of_older_files_take_the_header_and_the_default_cap(fake_runs, tmp_path):
    old = {
        "meta": {"commit": "a34cc21", "date": "2026-12-03T06:59:23+00:00"},
        "records": [{"model": "SASRec", "dataset": "scientific_mm", "mode": "transductive",
                     "test": dict.fromkeys(peers.METRICS, 0.1), "best_epoch": 1, "epochs_run": 2,
                     "train_samples_per_s": 1.0, "eval_users_per_s": 1.0, "peak_rss_mb": 1.0}],
    }  # fmt: skip
    (tmp_path / "peers.json").write_text(json.dumps(old))
    records = run(tmp_path, "--datasets", "scientific_mm")["records"]
    assert fake_runs == [("scientific_mm", "MISSRec (missrec)", "transductive")]  # SASRec was recorded
    assert records[0]["commit"] == "a34cc21" and records[0]["epochs_cap"] == 300


def test_missrec_evaluation_speed_is_its_median_pass(monkeypatch, tmp_path):
    """A short run's first validation pass also builds caches; the median pass is the speed, as for SASRec."""
    history = [{"train_seconds": 10.0, "eval_seconds": s, "cluster_seconds": 0.0} for s in (5.0, 1.0, 2.0)]
    result = {
        "history": history, "train_rows": 1000, "valid_users": 100, "trainable_parameters": 1,
        "peak_rss_mib": 1.0, "wall_seconds": 1.0,
        "record": {"test": dict.fromkeys(peers.METRICS, 0.1), "best_epoch": 0, "epochs_run": 3,
                   "seconds_per_epoch": 10.0},
    }  # fmt: skip
    monkeypatch.setattr(peers, "run_json", lambda command, env, log: result)
    args = peers.parse_args(["--work_dir", str(tmp_path), "--epochs", "3"])
    args.data_root_resolved = tmp_path
    record = peers.run_missrec("scientific_mm", tmp_path, "transductive", args, {})
    assert record["eval_users_per_s"] == pytest.approx(100 / 2.0)
    assert record["eval_seconds_per_epoch"] == [5.0, 1.0, 2.0]
    assert record["train_samples_per_s"] == pytest.approx(100.0)
