"""RecBole's SASRec on a folder of benchmark atomic files; run by `bench/peers.py` inside RecBole's own venv.

    <recbole-venv>/bin/python bench/recbole_sasrec.py --data_dir DIR --dataset NAME --work_dir SCRATCH --threads 2

Imports RecBole and torch only (never missrec: RecBole needs numpy<2, the project numpy 2). Trains SASRec with
the protocol of the comparison (full ranking, CE loss, max length 50, lr 1e-3, batch 512, early stopping on
valid NDCG@10 with patience 10, at most `--epochs`), evaluates the best model on test, and prints one JSON line
last: test metrics at standard @K, best epoch, training samples/s, evaluation users/s, peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="Folder with NAME.train/valid/test.inter.")
    parser.add_argument("--dataset", required=True, help="NAME of the atomic files.")
    parser.add_argument("--work_dir", required=True, help="Scratch folder (RecBole writes log/ and saved/ there).")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads.")
    parser.add_argument("--epochs", type=int, default=300, help="Epoch cap.")
    parser.add_argument("--patience", type=int, default=10, help="Early-stopping patience (evaluations).")
    parser.add_argument("--hidden_size", type=int, default=64, help="SASRec hidden size (RecBole's default 64).")
    parser.add_argument("--seed", type=int, default=2020, help="Seed.")
    return parser.parse_args(argv)


def link_dataset(data_dir: Path, name: str, work_dir: Path) -> Path:
    """RecBole reads <data_path>/<NAME>/<NAME>.<split>.inter: link the three split files there."""
    target = work_dir / "data" / name
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        source = data_dir / f"{name}.{split}.inter"
        if not source.is_file():
            sys.exit(f"error: {source} not found (expected the benchmark atomic files of {name}).")
        link = target / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source.resolve())
    return target.parent


def main(argv=None) -> dict:
    args = parse_args(argv)
    work_dir = Path(args.work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(work_dir)  # RecBole writes ./log and ./log_tensorboard
    data_path = link_dataset(Path(args.data_dir), args.dataset, work_dir)

    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(args.threads)
    config_dict = {
        "data_path": str(data_path),
        "checkpoint_dir": str(work_dir / "saved"),
        "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "MAX_ITEM_LIST_LENGTH": 50,
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "learning_rate": 1e-3,
        "train_batch_size": 512,
        "eval_batch_size": 1024 * 8192,  # whole users at once for full ranking (rows x items)
        "epochs": args.epochs,
        "stopping_step": args.patience,
        "valid_metric": "NDCG@10",
        "metrics": ["Hit", "NDCG"],
        "topk": [10, 50],
        "eval_args": {"mode": "full", "order": "TO", "group_by": "user"},
        "hidden_size": args.hidden_size,
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "worker": 0,
        "show_progress": False,
        "log_wandb": False,
    }
    config = Config(model="SASRec", dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    started = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)

    timings = {"train": [], "valid": [], "valid_scores": []}
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*a, **kw):
        start = time.perf_counter()
        result = train_epoch(*a, **kw)
        timings["train"].append(time.perf_counter() - start)
        return result

    def timed_valid(*a, **kw):
        start = time.perf_counter()
        score, result = valid_epoch(*a, **kw)
        timings["valid"].append(time.perf_counter() - start)
        timings["valid_scores"].append(float(score))
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    scores = timings["valid_scores"]
    train_rows = len(train_data._dataset)
    valid_users = len(valid_data._dataset)
    record = {
        "model": "SASRec (RecBole 1.2.1)",
        "test": {
            "hr@10": test["hit@10"],
            "ndcg@10": test["ndcg@10"],
            "hr@50": test["hit@50"],
            "ndcg@50": test["ndcg@50"],
        },
        "best_epoch": 1 + scores.index(max(scores)) if scores else None,
        "epochs_run": len(timings["train"]),
        "seconds_per_epoch": sum(timings["train"]) / max(len(timings["train"]), 1),
        "train_samples_per_s": train_rows * len(timings["train"]) / max(sum(timings["train"]), 1e-9),
        # The median pass: the first one also pays one-off costs, which weigh a third of a 3-epoch mean.
        "eval_users_per_s": valid_users / max(statistics.median(timings["valid"]), 1e-9),
        "eval_seconds_per_epoch": timings["valid"],
        "train_rows": train_rows,
        "eval_users": valid_users,
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_seconds": time.perf_counter() - started,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
