"""The experiment harness's runs survive a stopped session: a killed run, started again with `--resume` (as
`bench/quality.py` does), continues from its last finished epoch to the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "bench" / "finetune_quality.py"
sys.path.insert(0, str(REPO_ROOT / "bench"))
import quality  # noqa: E402

# A small model and two steps per epoch: the test is about the harness's resume, not about quality.
TINY = "hidden_size=32,num_attention_heads=2,intermediate_size=64"


def finetune(shared_data_dir: Path, work_dir: Path, epochs: int, *flags: str) -> dict:
    command = [
        sys.executable, str(SCRIPT), "--data_root", str(shared_data_dir), "--datasets", "scientific_mm",
        "--modes", "inductive", "--num_train_epochs", str(epochs), "--max_steps_per_epoch", "2",
        "--config_overrides", TINY, "--work_dir", str(work_dir), "--output_dir", str(work_dir), "--print_json",
        "--num_threads", "2", *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return {**json.loads(process.stdout.strip().splitlines()[-1]), "log": process.stderr}


def comparable(payload: dict) -> dict:
    history = [
        {k: v for k, v in h.items() if not k.endswith("seconds") and k != "train_samples_per_second"}
        for h in payload["history"]
    ]
    return {"record": {k: payload["record"][k] for k in ("valid", "test", "best_epoch")}, "history": history}


def test_resumed_run_equals_an_uninterrupted_one(shared_data_dir, tmp_path):
    straight = finetune(shared_data_dir, tmp_path / "straight", 2)
    # The first epoch alone, as if the session had stopped after it; `--resume` on a folder without a
    # checkpoint starts afresh.
    first = finetune(shared_data_dir, tmp_path / "resumed", 1, "--resume")
    assert len(first["history"]) == 1 and "resumed from" not in first["log"]
    resumed = finetune(shared_data_dir, tmp_path / "resumed", 2, "--resume")
    assert "after epoch 1" in resumed["log"]  # it trained the second epoch only
    assert len(resumed["history"]) == 2
    assert comparable(resumed) == comparable(straight)


def test_without_resume_a_run_folder_starts_over(shared_data_dir, tmp_path):
    finetune(shared_data_dir, tmp_path / "run", 1)
    again = finetune(shared_data_dir, tmp_path / "run", 1)
    assert [h["epoch"] for h in again["history"]] == [0] and "resumed from" not in again["log"]


def test_joined_configurations_run_the_settings_of_each_part():
    # `no_prior+X` is how `as_today` names X recorded on the earlier defaults: a new seed of it must be the
    # same settings, so that it joins those runs.
    spec = quality.config_spec("no_prior+all_original")
    assert spec["model"] == {"history_prior": False, **quality.CONFIGS["all_original"]["model"]}
    assert spec["training"] == quality.CONFIGS["all_original"]["training"] == {"group_by_length": False}
    assert quality.config_spec("default") == {"model": {}, "training": {}, "flags": []}
    args = quality.parse_args(["--configs", "no_prior+batches_random", "--seeds", "2022"])
    assert args.configs == ["no_prior+batches_random"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--configs", "no_prior+nonsense"])


def _run(config: str, seed: int, valid: float, mode: str = "transductive") -> dict:
    scores = {"ndcg@10": valid, "hr@10": 2 * valid, "ndcg@50": valid, "hr@50": 3 * valid}
    return {
        "dataset": "scientific_mm", "mode": mode, "config": config, "seed": seed, "max_steps_per_epoch": None,
        "valid": scores, "test": scores, "best_epoch": 3, "seconds_per_epoch": 1.0, "train_samples_per_s": 1.0,
        "model_overrides": {}, "training_overrides": {},
    }  # fmt: skip


def _chosen(runs: list[dict]) -> dict[str, str]:
    return {r["mode"]: r["config"] for r in quality.summarise(runs, "default") if r.get("chosen_on_valid")}


def test_a_configuration_replaces_the_baseline_only_when_its_paired_valid_difference_says_so():
    base = [_run("default", s, v) for s, v in zip((1, 2, 3), (0.100, 0.110, 0.090), strict=True)]
    # Ahead on the mean (+0.002) but not on every seed: the interval holds 0, so the baseline stays.
    noisy = [_run("temperature_0.15", s, v) for s, v in zip((1, 2, 3), (0.110, 0.100, 0.096), strict=True)]
    assert _chosen(base + noisy) == {"transductive": "default"}
    # Ahead by a little on every seed: shown better, so it is chosen although its mean is below the noisy one's.
    steady = [_run("dropout_0.3", s, v) for s, v in zip((1, 2, 3), (0.101, 0.1112, 0.0909), strict=True)]
    assert _chosen(base + noisy + steady) == {"transductive": "dropout_0.3"}
    # Two seeds are not enough to be chosen; without a baseline the best mean of the rest is marked.
    assert _chosen(base + steady[:2]) == {"transductive": "default"}
    # Seeds the baseline does not have give no paired difference: the baseline stays.
    assert _chosen(base + [_run("dropout_0.3", s, 0.2) for s in (4, 5, 6)]) == {"transductive": "default"}
    assert _chosen(noisy + [_run("dropout_0.3", s, 0.2, "inductive") for s in (1, 2, 3)]) == {
        "transductive": "temperature_0.15",
        "inductive": "dropout_0.3",
    }


def test_every_run_has_its_own_log_even_when_its_name_holds_dots(tmp_path):
    names = ["temperature_0.1-2020", "temperature_0.15-2020", "temperature_0.1-2021", "default-2020"]
    paths = [quality.run_paths(tmp_path, "scientific_mm", "transductive", name) for name in names]
    assert len({log for _, log in paths}) == len(names)
    run_dir, log = paths[0]
    assert run_dir == tmp_path / "scientific_mm-transductive-temperature_0.1-2020"
    assert log == tmp_path / "scientific_mm-transductive-temperature_0.1-2020.log"


def test_runs_of_the_temperature_0_07_defaults_are_named_as_today():
    def old(config: str, **model) -> dict:  # recorded before 2026-12-07: no `default_temperature`
        return {**_run(config, 2020, 0.1), "model_overrides": model, "defaults_have_prior": True}

    def named(run: dict) -> tuple[str, dict]:
        today = quality.as_today(run)
        return today["config"], today["model_overrides"]

    assert named(old("default")) == ("temperature_0.07", {"temperature": 0.07})
    assert named(old("temperature_0.1", temperature=0.1)) == ("default", {})
    dropout = {"hidden_dropout_prob": 0.3, "attention_dropout_prob": 0.3}
    assert named(old("temperature_0.1_dropout_0.3", temperature=0.1, **dropout)) == ("dropout_0.3", dropout)
    assert named(old("dropout_0.3", **dropout)) == ("temperature_0.07+dropout_0.3", {**dropout, "temperature": 0.07})
    assert named(old("temperature_0.2", temperature=0.2)) == ("temperature_0.2", {"temperature": 0.2})
    # Without the prior the temperature was and is 0.07: the names stay; so does every inductive run (0.07 is
    # still its default there).
    assert named(old("no_prior", history_prior=False)) == ("no_prior", {"history_prior": False})
    inductive = {**old("temperature_0.1", temperature=0.1), "mode": "inductive"}
    assert named(inductive) == ("temperature_0.1", {"temperature": 0.1})
    assert named({**old("default"), "mode": "inductive"}) == ("default", {})
    # Older still (no prior in the defaults): both renamings, in order.
    before_prior = {**old("default"), "defaults_have_prior": None}
    assert named(before_prior) == ("no_prior", {"history_prior": False})
    assert named({**old("history_prior", history_prior=True), "defaults_have_prior": None})[0] == "temperature_0.07"
    # Recorded by today's code: as recorded; `temperature_0.07+X` runs X's settings at 0.07, paired against it.
    today = {**_run("default", 2020, 0.1), "default_temperature": 0.1, "defaults_have_prior": True}
    assert quality.as_today(today) == today
    spec = quality.config_spec("temperature_0.07+dropout_0.3")
    assert spec["model"] == {"temperature": 0.07, **dropout}
    records = quality.summarise(
        [quality.as_today(old("default")), quality.as_today(old("dropout_0.3", **dropout))], "default"
    )
    assert {r["config"]: r.get("paired_vs") for r in records} == {
        "temperature_0.07": None,
        "temperature_0.07+dropout_0.3": "temperature_0.07",  # X on the earlier defaults against those
    }


def test_a_finished_run_folder_of_an_earlier_meaning_is_cleared_and_an_interrupted_one_kept(tmp_path):
    # `default-2023` held the temperature 0.07 run before the default changed; the new `default` seed 2023 must
    # not resume its checkpoint. An interrupted run (checkpoints, no results yet) is resumed, so it stays.
    finished = tmp_path / "scientific_mm-transductive-default-2023"
    (finished / "scientific_mm-transductive" / "checkpoint-epoch-0010").mkdir(parents=True)
    (finished / "finetune_quality.json").write_text("{}")
    interrupted = tmp_path / "scientific_mm-transductive-default-2024"
    (interrupted / "scientific_mm-transductive" / "checkpoint-epoch-0003").mkdir(parents=True)
    assert quality.clear_finished_run(finished) and not finished.exists()
    assert not quality.clear_finished_run(interrupted) and interrupted.exists()
    assert not quality.clear_finished_run(tmp_path / "never-run")
