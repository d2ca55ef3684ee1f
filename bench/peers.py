#!/usr/bin/env python
"""missrec against RecBole's SASRec, in the same run on the same machine with the same thread count.

    export MISSREC_SHARED_DATA=/path/to/shared/data         # or --data_root
    python bench/peers.py                                    # all three sets, SASRec + missrec (both modes): long
    python bench/peers.py --datasets scientific_mm --epochs 3 --output_dir /tmp/peers    # a smoke run
    python bench/peers.py --datasets games                   # the Games domain (16.4k items, mean history 7)

Sets: scientific_mm and scientific_full of the shared data, and `games`: the Games domain of
`<root>/amazon_pretrain` (raw logs) converted to a 5-core leave-one-out benchmark set with MiniLM features of
its title, categories and brand by `bench/pretrain_amazon5.py --steps convert features --domains Games` into
`--amazon5_dir` (reused when it is there, so the pre-training corpus and this bench share it): a larger
catalogue with longer histories than Scientific's. missrec uses that text (no image); SASRec the item ids.

Protocol, the same for every model: the benchmark leave-one-out files of each set, full ranking over all items
(standard @K: HR@K, NDCG@K at K = 10, 50), full-softmax cross-entropy, max length 50, Adam lr 1e-3, batch 512,
early stopping on valid NDCG@10 with patience 10 (at most `--epochs`), seed 2020, `--threads` torch threads.

  SASRec   RecBole 1.2.1 (hidden 64, 2 layers, 2 heads: RecBole's defaults), run by `bench/recbole_sasrec.py`
           in its own virtual environment `bench/.venv-recbole`, created on first use with
           `pip install torch==2.13.0 recbole==1.2.1 'numpy<2' 'pandas<3' 'setuptools<81'` (RecBole needs numpy<2,
           the project numpy 2), with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (its checkpoints pickle its Config).
  missrec  `bench/finetune_quality.py` for the same set and mode (the real training path of run_finetune.py),
           transductive and inductive, from scratch.

Each model runs in its own process, so peak resident memory is its own. Training samples/s is the training rows
of an epoch over the training time of the epoch (missrec: without the per-epoch interest refresh, which is
reported apart), averaged over epochs; evaluation users/s is the valid users over the median validation
pass (records from 2026-12-07 on; earlier ones over the mean pass, which a short run's first pass, with its
one-off costs, weighs down).

Results: `<output_dir>/peers.json` (records with `model`, `dataset`, `mode`, `test`, `train_samples_per_s`,
`eval_users_per_s`, `peak_rss_mb`, `epochs_cap`, `commit`, `date`, ...) and `peers.md` with the missrec/SASRec
ratios (a pair only when both ran with the same epoch cap). Each finished model is written at once. A run
started again keeps the records already there and skips each (dataset, model, epoch cap) it finds, so a killed
run loses one model at most and `--datasets games --epochs 5` adds to a file that holds the Scientific sets;
`--fresh` runs everything it is asked for again (after a change to the code being measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from help_format import HelpFormatter
from locations import BENCH_DIR, REPO_ROOT, resolve_data_root
from provenance import header_markdown, run_header, utc_now
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

DATASETS = ("scientific_mm", "scientific_full", "games")
FILE_PREFIXES = {"scientific_mm": "Scientific", "scientific_full": "Scientific", "games": "Games"}  # X in X.train.inter
MODELS = ("sasrec", "missrec-transductive", "missrec-inductive")
RECBOLE_VENV = BENCH_DIR / ".venv-recbole"
RECBOLE_PACKAGES = ["torch==2.13.0", "recbole==1.2.1", "numpy<2", "pandas<3", "setuptools<81"]
METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data root (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="Sets to run.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="Models to run.")
    parser.add_argument("--epochs", type=int, default=300, help="Epoch cap of every model.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, all.")
    parser.add_argument("--work_dir", type=Path, default=BENCH_DIR / "scratch" / "peers", help="Scratch folder.")
    parser.add_argument(
        "--amazon5_dir",
        type=Path,
        default=BENCH_DIR / "scratch" / "amazon5",
        help="Where bench/pretrain_amazon5.py converts the Games domain (its --work_dir).",
    )
    parser.add_argument(
        "--minilm_path", type=Path, default=None, help="all-MiniLM-L6-v2 folder for Games (default: the package's)."
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="Run every requested model again, replacing its record (default: skip those already recorded).",
    )
    return parser.parse_args(argv)


def ensure_recbole_venv() -> Path:
    python = RECBOLE_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {RECBOLE_VENV} (RecBole 1.2.1, CPU torch; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(RECBOLE_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *RECBOLE_PACKAGES], check=True)
    return python


def run_json(command: list[str], env: dict, log: Path) -> dict:
    """Run a command, keep its whole output in `log`, and parse the JSON object on its last stdout line."""
    print(f"-> {' '.join(command)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise RuntimeError(f"{command[1]} failed with exit {done.returncode}; see {log}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"   done in {time.perf_counter() - started:.0f} s", flush=True)
    return result


def dataset_dir(dataset: str, args: argparse.Namespace, env: dict) -> Path:
    """The set's atomic folder; Games is converted (and featurised) by the pre-training recipe, which reuses
    what it made before (its steps are idempotent)."""
    if dataset != "games":
        return args.data_root_resolved / dataset
    command = [
        sys.executable, str(BENCH_DIR / "pretrain_amazon5.py"), "--data_root", str(args.data_root_resolved),
        "--steps", "convert", "features", "--domains", "Games", "--work_dir", str(args.amazon5_dir),
        "--output_dir", str(args.work_dir / "amazon5-games"),
    ]  # fmt: skip
    if args.minilm_path is not None:
        command += ["--minilm_path", str(args.minilm_path)]
    print(f"-> {' '.join(command)}", flush=True)
    subprocess.run(command, env=env, check=True, cwd=REPO_ROOT)
    return args.amazon5_dir / "Games"


def run_sasrec(dataset: str, folder: Path, args, env: dict) -> dict:
    python = ensure_recbole_venv()
    command = [
        str(python), str(BENCH_DIR / "recbole_sasrec.py"),
        "--data_dir", str(folder), "--dataset", FILE_PREFIXES[dataset],
        "--work_dir", str(args.work_dir / f"sasrec-{dataset}"),
        "--threads", str(args.threads), "--epochs", str(args.epochs),
    ]  # fmt: skip
    record = run_json(
        command, {**env, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, args.work_dir / f"sasrec-{dataset}.log"
    )
    return {**record, "model": "SASRec", "dataset": dataset, "mode": "transductive"}


def run_missrec(dataset: str, folder: Path, mode: str, args, env: dict) -> dict:
    out = args.work_dir / f"missrec-{dataset}-{mode}"
    command = [
        sys.executable, str(BENCH_DIR / "finetune_quality.py"),
        "--data_root", str(args.data_root_resolved), "--datasets", dataset, "--modes", mode,
        "--dataset_dir", str(folder),
        "--num_train_epochs", str(args.epochs), "--num_threads", str(args.threads),
        "--output_dir", str(out / "results"), "--work_dir", str(out / "work"), "--print_json",
    ]  # fmt: skip
    result = run_json(command, env, args.work_dir / f"missrec-{dataset}-{mode}.log")
    history = result["history"]
    train_seconds = sum(h["train_seconds"] for h in history)
    eval_seconds = [h["eval_seconds"] for h in history]
    return {
        "model": "MISSRec (missrec)",
        "dataset": dataset,
        "mode": mode,
        "test": {k: result["record"]["test"][k] for k in METRICS},
        "best_epoch": result["record"]["best_epoch"] + 1,  # the trainer counts from 0, RecBole from 1
        "epochs_run": result["record"]["epochs_run"],
        "seconds_per_epoch": result["record"]["seconds_per_epoch"],
        "cluster_seconds_per_epoch": sum(h["cluster_seconds"] for h in history) / max(len(history), 1),
        "train_samples_per_s": result["train_rows"] * len(history) / max(train_seconds, 1e-9),
        "eval_users_per_s": result["valid_users"] / max(statistics.median(eval_seconds), 1e-9),
        "eval_seconds_per_epoch": eval_seconds,
        "train_rows": result["train_rows"],
        "eval_users": result["valid_users"],
        "parameters": result["trainable_parameters"],
        "peak_rss_mb": result["peak_rss_mib"],
        "wall_seconds": result["wall_seconds"],
    }


def model_key(record: dict) -> str:
    """The `--models` name of a record: "sasrec" or "missrec-<mode>"."""
    return "sasrec" if record["model"] == "SASRec" else f"missrec-{record['mode']}"


def record_key(record: dict) -> tuple[str, str, int]:
    return record["dataset"], model_key(record), record["epochs_cap"]


def same_protocol(a: dict, b: dict) -> bool:
    return a["dataset"] == b["dataset"] and a["epochs_cap"] == b["epochs_cap"]


def previous_records(path: Path) -> list[dict]:
    """The records of an earlier run in `path`, each with its epoch cap, commit and date. Files written before
    these were per record (2026-12-03 and earlier) take them from their header; their cap was the default, 300
    (no recorded run set `--epochs`)."""
    if not path.exists():
        return []
    payload = json.loads(path.read_text(encoding="utf-8"))
    meta = payload.get("meta", {})
    return [
        {"epochs_cap": 300, "commit": meta.get("commit"), "date": meta.get("date"), **record}
        for record in payload.get("records", [])
    ]


def merged(records: list[dict], new: dict) -> list[dict]:
    """`records` with `new` in place of the record of the same key, ordered by set, then model."""
    kept = [r for r in records if record_key(r) != record_key(new)] + [new]
    order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in DATASETS for m in MODELS)}
    # A record of a set or model this script no longer runs stays, last.
    return sorted(kept, key=lambda r: (order.get((r["dataset"], model_key(r)), len(order)), r["epochs_cap"]))


def ratios(records: list[dict]) -> list[dict]:
    """missrec / SASRec of every figure, per dataset and missrec mode."""
    rows = []
    for r in records:
        if r["model"] == "SASRec" or "test" not in r:
            continue
        peer = next((p for p in records if p["model"] == "SASRec" and same_protocol(p, r)), None)
        if peer is None:
            continue
        rows.append(
            {
                "dataset": r["dataset"],
                "mode": r["mode"],
                "epochs_cap": r["epochs_cap"],
                "ndcg@10": r["test"]["ndcg@10"] / peer["test"]["ndcg@10"],
                "hr@10": r["test"]["hr@10"] / peer["test"]["hr@10"],
                "train_samples_per_s": r["train_samples_per_s"] / peer["train_samples_per_s"],
                "eval_users_per_s": r["eval_users_per_s"] / peer["eval_users_per_s"],
                "peak_rss_mb": r["peak_rss_mb"] / peer["peak_rss_mb"],
            }
        )
    return rows


def render(header: dict, records: list[dict], ratio_rows: list[dict]) -> str:
    rows = [
        [r["dataset"], r["model"], r["mode"], *(r["test"][k] for k in METRICS), r["best_epoch"], r["epochs_run"],
         r["epochs_cap"], r["train_samples_per_s"], r["eval_users_per_s"], r["peak_rss_mb"], r.get("parameters"),
         f"{r.get('date')} {r.get('commit')}"]
        for r in records
    ]  # fmt: skip
    headers = ["dataset", "model", "mode", *METRICS, "best epoch", "epochs", "epoch cap", "train samples/s",
               "eval users/s", "peak RSS MB", "parameters", "run (UTC, commit)"]  # fmt: skip
    ratio_table = [
        [r["dataset"], r["mode"], r["epochs_cap"], r["ndcg@10"], r["hr@10"], r["train_samples_per_s"],
         r["eval_users_per_s"], r["peak_rss_mb"]]
        for r in ratio_rows
    ]  # fmt: skip
    return "\n".join(
        [
            "# missrec vs RecBole SASRec (same run, same machine, same threads)",
            "",
            header_markdown(header),
            "Full ranking over all items, standard @K, history not excluded; early stopping on valid NDCG@10; "
            "epochs counted from 1. The header is this invocation's; a record kept from an earlier one says when "
            "and at which commit it ran.",
            "",
            markdown_table(headers, rows),
            "## missrec / SASRec",
            "",
            markdown_table(
                [
                    "dataset",
                    "missrec mode",
                    "epoch cap",
                    "NDCG@10",
                    "HR@10",
                    "train samples/s",
                    "eval users/s",
                    "peak RSS",
                ],
                ratio_table,
            ),  # fmt: skip
        ]
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.data_root_resolved = resolve_data_root(args.data_root)
    # Absolute: the RecBole runner and the conversion start in other folders.
    args.work_dir, args.amazon5_dir = args.work_dir.resolve(), args.amazon5_dir.resolve()
    header = run_header()
    header["threads"] = args.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    json_path = args.output_dir / "peers.json"
    records = previous_records(json_path)
    done = set() if args.fresh else {record_key(r) for r in records}
    for dataset in args.datasets:
        todo = [m for m in args.models if (dataset, m, args.epochs) not in done]
        for model in sorted(set(args.models) - set(todo)):
            print(f"{dataset} / {model}: recorded already (--fresh runs it again)", flush=True)
        folder = dataset_dir(dataset, args, env) if todo else None
        for model in todo:
            if model == "sasrec":
                record = run_sasrec(dataset, folder, args, env)
            else:
                record = run_missrec(dataset, folder, model.split("-", 1)[1], args, env)
            record = {**record, "epochs_cap": args.epochs, "commit": header["commit"], "date": utc_now()}
            records = merged(records, record)
            ratio_rows = ratios(records)
            payload = {"meta": header, "records": records, "ratios": ratio_rows}
            write_json_atomically(json_path, payload)  # after every model: a killed run keeps what it finished
            write_text_atomically(args.output_dir / "peers.md", render(header, records, ratio_rows))
    print(render(header, records, ratios(records)))
    return records


if __name__ == "__main__":
    main()
