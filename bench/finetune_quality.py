#!/usr/bin/env python
"""Quality of MISSRec fine-tuned from scratch on the shared Scientific sets, through the real training path.

    export MISSREC_SHARED_DATA=/path/to/shared/data          # or pass --data_root
    python bench/finetune_quality.py                                            # the 4 Scientific runs (long)
    python bench/finetune_quality.py --datasets scientific_mm --modes inductive # one run; earlier ones are kept

Each (dataset, mode) run builds the model with `build_model` and trains it with `MissrecTrainer(...).train()`
(interests refreshed every epoch, early stopping on valid NDCG@10, the best model evaluated once on test by
full ranking), exactly as `run_finetune.py` does, in its own folder `<work_dir>/<dataset>-<mode>` (wiped
first; with --resume a killed run's folder is continued from its last finished epoch).

Datasets (under the shared data root):
  scientific_full  <root>/scientific_full: text = Scientific.text_minilm.npy (384), image =
                   Scientific.image_clip.npy (512; 2,800 of 4,385 items have an all-zero row = missing image).
                   The paper's split; its neighbourhood (original code, metrics at cut-off K+1): transductive
                   HR@10 0.1282 / NDCG@10 0.0711, inductive HR@10 0.1269 / NDCG@10 0.0659.
  scientific_mm    <root>/scientific_mm: text = Scientific.feat1CLS, image = Scientific.feat3CLS (raw float32,
                   512 each; every item has both).
  games            the Games domain of <root>/amazon_pretrain converted to a benchmark set (5-core, leave-one-out)
                   with MiniLM features of its title, categories and brand by `bench/pretrain_amazon5.py --steps
                   convert features --domains Games`: pass its folder with --dataset_dir (`bench/peers.py` does);
                   text = Games.text_minilm.npy (384), no image.
Modes: transductive (item ID table + content) and inductive (content only).

Results: `<output_dir>/finetune_quality.json` = {"meta": {...}, "records": [...]}, one record per (dataset,
mode), merged with the records already in the file, and `<output_dir>/finetune_quality.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from help_format import HelpFormatter
from locations import BENCH_DIR, resolve_data_root
from measurement import peak_rss_mib
from provenance import command_line, header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically
from transformers.utils import logging as transformers_logging

from modeling_missrec.checkpoints import CHECKPOINT_DIR, STATE_FILE
from modeling_missrec.data import load_atomic_dataset, load_item_catalog, subsample_training_users
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import (
    FINETUNE_METHODS,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_overrides,
)
from modeling_missrec.transfer import build_model

DATASETS = {
    "scientific_full": {
        "folder": "scientific_full",
        "text_features": "Scientific.text_minilm.npy",
        "image_features": "Scientific.image_clip.npy",
    },
    "scientific_mm": {
        "folder": "scientific_mm",
        "text_features": "Scientific.feat1CLS",
        "image_features": "Scientific.feat3CLS",
    },
    "games": {"folder": "Games", "text_features": "Games.text_minilm.npy", "image_features": None},
}
SCIENTIFIC = ("scientific_full", "scientific_mm")  # in the shared data; games is converted by the bench first
MODES = ("transductive", "inductive")
METRIC_KEYS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")
RESULT_NAME = "finetune_quality"
# The original code's numbers for scientific_full (README of the shared data; cut-off K+1, @10 only).
PAPER_NEIGHBOURHOOD = {
    ("scientific_full", "transductive"): {"hr@10": 0.1282, "ndcg@10": 0.0711},
    ("scientific_full", "inductive"): {"hr@10": 0.1269, "ndcg@10": 0.0659},
}

logger = logging.getLogger("finetune_quality")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--data_root",
        default=None,
        help="Shared data folder holding scientific_full/ and scientific_mm/ (default: $MISSREC_SHARED_DATA).",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=list(SCIENTIFIC), choices=list(DATASETS), help="Sets (games: --dataset_dir)."
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="Modes.")
    parser.add_argument(
        "--dataset_dir", type=Path, default=None, help="Folder of the (one) dataset instead of <data_root>/<folder>."
    )
    parser.add_argument("--num_train_epochs", type=int, default=300, help="Maximum epochs per run.")
    parser.add_argument(
        "--early_stopping_patience", type=int, default=10, help="Evaluations without improvement before stopping."
    )
    parser.add_argument("--seed", type=int, default=2020, help="Seed of the model initialisation and the trainer.")
    parser.add_argument("--train_batch_size", type=int, default=512, help="Training batch size.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate.")
    parser.add_argument(
        "--metric_cutoff_offset",
        type=int,
        default=0,
        choices=(0, 1),
        help="Early stopping on valid NDCG@K (0) or on the original code's @K+1 (1). Both are reported on test.",
    )
    parser.add_argument(
        "--config_overrides",
        default=None,
        help="MissrecConfig fields as 'name=value,name=value', passed to ModelArguments.config_overrides "
        "(e.g. 'hidden_size=32,num_attention_heads=2').",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="ModelArguments.temperature (default: run_finetune.py's: 0.1 from scratch, transductive, with the "
        "history prior, else the pre-trained model's or the paper's 0.07).",
    )
    parser.add_argument(
        "--text_features", default=None, help="Text feature file in the dataset folder instead of the set's own."
    )
    parser.add_argument(
        "--image_features", default=None, help="Image feature file instead of the set's own; '' drops the image."
    )
    parser.add_argument("--model_name_or_path", default=None, help="Start from this saved MISSRec (transfer).")
    parser.add_argument(
        "--finetune_method", default="full", choices=FINETUNE_METHODS, help="What is trained on transfer."
    )
    parser.add_argument(
        "--train_users_fraction", type=float, default=1.0, help="Share of the training users (the low-data regime)."
    )
    parser.add_argument(
        "--training_overrides",
        default=None,
        help="Other TrainingArguments fields as 'name=value,name=value' (e.g. 'group_by_length=false,"
        "length_group_batches=4'); unknown names are an error.",
    )
    parser.add_argument(
        "--max_steps_per_epoch", type=int, default=None, help="Cut every epoch short (smoke tests only)."
    )
    parser.add_argument(
        "--mixed_precision", default="no", choices=("no", "bf16", "fp16"), help="Autocast for training (bf16 on CPU)."
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch.set_num_threads before training (default: torch's). Use fewer threads than free cores on a "
        "shared CPU: oversubscribed threads make every op wait at thread barriers.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue a run folder's last finished epoch (its `checkpoint/`) instead of wiping it; a folder without "
        "one starts over. The trainer refuses a checkpoint trained with other settings.",
    )
    parser.add_argument(
        "--print_json",
        action="store_true",
        help="Print the last run's record, per-epoch history and split sizes as one JSON line at the end.",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=BENCH_DIR / "scratch",
        help="Scratch folder: one training output folder per run (wiped at its start) and the parsed-data cache.",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="Where finetune_quality.json and .md are written (records of earlier runs in it are kept).",
    )
    args = parser.parse_args(argv)
    try:
        args.training_settings = parse_overrides(args.training_overrides)
    except ValueError as error:
        parser.error(f"--training_overrides: {error}")
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(args.training_settings) - known)
    if unknown:
        parser.error(f"--training_overrides: unknown TrainingArguments field(s) {unknown}; known: {sorted(known)}")
    for name in ("num_train_epochs", "train_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.early_stopping_patience < 0:
        parser.error("--early_stopping_patience must be >= 0")
    return args


# ------------------------------------------------------------------------------------------------------- runs
def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run folder holds a finished epoch to resume (also one caught between the two renames of a swap,
    which the trainer's `resume_from_checkpoint="latest"` recovers)."""
    folders = (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old")
    return any((run_dir / folder / STATE_FILE).exists() for folder in folders)


def run_one(name: str, mode: str, args, data_root: Path) -> tuple[dict, dict, dict]:
    """Train and test one (dataset, mode); returns its record, the run's own settings and timings, and the
    per-epoch history with the split sizes (what `bench/peers.py` reads through `--print_json`)."""
    spec = dict(DATASETS[name])
    for modality in ("text", "image"):
        chosen = getattr(args, f"{modality}_features")
        if chosen is not None:
            spec[f"{modality}_features"] = chosen or None
    data_dir = args.dataset_dir or data_root / spec["folder"]
    if not data_dir.is_dir():
        where = "--dataset_dir" if args.dataset_dir else f"the shared data root {data_root} has no {spec['folder']}/"
        sys.exit(f"error: {data_dir} not found ({where}).")
    run_dir = Path(args.work_dir) / f"{name}-{mode}"
    resume = args.resume and has_checkpoint(run_dir)
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    data_args = DataArguments(
        data_dir=str(data_dir),
        text_features=spec["text_features"],
        image_features=spec["image_features"],
        cache_dir=str(Path(args.work_dir) / "cache"),  # the shared folder may be read-only
        train_users_fraction=args.train_users_fraction,
    )
    model_args = ModelArguments(
        mode=mode,
        config_overrides=args.config_overrides,
        temperature=args.temperature,
        model_name_or_path=args.model_name_or_path,
        finetune_method=args.finetune_method,
    )
    settings = dict(
        output_dir=str(run_dir),
        num_train_epochs=args.num_train_epochs,
        train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        early_stopping_patience=args.early_stopping_patience,
        metric_cutoff_offset=args.metric_cutoff_offset,
        max_steps_per_epoch=args.max_steps_per_epoch,
        mixed_precision=args.mixed_precision,
        report_to="none",
        disable_tqdm=True,
        resume_from_checkpoint="latest" if resume else None,
    )
    training_args = TrainingArguments(**{**settings, **args.training_settings})  # the overrides win
    started = time.perf_counter()
    dataset = load_atomic_dataset(data_args.resolved_data_dir(), data_args.dataset_name, data_args.cache_dir)
    dataset = subsample_training_users(dataset, data_args.train_users_fraction, args.seed)
    catalog = load_item_catalog(
        data_args.resolved_data_dir(), data_args.dataset_name, data_args.feature_files(), data_args.feature_sizes()
    )
    # The trainer seeds only when it is created, after the model exists: seed the initialisation here.
    set_seed(args.seed)
    model = build_model(model_args, catalog)
    trainer = MissrecTrainer(model, dataset, catalog, training_args)
    logger.info("%s / %s: %s", name, mode, catalog.summary())
    metrics = trainer.train() if training_args.do_train else trainer.evaluate_without_training()
    wall = time.perf_counter() - started
    history = metrics["history"]
    record = {
        "dataset": name,
        "mode": mode,
        "test": {k: metrics["test"][k] for k in METRIC_KEYS},
        "test_at_k_plus_1": {k: metrics["test_at_k_plus_1"][k] for k in METRIC_KEYS},
        "best_epoch": metrics["best_epoch"],
        "seconds_per_epoch": metrics["seconds_per_epoch"],
        "epochs_run": metrics["epochs_run"],
        "eval_seconds": statistics.fmean(h["eval_seconds"] for h in history) if history else None,
        "valid": metrics["valid"],
    }
    run_info = {
        "command": command_line(),
        "settings": {
            "num_train_epochs": args.num_train_epochs,
            "early_stopping_patience": args.early_stopping_patience,
            "seed": args.seed,
            "train_batch_size": args.train_batch_size,
            "learning_rate": args.learning_rate,
            "metric_cutoff_offset": args.metric_cutoff_offset,
            "config_overrides": args.config_overrides,
            "temperature": model.config.temperature,
            "training_overrides": args.training_overrides,
            "model_name_or_path": args.model_name_or_path,
            "finetune_method": args.finetune_method,
            "train_users_fraction": args.train_users_fraction,
            "max_steps_per_epoch": args.max_steps_per_epoch,
            "mixed_precision": args.mixed_precision,
            "torch_num_threads": torch.get_num_threads(),
            "data_dir": str(data_dir),
            "text_features": spec["text_features"],
            "image_features": spec["image_features"],
        },
        "catalog": catalog.summary(),
        "num_interests": metrics["num_interests"],
        "mean_cluster_seconds": statistics.fmean(h["cluster_seconds"] for h in history) if history else None,
        "mean_train_seconds": statistics.fmean(h["train_seconds"] for h in history) if history else None,
        "wall_seconds": wall,
        "peak_rss_mib_of_process": peak_rss_mib(),
        "run_dir": str(run_dir),
    }
    details = {
        "history": history,
        "temperature": model.config.temperature,
        "num_interests": metrics["num_interests"],
        "train_rows": len(dataset["train"]),
        "valid_users": len(dataset["valid"]),
        "trainable_parameters": metrics["trainable_parameters"],
        "peak_rss_mib": peak_rss_mib(),
        "wall_seconds": wall,
    }
    return record, run_info, details


# ----------------------------------------------------------------------------------------------------- output
def load_existing(path: Path) -> dict:
    """The results already written, or an empty skeleton; refuses to overwrite a file it cannot read."""
    if not path.exists():
        return {"meta": {}, "records": []}
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        sys.exit(f"error: {path} is not valid JSON ({error}); move it away to start a new results file.")
    if not isinstance(existing, dict) or not isinstance(existing.get("records"), list):
        sys.exit(f"error: {path} is not a finetune_quality result ({{'meta': ..., 'records': [...]}}).")
    existing.setdefault("meta", {})
    return existing


def merge(results: dict, record: dict, run_info: dict, header: dict) -> dict:
    """Replace the record of the same (dataset, mode), keep the others, in a fixed order."""
    key = (record["dataset"], record["mode"])
    records = [r for r in results["records"] if (r.get("dataset"), r.get("mode")) != key] + [record]
    order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in DATASETS for m in MODES)}
    records.sort(key=lambda r: order.get((r.get("dataset"), r.get("mode")), len(order)))
    runs = dict(results["meta"].get("runs", {}))
    runs[f"{key[0]}/{key[1]}"] = {**run_info, "date": header["date"], "machine": header["machine"]}
    return {"meta": {**header, "runs": runs}, "records": records}


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# MISSRec fine-tuning from scratch: quality on the shared Scientific sets",
        "",
        "Latest invocation:",
        "",
        header_markdown(meta).rstrip(),
        "",
        "Full ranking over all items, ties against the target, history not excluded. `@K` is the standard "
        "cut-off; `@K+1` is what the original MISSRec code reported as @K (the paper's tables).",
        "",
    ]
    rows = []
    for r in results["records"]:
        paper = PAPER_NEIGHBOURHOOD.get((r["dataset"], r["mode"]))
        rows.append(
            [
                r["dataset"],
                r["mode"],
                *(f"{r['test'][k]:.4f}" for k in METRIC_KEYS),
                *(f"{r['test_at_k_plus_1'][k]:.4f}" for k in ("hr@10", "ndcg@10")),
                f"{paper['hr@10']:.4f} / {paper['ndcg@10']:.4f}" if paper else "",
                str(r["best_epoch"]),
                str(r.get("epochs_run", "")),
                f"{r['seconds_per_epoch']:.1f}",
                f"{r['eval_seconds']:.1f}" if r.get("eval_seconds") is not None else "",
            ]
        )
    lines.append(
        markdown_table(
            [
                "dataset",
                "mode",
                "HR@10",
                "NDCG@10",
                "HR@50",
                "NDCG@50",
                "HR@10 (@K+1)",
                "NDCG@10 (@K+1)",
                "paper HR/NDCG@10 (@K+1)",
                "best epoch",
                "epochs",
                "s/epoch",
                "eval s",
            ],
            rows,
        )
    )
    lines += [
        "Paper neighbourhood (scientific_full, original code, @K+1): transductive NDCG@10 0.0711 / HR@10 0.1282, "
        "inductive NDCG@10 0.0659 / HR@10 0.1269. Our features differ (MiniLM text, images for 36% of items), so "
        "these are a neighbourhood to reach, not an exact target. `s/epoch` includes the per-epoch interest "
        "refresh and training, not evaluation (`eval s` is the mean validation time per epoch).",
        "",
        "## Runs",
        "",
    ]
    for key, run in meta.get("runs", {}).items():
        settings = run["settings"]
        lines.append(
            f"- {key}: `{run['command']}` on {run['date']} ({run['machine']['cpu_model']}, "
            f"{settings['torch_num_threads']} threads); epochs <= {settings['num_train_epochs']}, patience "
            f"{settings['early_stopping_patience']}, seed {settings['seed']}, batch {settings['train_batch_size']}, "
            f"lr {settings['learning_rate']}, precision {settings.get('mixed_precision', 'no')}, "
            f"early stopping at offset {settings['metric_cutoff_offset']}, overrides "
            f"{settings['config_overrides'] or 'none'}"
            + (f", max {settings['max_steps_per_epoch']} steps/epoch" if settings["max_steps_per_epoch"] else "")
            + f"; K={run['num_interests']}, wall {run['wall_seconds']:.0f} s"
        )
    return "\n".join(lines) + "\n"


