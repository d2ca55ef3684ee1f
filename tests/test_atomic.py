"""Nothing lost, nothing mixed: model folders committed as one set, checkpoint swaps, output-folder ownership.

Kill points are injected by making the n-th rename raise (a process killed there would stop at the same
place), for every n, not by timing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer, write_planted_dataset

from modeling_missrec import atomic
from modeling_missrec.modeling_missrec import MissrecForSequentialRecommendation


class Killed(BaseException):
    """Raised at the injected kill point (a BaseException, so no `except Exception` swallows it)."""


def kill_at(n: int):
    """A stand-in for os.replace whose n-th call (1-based) "kills the process" instead of renaming."""
    real = os.replace
    calls = {"count": 0}

    def replace(src, dst, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise Killed
        return real(src, dst, *args, **kwargs)

    return replace, calls


def commit(folder: Path, version: str) -> None:
    staging = atomic.staging_dir(folder)
    (staging / "config.json").write_text(version)
    (staging / "model.safetensors").write_text(version)
    (staging / "adapter").mkdir()
    (staging / "adapter" / "weights").write_text(version)
    atomic.commit_files(folder, staging, {"metrics.json": version})


def read_set(folder: Path) -> set[str]:
    names = ("config.json", "model.safetensors", "metrics.json", "adapter/weights")
    return {(folder / name).read_text() for name in names}


def test_a_commit_killed_at_any_rename_reads_as_the_old_set_or_the_new_one(tmp_path):
    outcomes = set()
    for n in range(1, 20):
        folder = tmp_path / f"run{n}"
        folder.mkdir()
        (folder / "checkpoint").mkdir()  # other things in the folder are left alone
        commit(folder, "old")
        replace, calls = kill_at(n)
        with mock.patch.object(atomic.os, "replace", replace):
            try:
                commit(folder, "new")
                finished = True
            except Killed:
                finished = False
        atomic.complete_interrupted_commit(folder)  # what every loader does first
        seen = read_set(folder)
        assert seen in ({"old"}, {"new"}), (n, seen)
        assert (folder / "checkpoint").is_dir()
        assert not (folder / atomic.JOURNAL_FILE).exists()
        # a kill before the journal may leave the staged files (discarded by the next save), never after it
        assert seen == {"old"} or not (folder / atomic.STAGING_DIR).exists()
        outcomes.add(seen.pop())
        if finished:
            assert calls["count"] < n
            break
    assert outcomes == {"old", "new"}  # both sides of the commit point were hit


def results(folder: Path) -> dict:
    """What metrics.json says about the model (not the timings, which differ between runs)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    return {k: metrics[k] for k in ("valid", "test", "best_epoch", "epochs_run")}


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_the_final_save_killed_anywhere_leaves_a_whole_model(tmp_path):
    data = write_planted_dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    make_trainer(data, straight, num_train_epochs=2).train()
    new_weights, new_metrics = trained_weights(straight), results(straight)
    first = tmp_path / "first"
    make_trainer(data, first, num_train_epochs=1).train()
    old_weights, old_metrics = trained_weights(first), results(first)

    kill_points = outcomes = 0
    seen = set()
    for n in range(1, 200):
        run = tmp_path / f"kill{n}"
        shutil.copytree(first, run)  # the 1-epoch run, to be resumed to 2 epochs
        trainer = make_trainer(data, run, num_train_epochs=2, resume_from_checkpoint="latest")
        real_finish = trainer.finish

        def finish_with_kill(*args, real_finish=real_finish, n=n, **kwargs):
            replace, _ = kill_at(n)
            with mock.patch.object(atomic.os, "replace", replace):
                return real_finish(*args, **kwargs)

        trainer.finish = finish_with_kill
        try:
            trainer.train()
            break  # no kill: every rename of the final save has been tried
        except Killed:
            kill_points += 1
        model = MissrecForSequentialRecommendation.from_pretrained(run)  # a reader, after the kill
        weights = {k: v for k, v in model.state_dict().items()}
        metrics = results(run)
        if all(torch.equal(weights[k], new_weights[k]) for k in new_weights):
            assert metrics == new_metrics
            seen.add("new")
        else:
            assert all(torch.equal(weights[k], old_weights[k]) for k in old_weights)
            assert metrics == old_metrics
            seen.add("old")
        outcomes += 1
    assert kill_points >= 5 and outcomes == kill_points
    assert seen == {"old", "new"}


