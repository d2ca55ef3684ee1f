#!/usr/bin/env python
"""Does pre-training transfer? Pre-train MISSRec on Scientific users outside scientific_mm, then fine-tune on
scientific_mm by each method, against the same model trained from scratch.

    export MISSREC_SHARED_DATA=/path/to/shared/data          # or pass --data_root
    python bench/transfer.py                                  # pre-train, then scratch/frozen/full/lora
    python bench/transfer.py --skip_pretrain                  # reuse <work_dir>/pretrained

Pre-training corpus: the train rows of scientific_full whose users (raw ids through `.user2index`) are not in
scientific_mm, so no valid or test item of the target domain is seen; features MiniLM text
(`Scientific.text_minilm.npy`, 384) + CLIP image (`Scientific.image_clip.npy`, 512, zero where missing).
Target: scientific_mm with the same feature spaces (`Scientific.text_minilm.npy`, `Scientific.feat3CLS`).
Methods: scratch (no pre-training), frozen (the paper: position embedding, encoder, decoder frozen), full
(everything trained from the pre-trained weights), lora (LoRA on q/k/v/o, adaptors/LN/fusion/IDs trained).
Also measures pre-training throughput with 1 and 2 CPU processes (`--throughput_epochs`).

Writes `<output_dir>/transfer.json` ({"meta", "records", "pretraining"}) and `transfer.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from common import (
    BENCH_DIR,
    DEFAULT_RESULTS_DIR,
    HelpFormatter,
    header_markdown,
    markdown_table,
    resolve_data_root,
    run_header,
    write_json_atomically,
    write_text_atomically,
)
from transformers.utils import logging as transformers_logging

from modeling_missrec.data import load_atomic_dataset, load_item_catalog, read_index_file
from modeling_missrec.trainer import MissrecTrainer, ModelArguments, TrainingArguments, build_model

REPO = Path(__file__).resolve().parents[1]
METHODS = ("scratch", "frozen", "full", "lora")
METRIC_KEYS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")
logger = logging.getLogger("transfer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data root (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Fine-tuning methods.")
    parser.add_argument("--mode", default="transductive", choices=("transductive", "inductive"), help="Target mode.")
    parser.add_argument("--pretrain_epochs", type=int, default=20, help="Pre-training epochs.")
    parser.add_argument("--pretrain_batch_size", type=int, default=1024, help="Pre-training global batch.")
    parser.add_argument("--num_train_epochs", type=int, default=300, help="Fine-tuning epoch cap (early stopping).")
    parser.add_argument("--early_stopping_patience", type=int, default=10, help="Fine-tuning patience.")
    parser.add_argument("--throughput_epochs", type=int, default=1, help="Epochs per pre-training throughput run.")
    parser.add_argument("--skip_pretrain", action="store_true", help="Reuse <work_dir>/pretrained.")
    parser.add_argument("--skip_throughput", action="store_true", help="Skip the 1 vs 2 process measurement.")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "bf16"), help="Autocast for training.")
    parser.add_argument("--seed", type=int, default=2020, help="Seed of everything.")
    parser.add_argument("--work_dir", type=Path, default=BENCH_DIR / "scratch" / "transfer", help="Scratch folder.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    return parser.parse_args(argv)


def build_pretraining_domain(data_root: Path, work_dir: Path) -> tuple[Path, dict]:
    """scientific_full's train rows of users absent from scientific_mm, as an atomic-file folder."""
    full, target = data_root / "scientific_full", data_root / "scientific_mm"
    target_users = set(read_index_file(target / "Scientific.user2index"))
    full_users = read_index_file(full / "Scientific.user2index")
    excluded = {index for index, raw in enumerate(full_users) if raw in target_users}
    domain = work_dir / "pretrain_domain"
    domain.mkdir(parents=True, exist_ok=True)
    lines = (full / "Scientific.train.inter").read_text().splitlines(keepends=True)
    kept = [line for line in lines[1:] if int(line.split("\t", 1)[0]) not in excluded]
    (domain / "Scientific.train.inter").write_text(lines[0] + "".join(kept))
    for name in ("Scientific.item2index", "Scientific.text_minilm.npy", "Scientific.image_clip.npy"):
        shutil.copyfile(full / name, domain / name)
    stats = {"users_excluded": len(excluded), "train_rows": len(kept), "train_rows_all": len(lines) - 1}
    return domain, stats