def print_table(results: dict) -> None:
    print(
        f"{'dataset':<17}{'mode':<14}{'HR@10':>8}{'NDCG@10':>9}{'HR@50':>8}{'NDCG@50':>9}"
        f"{'HR@10+1':>9}{'NDCG@10+1':>10}{'best':>6}{'epochs':>7}{'s/epoch':>9}{'eval s':>8}"
    )
    for r in results["records"]:
        t, s = r["test"], r["test_at_k_plus_1"]
        eval_seconds = r.get("eval_seconds")
        print(
            f"{r['dataset']:<17}{r['mode']:<14}{t['hr@10']:>8.4f}{t['ndcg@10']:>9.4f}{t['hr@50']:>8.4f}"
            f"{t['ndcg@50']:>9.4f}{s['hr@10']:>9.4f}{s['ndcg@10']:>10.4f}{r['best_epoch']:>6}"
            f"{r.get('epochs_run', ''):>7}{r['seconds_per_epoch']:>9.1f}"
            f"{(f'{eval_seconds:.1f}' if eval_seconds is not None else ''):>8}"
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dataset_dir is not None and len(args.datasets) != 1:
        sys.exit("error: --dataset_dir is the folder of one dataset: name that one with --datasets")
    if "games" in args.datasets and args.dataset_dir is None:
        sys.exit(
            "error: games is not in the shared data as a benchmark set: convert it (bench/pretrain_amazon5.py "
            "--steps convert features --domains Games) and pass its folder with --dataset_dir"
        )
    data_root = resolve_data_root(args.data_root)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    json_path = Path(args.output_dir) / f"{RESULT_NAME}.json"
    results = load_existing(json_path)
    for name in args.datasets:
        for mode in args.modes:
            logger.info("=== %s / %s ===", name, mode)
            record, run_info, details = run_one(name, mode, args, data_root)
            # Re-read before merging so that a run finished meanwhile by another invocation is kept.
            results = merge(load_existing(json_path), record, run_info, run_header())
            write_json_atomically(json_path, results)
            write_text_atomically(json_path.with_suffix(".md"), render_markdown(results))
            logger.info("%s / %s: test %s | @K+1 %s", name, mode, record["test"], record["test_at_k_plus_1"])
    print()
    print_table(results)
    print(f"\nwritten: {json_path} and {json_path.with_suffix('.md')}")
    if args.print_json:  # the last line: the last run's record and history, for bench/peers.py
        print(json.dumps({"record": record, **details}))
    return results


if __name__ == "__main__":
    main()
