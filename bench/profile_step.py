#!/usr/bin/env python
"""Where a training step and a full-ranking evaluation spend their time (torch.profiler).

    python bench/profile_step.py                                  # CPU, Office-like synthetic data
    python bench/profile_step.py --device cuda --precision bf16   # on a GPU

Builds the synthetic Office-scale data of `bench/scale.py` (`--num_items`, `--num_users`; smaller by default on
the CPU), runs `--warmup_steps` untimed training steps, then profiles `--steps` steps of
`MissrecTrainer.train_epoch` and `--eval_batches` batches of `evaluate_ranking`. Writes, per phase, the wall
time, the operators by self time (top `--top`), and the host-device synchronisations (`aten::item`,
`aten::_local_scalar_dense`, `cudaStreamSynchronize`, device-to-host copies) per step, to
`<output_dir>/profile_<device>_<precision>.md` and a Chrome trace beside it with `--trace`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from help_format import HelpFormatter
from measurement import synchronize
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, write_text_atomically
from scale import FEATURE_SIZE, random_interest_state, synthetic_features, synthetic_log, take_rows
from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--precision", default="no", choices=("no", "bf16"), help="Autocast mode.")
    parser.add_argument("--num_items", type=int, default=25_986, help="Catalogue size (Office).")
    parser.add_argument("--num_users", type=int, default=None, help="Users (default 87,346 on CUDA, 20,000 on CPU).")
    parser.add_argument("--batch_size", type=int, default=512, help="Training batch.")
    parser.add_argument("--warmup_steps", type=int, default=5, help="Untimed steps first.")
    parser.add_argument("--steps", type=int, default=10, help="Profiled training steps.")
    parser.add_argument("--eval_batches", type=int, default=4, help="Profiled evaluation batches of 1024 users.")
    parser.add_argument("--top", type=int, default=25, help="Operators listed per phase.")
    parser.add_argument("--trace", action="store_true", help="Also write Chrome traces.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where the summary goes.")
    return parser.parse_args(argv)


def build_trainer(args, output_dir: str):
    from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
    from modeling_missrec.data import ItemCatalog
    from modeling_missrec.trainer import MissrecTrainer
    from modeling_missrec.training_args import TrainingArguments

    users = args.num_users or (87_346 if args.device.startswith("cuda") else 20_000)
    splits = synthetic_log(users, args.num_items, 8.0, 0)
    splits["test"] = take_rows(splits["test"], args.eval_batches * 1024, 0)
    features = synthetic_features(args.num_items, 0)
    config = MissrecConfig(
        num_items=args.num_items, use_item_ids=True, text_feature_size=FEATURE_SIZE, image_feature_size=FEATURE_SIZE
    )
    model = MissrecForSequentialRecommendation(config)
    model.load_item_features(features, {m: np.ones(args.num_items, bool) for m in features})
    random_interest_state(model, 0)
    training = TrainingArguments(
        output_dir=output_dir,
        train_batch_size=args.batch_size,
        mixed_precision=args.precision,
        report_to="none",
        disable_tqdm=True,
        max_steps_per_epoch=args.warmup_steps,
    )
    return MissrecTrainer(model, splits, ItemCatalog([str(i) for i in range(args.num_items)]), training)


def summarise(prof, steps: int, wall: float, top: int, device: str) -> str:
    averages = prof.key_averages()
    sort_by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = averages.table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
    counts = {e.key: e.count for e in averages if e.key in SYNC_EVENTS or "DtoH" in e.key or "Memcpy" in e.key}
    sync_lines = [f"- `{name}`: {count / steps:.1f} per step" for name, count in sorted(counts.items())]
    return "\n".join(
        [
            f"wall {wall:.3f} s for {steps} steps: {1e3 * wall / steps:.1f} ms per step",
            "",
            "Synchronisations and copies:",
            *(sync_lines or ["- none recorded"]),
            "",
            "```",
            table,
            "```",
        ]
    )


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    header = run_header(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    name = f"profile_{args.device}_{args.precision}"
    sections = [f"# Profile of a training step and an evaluation ({args.device}, precision {args.precision})", ""]
    sections += [header_markdown(header), ""]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(args, output_dir)
        trainer.train_epoch(0)
        trainer.args.max_steps_per_epoch = args.steps
        synchronize(args.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            trainer.train_epoch(1)
            synchronize(args.device)
            wall = time.perf_counter() - start
        sections += [
            f"## Training ({args.steps} steps of {args.batch_size})",
            "",
            summarise(prof, args.steps, wall, args.top, args.device),
            "",
        ]
        if args.trace:
            prof.export_chrome_trace(str(args.output_dir / f"{name}_train.json"))
        trainer._evaluate(trainer.test_loader, "warm-up")
        synchronize(args.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            trainer._evaluate(trainer.test_loader, "test")
            synchronize(args.device)
            wall = time.perf_counter() - start
        sections += [f"## Evaluation ({args.eval_batches} batches of 1024 users, {args.num_items} items)", ""]
        sections += [summarise(prof, args.eval_batches, wall, args.top, args.device), ""]
    report = "\n".join(sections)
    print(report)
    write_text_atomically(args.output_dir / f"{name}.md", report)
    return report


if __name__ == "__main__":
    main()
