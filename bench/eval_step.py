#!/usr/bin/env python
"""Full-ranking evaluation speed on a real set, with each evaluation optimisation switched off and on.

    export MISSREC_SHARED_DATA=/path/to/shared/data          # or pass --data_root
    python bench/eval_step.py                                 # scientific_mm, both modes
    python bench/eval_step.py --datasets scientific_full --modes inductive --repeats 5

Per (dataset, mode): the reference model built by `build_model` (as `run_finetune.py`), its interests refreshed
by k-means, or a trained model from `--model_dir`; then `MissrecTrainer`'s own validation loader and
`evaluate_ranking`, timed `--repeats` times after one warm-up, in these cases:
  reference        every decoder position computed (`last_position_only=False`), batches of exactly
                   `--eval_batch_size` users (`eval_min_fill=0`): the code before these optimisations
  last_position    the last decoder layer computes each history's last position only
  + min_fill       and evaluation batches end before a history shorter than `--min_fill` x the batch's longest
  + centroid projections  and the encoder's first layer projects each interest centroid once and gathers
                   (`MissrecInterestTokenizer.vocabulary`) instead of projecting every slot of every set
  + prior table    and the history prior's cosines are looked up in the kept item x item table of the feature
                   rows (`MissrecHistoryPrior.cosine_table_max_bytes`) instead of a product per batch
  + bucket_by_length  and each batch computed in groups of similar length (`bucket_by_length=True`)
  bucket_by_length, full batches  last position and bucketing with batches of exactly `--eval_batch_size`
Reports users/s (median over repeats), the padding efficiency of the batches (real / padded positions), and
how many ranks differ from the reference and by how much at most (float rounding flips exact ties: items with
identical features score the same in the inductive mode, so a difference of 1 is a tie broken the other way).
Results: `<output_dir>/eval_step.json` and `.md`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from finetune_quality import DATASETS, MODES, SCIENTIFIC
from help_format import HelpFormatter
from locations import resolve_data_root
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

from modeling_missrec import MissrecForSequentialRecommendation
from modeling_missrec.data import load_atomic_dataset, load_item_catalog
from modeling_missrec.modeling_missrec import MissrecHistoryPrior
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import DataArguments, ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data root (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--datasets", nargs="+", default=["scientific_mm"], choices=sorted(SCIENTIFIC), help="Sets.")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="Model modes.")
    parser.add_argument("--model_dir", default=None, help="A trained model folder to load instead (one set, mode).")
    parser.add_argument("--eval_batch_size", type=int, default=1024, help="Users per evaluation batch.")
    parser.add_argument("--min_fill", type=float, default=0.7, help="eval_min_fill of the last case.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed evaluations per case (median reported).")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads.")
    parser.add_argument("--seed", type=int, default=2020, help="Model initialisation and k-means seed.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results go.")
    return parser.parse_args(argv)


class Case(NamedTuple):
    name: str
    last_position_only: bool
    min_fill: float | None  # None: --min_fill
    bucket_by_length: bool
    centroid_projections: bool
    prior_table: bool


CASES = (
    Case("reference", False, 0.0, False, False, False),
    Case("last_position", True, 0.0, False, False, False),
    Case("last_position + min_fill", True, None, False, False, False),
    Case("last_position + min_fill + centroid projections", True, None, False, True, False),
    Case("last_position + min_fill + centroid projections + prior table", True, None, False, True, True),
    Case(
        "last_position + min_fill + centroid projections + prior table + bucket_by_length", True, None, True, True, True
    ),
    Case(
        "last_position + centroid projections + prior table + bucket_by_length, full batches",
        True,
        0.0,
        True,
        True,
        True,
    ),
)
TABLE_BUDGET = MissrecHistoryPrior.cosine_table_max_bytes


def load_model(data_root: Path, dataset: str, mode: str, args):
    spec = DATASETS[dataset]
    data_args = DataArguments(
        data_dir=str(data_root / spec["folder"]),
        text_features=spec["text_features"],
        image_features=spec["image_features"],
    )
    splits = load_atomic_dataset(data_args.resolved_data_dir(), data_args.dataset_name, data_args.cache_dir)
    catalog = load_item_catalog(
        data_args.resolved_data_dir(), data_args.dataset_name, data_args.feature_files(), data_args.feature_sizes()
    )
    if args.model_dir:
        return MissrecForSequentialRecommendation.from_pretrained(args.model_dir), splits, catalog
    torch.manual_seed(args.seed)
    model = build_model(ModelArguments(mode=mode), catalog)
    model.refresh_interests(seed=args.seed)
    return model, splits, catalog


def time_case(model, splits, catalog, case: Case, min_fill: float, args, output_dir: str) -> dict:
    if model.history_prior is not None:
        model.history_prior.cosine_table_max_bytes = TABLE_BUDGET if case.prior_table else 0
    model.config.last_position_only = case.last_position_only
    model.config.bucket_by_length = case.bucket_by_length
    tokenizer = model.missrec.interest_tokenizer
    if case.centroid_projections:
        tokenizer.__dict__.pop("vocabulary", None)  # the method: the model's own choice
    else:
        tokenizer.vocabulary = lambda ids: None  # every slot projected, as before the vocabulary path
    training = TrainingArguments(
        output_dir=output_dir,
        eval_batch_size=args.eval_batch_size,
        eval_min_fill=min_fill,
        num_threads=args.threads,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = MissrecTrainer(model, splits, catalog, training)
    real = padded = 0
    for batch in trainer.valid_loader:
        real += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
    _, _, ranks = trainer._evaluate(trainer.valid_loader, "warm-up")
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        trainer._evaluate(trainer.valid_loader, "valid")
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {
        "users": int(ranks.numel()),
        "batches": len(trainer.valid_loader),
        "padding_efficiency": real / padded,
        "seconds_median": median,
        "seconds": seconds,
        "users_per_s": ranks.numel() / median,
        "ranks": ranks,
    }


def render(header: dict, records: list[dict]) -> str:
    headers = ["dataset", "mode", "case", "batches", "padding efficiency", "seconds", "users/s", "speed-up",
               "ranks differing", "max rank difference"]  # fmt: skip
    rows = [
        [r["dataset"], r["mode"], r["case"], r["batches"], r["padding_efficiency"], r["seconds_median"],
         r["users_per_s"], r["speedup"], r["ranks_differing"], r["max_rank_difference"]]
        for r in records
    ]  # fmt: skip
    return "\n".join(
        [
            "# Full-ranking evaluation speed, optimisations off and on",
            "",
            header_markdown(header),
            "Validation split, all users, full ranking over all items; median of the timed repeats.",
            "",
            markdown_table(headers, rows),
        ]
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_root = resolve_data_root(args.data_root)
    header = run_header()
    header["threads"] = args.threads
    records = []
    for dataset in args.datasets:
        for mode in args.modes:
            model, splits, catalog = load_model(data_root, dataset, mode, args)
            reference = None
            for case in CASES:
                with tempfile.TemporaryDirectory() as output_dir:
                    fill = args.min_fill if case.min_fill is None else case.min_fill
                    result = time_case(model, splits, catalog, case, fill, args, output_dir)
                ranks = result.pop("ranks")
                reference = reference or {"ranks": ranks, "seconds": result["seconds_median"]}
                record = {"dataset": dataset, "mode": mode, "case": case.name, "eval_min_fill": fill, **result}
                record["speedup"] = reference["seconds"] / result["seconds_median"]
                record["ranks_differing"] = int((ranks != reference["ranks"]).sum())
                record["max_rank_difference"] = int((ranks - reference["ranks"]).abs().max())
                print(record, flush=True)
                records.append(record)
    write_json_atomically(args.output_dir / "eval_step.json", {"meta": header, "records": records})
    report = render(header, records)
    write_text_atomically(args.output_dir / "eval_step.md", report)
    print(report)
    return records


if __name__ == "__main__":
    main()
