"""`bench/transfer.py --scratch_from`: the quality harness's runs of the shipped defaults stand in for the scratch
runs only where they are the same runs (same set, features, regime), keep their provenance, and pair with the
pre-trained runs of the same seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import transfer  # noqa: E402


def scores(ndcg: float) -> dict:
    return {"ndcg@10": ndcg, "hr@10": 2 * ndcg, "ndcg@50": 1.5 * ndcg, "hr@50": 3 * ndcg}


def quality_run(seed: int, ndcg: float, **fields) -> dict:
    run = {
        "dataset": "scientific_full", "mode": "inductive", "config": "default", "seed": seed,
        "max_steps_per_epoch": None, "model_overrides": {}, "training_overrides": {}, "flags": [],
        "valid": scores(ndcg + 0.01), "test": scores(ndcg), "best_epoch": 3, "epochs_run": 14,
        "seconds_per_epoch": 30.0, "trainable_params": 1000, "defaults_have_prior": True, "commit": "abc1234",
        "command": f"finetune_quality.py --seed {seed}",
    }  # fmt: skip
    return {**run, **fields}


@pytest.fixture
def quality_runs(tmp_path) -> Path:
    runs = [
        # recorded before the prior was the default: its `history_prior` configuration is today's `default`
        quality_run(
            2020, 0.085, config="history_prior", model_overrides={"history_prior": True}, defaults_have_prior=None
        ),
        quality_run(2021, 0.084),
        quality_run(2022, 0.086),
        quality_run(2023, 0.080),  # not a seed of the grid
        quality_run(2021, 0.070, config="no_prior", model_overrides={"history_prior": False}),
        quality_run(2021, 0.050, max_steps_per_epoch=2),  # a smoke run
        quality_run(2021, 0.083, mode="transductive"),
        quality_run(2021, 0.100, dataset="scientific_mm"),
        # today's transductive defaults (temperature 0.1): not the temperature scratch trains at here (the
        # backbone's 0.07)
        quality_run(2021, 0.090, mode="transductive", default_temperature=0.1),
        quality_run(2021, 0.089, config="temperature_0.1", model_overrides={"temperature": 0.1}),
    ]
    path = tmp_path / "quality_runs.json"
    path.write_text(json.dumps({"runs": runs}), encoding="utf-8")
    return path


NO_BACKBONE = Path("no-backbone")  # scratch then trains at the paper's temperature, 0.07


def test_imports_only_the_defaults_of_the_grid(quality_runs):
    runs = transfer.imported_scratch_runs(
        quality_runs, "scientific_full", ["inductive"], [2020, 2021, 2022], "full", NO_BACKBONE
    )
    assert sorted(r["seed"] for r in runs) == [2020, 2021, 2022]
    assert {r["test"]["ndcg@10"] for r in runs} == {0.085, 0.084, 0.086}
    assert all(r["method"] == "scratch" and r["imported_from"] == str(quality_runs) for r in runs)
    assert {r["commit"] for r in runs} == {"abc1234"}  # provenance kept
    # all three are one configuration: today's defaults from scratch
    assert len({transfer.run_group(transfer.as_today(r)) for r in runs}) == 1


def test_refuses_runs_that_are_not_the_same(quality_runs):
    with pytest.raises(SystemExit, match="Scientific.feat1CLS"):  # quality.py's scientific_mm text is CLIP's
        transfer.imported_scratch_runs(quality_runs, "scientific_mm", ["inductive"], [2021], "full", NO_BACKBONE)
    with pytest.raises(SystemExit, match="10%"):
        transfer.imported_scratch_runs(quality_runs, "scientific_full", ["inductive"], [2021], "10%", NO_BACKBONE)


def test_imported_scratch_pairs_with_the_pretrained_runs(quality_runs):
    scratch = transfer.imported_scratch_runs(
        quality_runs, "scientific_full", ["inductive"], [2020, 2021], "full", NO_BACKBONE
    )
    full = [
        quality_run(seed, ndcg, method="full", regime="full", backbone="15078f98de")
        for seed, ndcg in ((2020, 0.088), (2021, 0.086))
    ]
    records = transfer.summarise([transfer.as_today(r) for r in [*scratch, *full]])
    by_method = {r["method"]: r for r in records}
    assert by_method["scratch"]["imported_from"] == [str(quality_runs)]
    assert by_method["full"]["imported_from"] == []
    pair = by_method["full"]["paired_vs_scratch"]["test_ndcg@10"]
    assert pair["seeds"] == [2020, 2021]
    assert pair["per_seed"] == pytest.approx([0.003, 0.002])
    header = {"command": "transfer.py", "date": "2026-12-04", "machine": {"cpu_model": "cpu", "cpu_count": 2,
              "cpu_count_usable": 2, "torch_version": "2.13.0", "torch_num_threads": 2}}  # fmt: skip
    assert "seeds 2020 2021 from" in transfer.render(records, header, "pretrained")


def test_scratch_trains_at_the_backbones_temperature_and_imports_the_runs_of_it(quality_runs, tmp_path):
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps({"temperature": 0.1}))
    assert transfer.scratch_temperature(backbone) == 0.1 and transfer.scratch_temperature(NO_BACKBONE) == 0.07
    _, flags = transfer.method_flags(transfer.parse_args(["--summarise"]), "scratch", "inductive")
    assert flags[-2:] == ["--temperature", "0.07"]  # the shipped backbone's, the paper's
    # A temperature the user gives is every method's, scratch's too (it goes in --config_overrides).
    args = transfer.parse_args(["--summarise", "--model_overrides", "temperature=0.1"])
    assert "--temperature" not in transfer.method_flags(args, "scratch", "inductive")[1]
    # A backbone temperature without a quality.py configuration of it imports nothing silently: it says so.
    (backbone / "config.json").write_text(json.dumps({"temperature": 0.08}))
    with pytest.raises(SystemExit, match="temperature_0.08"):
        transfer.imported_scratch_runs(quality_runs, "scientific_full", ["inductive"], [2021], "full", backbone)
    (backbone / "config.json").write_text(json.dumps({"temperature": 0.1}))
    # A backbone at 0.1 pairs with quality.py's transductive defaults of today, and inductive with its 0.1 runs.
    runs = transfer.imported_scratch_runs(
        quality_runs, "scientific_full", ["transductive", "inductive"], [2021], "full", backbone
    )
    assert sorted(r["test"]["ndcg@10"] for r in runs) == [0.089, 0.090]
    assert all(r["model_overrides"] == {} for r in runs)  # the temperature is scratch's setting here