def run_pretrain(domain: Path, out: Path, epochs: int, batch: int, args, processes: int = 1) -> dict:
    """run_pretrain.py in a subprocess (1 process, or 2 CPU processes with a real gloo group)."""
    flags = [
        "--domain_dirs", str(domain), "--text_features", "{name}.text_minilm.npy",
        "--image_features", "{name}.image_clip.npy", "--output_dir", str(out), "--num_train_epochs", str(epochs),
        "--train_batch_size", str(batch), "--save_every_epochs", "0", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", str(args.seed), "--mixed_precision", args.mixed_precision,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, str(REPO / "run_pretrain.py"), *flags]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "run_pretrain.py"), *flags,
        ]  # fmt: skip
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"pre-training failed ({' '.join(command)}):\n{completed.stderr[-4000:]}")
    summary = json.loads((out / "pretrain_metrics.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    if summary["num_processes"] != processes:
        sys.exit(f"asked for {processes} processes, the run had {summary['num_processes']}")
    return summary


def finetune(method: str, pretrained: Path, data_root: Path, args) -> dict:
    target = data_root / "scientific_mm"
    run_dir = args.work_dir / f"finetune-{method}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    dataset = load_atomic_dataset(target, cache_dir=args.work_dir / "cache")
    catalog = load_item_catalog(
        target,
        feature_files={"text": "Scientific.text_minilm.npy", "image": "Scientific.feat3CLS"},
        feature_sizes={"image": 512},
    )
    set_seed(args.seed)
    model_args = ModelArguments(
        model_name_or_path=None if method == "scratch" else str(pretrained),
        finetune_method="full" if method == "scratch" else method,
        mode=args.mode,
    )
    model = build_model(model_args, catalog)
    training = TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=args.num_train_epochs,
        early_stopping_patience=args.early_stopping_patience,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        report_to="none",
        disable_tqdm=True,
    )
    metrics = MissrecTrainer(model, dataset, catalog, training).train()
    return {
        "method": method,
        "trainable_params": metrics["trainable_parameters"],
        "test": {k: metrics["test"][k] for k in METRIC_KEYS},
        "seconds_per_epoch": metrics["seconds_per_epoch"],
        "best_epoch": metrics["best_epoch"],
        "epochs_run": metrics["epochs_run"],
        "valid": {k: metrics["valid"][k] for k in METRIC_KEYS},
    }


def render(results: dict) -> str:
    lines = [
        "# Transfer: pre-train on other Scientific users, fine-tune on scientific_mm",
        "",
        header_markdown(results["meta"]).rstrip(),
        "",
    ]
    pre = results.get("pretraining", {})
    if pre:
        lines += [f"Pre-training corpus: {pre.get('corpus')}", ""]
        rows = [
            [name, run["num_processes"], f"{run['samples_per_second']:.0f}", f"{run['seconds_per_epoch']:.1f}"]
            for name, run in pre.get("runs", {}).items()
        ]
        lines += [markdown_table(["pre-training run", "processes", "samples/s", "s/epoch"], rows), ""]
    rows = [
        [
            r["method"],
            f"{r['trainable_params']:,}",
            *(f"{r['test'][k]:.4f}" for k in METRIC_KEYS),
            r["best_epoch"],
            f"{r['seconds_per_epoch']:.1f}",
        ]
        for r in results["records"]
    ]
    lines.append(markdown_table(["method", "trainable", *METRIC_KEYS, "best epoch", "s/epoch"], rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers_logging.disable_progress_bar()
    data_root = resolve_data_root(args.data_root)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    domain, corpus = build_pretraining_domain(data_root, args.work_dir)
    pretrained = args.work_dir / "pretrained"
    pretraining = {"corpus": corpus, "runs": {}}
    if not args.skip_throughput:
        for processes in (1, 2):
            summary = run_pretrain(
                domain,
                args.work_dir / f"throughput-{processes}",
                args.throughput_epochs,
                args.pretrain_batch_size,
                args,
                processes,
            )
            pretraining["runs"][f"throughput, {processes} process(es)"] = {
                "num_processes": processes,
                "samples_per_second": float(np.mean([h["train_samples_per_second"] for h in summary["history"]])),
                "seconds_per_epoch": summary["seconds_per_epoch"],
            }
    if not args.skip_pretrain:
        summary = run_pretrain(domain, pretrained, args.pretrain_epochs, args.pretrain_batch_size, args)
        pretraining["runs"]["pre-training used for transfer"] = {
            "num_processes": 1,
            "samples_per_second": float(np.mean([h["train_samples_per_second"] for h in summary["history"]])),
            "seconds_per_epoch": summary["seconds_per_epoch"],
            "epochs": summary["epochs_run"],
            "final_loss": summary["history"][-1]["loss"],
        }
    records = []
    results = {
        "meta": {
            **run_header(),
            "settings": vars(args) | {"work_dir": str(args.work_dir), "output_dir": str(args.output_dir)},
        },
        "pretraining": pretraining,
        "records": records,
    }
    json_path = args.output_dir / "transfer.json"
    for method in args.methods:
        logger.info("=== fine-tuning: %s ===", method)
        records.append(finetune(method, pretrained, data_root, args))
        write_json_atomically(json_path, results)
        write_text_atomically(json_path.with_suffix(".md"), render(results))
    print(render(results))
    return results


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
