"""What a training run keeps in its output folder, and the rules for taking one over.

The trainer state saved beside every checkpoint, the settings a resumed run must share with the run it
continues, the checksums that tell a damaged checkpoint from a whole one, and the refusal to start a new run
over another run's results (HF's `overwrite_output_dir` convention). The loops that write them are in
`trainer.py`; the atomic swaps and journals are in `atomic.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best_model"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a resumed run needs besides the weights and the optimiser: saved as JSON in every checkpoint."""

    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    num_interests: int = 0
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what a resume must not change (RESUME_SETTINGS)
    train_seconds: float = 0.0


# Arguments a resumed run must share with the run it continues: any of them changes the result. (The number of
# epochs may grow under a constant learning rate; evaluation batch sizes and threads change no rank.)
RESUME_SETTINGS = (
    "learning_rate", "weight_decay", "optimizer", "lr_scheduler_type", "warmup_ratio", "train_batch_size",
    "gradient_accumulation_steps", "seed", "group_by_length", "length_group_batches", "mixed_precision",
    "metric_for_best_model", "eval_ks", "metric_cutoff_offset", "exclude_history", "max_steps_per_epoch",
    "augment", "word_drop_ratio", "domain_batches",
)  # fmt: skip
CHECKSUMS_FILE = "checksums.json"


def resume_settings(args, model=None, train_rows: int | None = None) -> dict:
    settings = {name: getattr(args, name) for name in RESUME_SETTINGS if hasattr(args, name)}
    if model is not None:  # the model's own settings (temperature, dropout, regulariser, mode, ...)
        config = model.config.to_diff_dict()
        for name in ("num_interests", "architectures", "auto_map", "transformers_version"):
            config.pop(name, None)
        settings["model_config"] = json.dumps(config, sort_keys=True, default=str)
        settings["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if train_rows is not None:
        settings["train_rows"] = train_rows  # e.g. another train_users_fraction
    if getattr(args, "lr_scheduler_type", "constant") != "constant":
        settings["num_train_epochs"] = args.num_train_epochs  # the schedule spans them
    return settings


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative names), to tell a damaged checkpoint from a whole one."""
    sums = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (STATE_FILE, CHECKSUMS_FILE)):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        sums[str(path.relative_to(folder))] = digest.hexdigest()
    return sums


# What a finished or running training leaves in its output folder (logs alone do not count), including the
# hidden halves of an interrupted swap or commit; --overwrite_output_dir removes all of it.
RUN_OUTPUTS = (
    "config.json", "model.safetensors", "metrics.json", "pretrain_metrics.json", CHECKPOINT_DIR, BEST_DIR,
    f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old", f".{BEST_DIR}.tmp", f".{BEST_DIR}.old", ".commit.json",
    ".staging",
)  # fmt: skip
MODEL_FILES = ("item_ids.json", "training_state.pt", "results.md", "README.md", "lora_adapter", "*.py")


def claim_output_dir(output_dir: Path, args) -> None:
    """Refuse to start a new run over another run's results (HF's convention), unless told to resume it or
    to overwrite it; overwriting first removes its checkpoints, so that nothing of it is picked up later."""
    if args.resume_from_checkpoint:
        return
    found = sorted(n for n in RUN_OUTPUTS if (output_dir / n).exists())
    found += sorted(p.name for p in output_dir.glob("checkpoint-epoch-*"))
    if not found:
        return
    if not args.overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}); pass --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to start over, or another --output_dir."
        )
    stale = [output_dir / n for n in RUN_OUTPUTS] + list(output_dir.glob("checkpoint-epoch-*"))
    if (output_dir / "config.json").exists():  # a model folder: its other files belong to the old model too
        stale += [path for pattern in MODEL_FILES for path in output_dir.glob(pattern)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