def test_a_run_finishes_in_an_output_dir_that_is_a_mount_point_under_a_read_only_parent(tmp_path):
    data = write_planted_dataset(tmp_path / "data")
    out = tmp_path / "parent" / "mounted"
    out.mkdir(parents=True)
    inside = str(out.resolve())
    real_replace, real_mkdir = os.replace, Path.mkdir

    def replace(src, dst, *args, **kwargs):  # another file system beyond the mount point
        if str(Path(src).resolve()).startswith(inside) != str(Path(dst).resolve()).startswith(inside):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_replace(src, dst, *args, **kwargs)

    def mkdir(self, *args, **kwargs):  # the parent is read-only
        if self.resolve().parent == out.parent.resolve() and self.resolve() != out.resolve():
            raise PermissionError(errno.EACCES, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    with mock.patch("os.replace", replace), mock.patch.object(Path, "mkdir", mkdir):
        metrics = make_trainer(data, out, num_train_epochs=2).train()
    assert (out / "metrics.json").exists() and metrics["epochs_run"] == 2
    MissrecForSequentialRecommendation.from_pretrained(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["mounted"]  # nothing was written beside it


def test_a_kill_between_the_two_renames_of_the_checkpoint_swap_still_resumes(tmp_path):
    data = write_planted_dataset(tmp_path / "data")
    make_trainer(data, tmp_path / "straight", num_train_epochs=3).train()
    out = tmp_path / "out"
    make_trainer(data, out, num_train_epochs=1).train()
    trainer = make_trainer(data, out, num_train_epochs=2, resume_from_checkpoint="latest")
    real_save = trainer.save_checkpoint

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):  # checkpoint -> .checkpoint.old done; killed before the second
        if Path(src).name == ".checkpoint.tmp":
            raise Killed
        return real_replace(src, dst, *args, **kwargs)

    def save_killed_midway():
        with mock.patch.object(atomic.os, "replace", replace):
            real_save()

    trainer.save_checkpoint = save_killed_midway
    with pytest.raises(Killed):
        trainer.train()
    assert not (out / "checkpoint").exists()  # both complete copies sit under hidden names
    make_trainer(data, out, num_train_epochs=3, resume_from_checkpoint="latest").train()
    a, b = trained_weights(tmp_path / "straight" / "checkpoint"), trained_weights(out / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_run_on_a_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    data = write_planted_dataset(tmp_path / "data")
    out = tmp_path / "out"
    make_trainer(data, out, num_train_epochs=1).train()
    with pytest.raises(ValueError, match=r"already holds a run \(best_model, checkpoint, config\.json"):
        make_trainer(data, out, num_train_epochs=1)
    make_trainer(data, out, num_train_epochs=2, resume_from_checkpoint="latest").train()
    trainer = make_trainer(data, out, num_train_epochs=1, overwrite_output_dir=True, seed=11)
    assert not (out / "checkpoint").exists() and not (out / "best_model").exists()  # nothing stale to resume
    assert trainer.train()["epochs_run"] == 1


def test_two_writers_of_one_output_dir_are_refused(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    atomic.hold_lock(folder)
    code = f"from modeling_missrec.atomic import hold_lock; hold_lock({str(folder)!r})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0
    assert f"is being written by another run (pid {os.getpid()})" in other.stderr


def test_a_resume_refuses_a_damaged_checkpoint_and_changed_settings(tmp_path):
    data = write_planted_dataset(tmp_path / "data")
    out = tmp_path / "out"
    make_trainer(data, out, num_train_epochs=1).train()
    with pytest.raises(ValueError, match=r"trained with other settings \(learning_rate: 0\.005 -> 0\.002\)"):
        make_trainer(data, out, num_train_epochs=2, learning_rate=2e-3, resume_from_checkpoint="latest").train()
    rng = out / "checkpoint" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:-20])  # truncated: Accelerate alone would log it at INFO and go on
    with pytest.raises(ValueError, match=r"random_states_0\.pkl is missing or damaged"):
        make_trainer(data, out, num_train_epochs=2, resume_from_checkpoint="latest").train()
