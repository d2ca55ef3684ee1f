"""The command-line entry points: --help, YAML + flag precedence, a tiny end-to-end run with a mocked upload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from test_trainer import TINY, write_planted_dataset

import run_finetune
import run_pretrain
from modeling_missrec.training_args import DataArguments, ModelArguments, PretrainingArguments, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "dataclasses"),
    [
        ("run_finetune.py", (DataArguments, ModelArguments, TrainingArguments)),
        ("run_pretrain.py", (PretrainingArguments,)),
    ],
)
def test_help_explains_every_flag(script, dataclasses):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for cls in dataclasses:
        for field in cls.__dataclass_fields__.values():
            assert f"--{field.name}" in result.stdout, field.name
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"


def test_finetune_end_to_end_with_push(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        "--data_dir", str(folder), "--text_features", "Toy.text.npy", "--image_features", "Toy.image.npy",
        "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out), "--num_train_epochs", "2",
        "--train_batch_size", "64", "--config_overrides", TINY, "--report_to", "none", "--disable_tqdm", "true",
        "--push_to_hub", "true", "--hub_model_id", "me/toy",
    ]  # fmt: skip
    with mock.patch("huggingface_hub.HfApi") as api_class:
        metrics = run_finetune.main(argv)
    api_class.return_value.upload_folder.assert_called_once()
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    assert "me/toy" in (out / "README.md").read_text()


def test_pretrain_end_to_end_on_the_embedded_data(tmp_path):
    argv = [
        "--output_dir",
        str(tmp_path / "pre"),
        "--num_train_epochs",
        "1",
        "--max_steps_per_epoch",
        "2",
        "--config_overrides",
        TINY,
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--save_every_epochs",
        "1",
    ]
    summary = run_pretrain.main(argv)
    assert summary["epochs_run"] == 1 and summary["num_processes"] == 1
    assert (tmp_path / "pre" / "checkpoint-epoch-1" / "model.safetensors").exists()


BAD_FINETUNE_ARGUMENTS = [
    (["--early_stopping_patience", "-1"], "early_stopping_patience=-1 is invalid; allowed: an integer >= 0"),
    (["--config_overrides", "hiden_size=64"], "unknown MissrecConfig field(s) ['hiden_size']"),
    (["--metric_cutoff_offset", "2"], "metric_cutoff_offset=2 is invalid; allowed: 0 (standard @K) or 1"),
    (["--train_batch_size", "0"], "train_batch_size=0 is invalid; allowed: an integer >= 1"),
    (["--eval_batch_size", "0"], "eval_batch_size=0 is invalid; allowed: an integer >= 1"),
    (["--finetune_method", "frozen"], "finetune_method='frozen' needs model_name_or_path"),
    (["--report_to", "wandbx"], "report_to='wandbx' is invalid; allowed: one of ['auto', 'none', 'tensorboard']"),
    (["--learning_rate", "0"], "learning_rate=0.0 is invalid; allowed: a float > 0"),
    (["--mixed_precision", "fp8"], "mixed_precision='fp8' is invalid; allowed: one of ['no', 'fp16', 'bf16', 'auto']"),
    (["--eval_ks", "10", "10"], "eval_ks=[10, 10] is invalid; allowed: a list of distinct integers >= 1"),
    (["--lora_rank", "0"], "lora_rank=0 is invalid; allowed: an integer >= 1"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FINETUNE_ARGUMENTS, ids=[f[0][0] for f in BAD_FINETUNE_ARGUMENTS])
def test_a_meaningless_argument_is_one_line_on_stderr_before_any_data_is_read(flags, message, capsys, tmp_path):
    from modeling_missrec.cli import run_command

    with mock.patch.object(run_finetune, "load_atomic_dataset", side_effect=AssertionError("data was read")):
        with pytest.raises(SystemExit) as stop:
            run_command(run_finetune.main, [*flags, "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_command_line_prints_one_line_and_the_traceback_only_with_debug(tmp_path):
    command = [sys.executable, str(ROOT / "run_finetune.py"), "--metric_cutoff_offset", "2"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: metric_cutoff_offset=2 is invalid")
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_an_internal_error_keeps_its_traceback():
    import numpy as np

    from modeling_missrec.cli import run_command

    def broken(argv):
        np.zeros(2).reshape(3)  # a ValueError raised inside a library, not a user's mistake

    with pytest.raises(ValueError, match="cannot reshape"):
        run_command(broken, [])


def test_the_feature_extractor_reports_a_missing_folder_in_one_line(tmp_path):
    command = [sys.executable, "-m", "modeling_missrec.features", "text", "--data_dir", str(tmp_path / "none")]
    command += ["--model_path", str(tmp_path), "--output", str(tmp_path / "x.npy")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path / 'none'}: expected exactly one *.train.inter file, found none"
    )  # noqa: E501
