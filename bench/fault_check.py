#!/usr/bin/env python
"""Kill a fine-tuning run at every point where it writes or steps, resume it, and check the end result.

    python bench/fault_check.py                        # the embedded data/scientific_mm, a tiny model
    python bench/fault_check.py --epochs 3 --steps 4 --output_dir /tmp/fault

A reference run trains uninterrupted. Then, for n = 1, 2, ...: the same run is started and "killed" at its
n-th event, an event being any `os.replace` (every checkpoint swap, best-model swap, JSON write and the final
commit go through it) or any optimiser step; the kill is an exception that nothing in the package catches.
What a user would do next is done next: resume with `--resume_from_checkpoint latest` when a checkpoint can be
found, else start over with `--overwrite_output_dir`. The resumed run must end with the same `model.safetensors`
(bit for bit) and the same valid/test metrics as the reference, and a reader of the output folder right after
the kill must load either nothing, the previous model or a whole one. The loop ends at the first n that
the run survives (every event has been a kill point). Results: `<output_dir>/fault_check.json` and `.md`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from help_format import HelpFormatter
from locations import REPO_ROOT
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from modeling_missrec.atomic import recover_directory
from modeling_missrec.data import load_atomic_dataset, load_item_catalog
from modeling_missrec.modeling_missrec import MissrecForSequentialRecommendation
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model

TINY = "hidden_size=32,num_attention_heads=2,intermediate_size=64,hidden_dropout_prob=0.1,attention_dropout_prob=0.1"


class Killed(BaseException):
    """The injected kill (a BaseException: no `except Exception` in the code under test can swallow it)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=REPO_ROOT / "data" / "scientific_mm", help="Atomic files.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs of each run.")
    parser.add_argument("--steps", type=int, default=3, help="Optimiser steps per epoch.")
    parser.add_argument("--max_kill_points", type=int, default=1000, help="Stop after this many kill points.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    return parser.parse_args(argv)


class Events:
    """Counts events; raises `Killed` at the `kill_at`-th (0: never)."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at, self.count, self.kinds = kill_at, 0, []

    def hit(self, kind: str) -> None:
        self.count += 1
        self.kinds.append(kind)
        if self.count == self.kill_at:
            raise Killed(kind)


def make_trainer(args, out: Path, **extra) -> MissrecTrainer:
    files = {"text": "Scientific.feat1CLS", "image": "Scientific.feat3CLS"}
    dataset = load_atomic_dataset(args.data_dir, cache_dir=args.work / "cache")
    catalog = load_item_catalog(args.data_dir, feature_files=files, feature_sizes={"text": 512, "image": 512})
    torch.manual_seed(0)
    model = build_model(ModelArguments(mode="transductive", config_overrides=TINY), catalog)
    training = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, max_steps_per_epoch=args.steps, train_batch_size=256,
        eval_batch_size=1024, seed=7, report_to="none", disable_tqdm=True, **extra,
    )  # fmt: skip
    return MissrecTrainer(model, dataset, catalog, training)


def run_with_events(args, out: Path, events: Events, **extra) -> dict:
    trainer = make_trainer(args, out, **extra)
    real_replace, real_step = os.replace, trainer.optimizer.step

    def replace(src, dst, *a, **k):
        events.hit(f"rename {Path(src).name} -> {Path(dst).name}")
        return real_replace(src, dst, *a, **k)

    def step(*a, **k):
        events.hit("optimiser step")
        return real_step(*a, **k)

    trainer.optimizer.step = step
    with mock.patch("os.replace", replace):
        return trainer.train()


def outcome_of_a_reader(out: Path, reference: dict) -> str:
    """What loading the output folder right after the kill gives: nothing yet, or a whole model. The reader
    works on a copy, so that the resumed run meets the folder as the kill left it (a pending journal too)."""
    copy = out.with_name(out.name + "-read")
    shutil.copytree(out, copy)
    try:
        if not (copy / "config.json").exists() and not (copy / ".commit.json").exists():
            return "no model yet"  # (with a journal, loading completes the commit first)
        try:
            weights = MissrecForSequentialRecommendation.from_pretrained(copy).state_dict()
        except Exception as error:  # noqa: BLE001 - reported as a failure of the check, not raised
            return f"UNLOADABLE ({type(error).__name__}: {error})"
        return "final model" if all(torch.equal(weights[k], reference[k]) for k in reference) else "an earlier model"
    finally:
        shutil.rmtree(copy)


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        args.work = Path(work)
        reference_dir = args.work / "reference"
        events = Events(0)
        reference_metrics = run_with_events(args, reference_dir, events)
        reference = load_file(str(reference_dir / "model.safetensors"))
        total = events.count
        print(f"reference run: {total} events ({events.kinds.count('optimiser step')} optimiser steps)", flush=True)
        trials = []
        for n in range(1, min(total, args.max_kill_points) + 1):
            out = args.work / f"kill-{n}"
            try:
                run_with_events(args, out, Events(n))
                raise RuntimeError(f"kill point {n} was never reached")
            except Killed as kill:
                kind = str(kill)
            reader = outcome_of_a_reader(out, reference)
            resumable = recover_directory(out / "checkpoint", out / ".checkpoint.tmp", "trainer_state.json")
            how = {"resume_from_checkpoint": "latest"} if resumable else {"overwrite_output_dir": True}
            metrics = make_trainer(args, out, **how).train()
            final = load_file(str(out / "model.safetensors"))
            identical = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
            same_metrics = (
                metrics["test"] == reference_metrics["test"] and metrics["valid"] == reference_metrics["valid"]
            )
            trials.append({"kill_point": n, "event": kind, "reader_after_kill": reader, "then": next(iter(how)),
                           "bit_identical": identical, "same_metrics": same_metrics,
                           "reader_ok": not reader.startswith("UNLOADABLE")})  # fmt: skip
            print(f"  {n:>3}: killed at {kind}; reader sees {reader}; {next(iter(how))}: "
                  f"{'bit-identical' if identical and same_metrics else 'DIFFERENT'}", flush=True)  # fmt: skip
            shutil.rmtree(out)
    header = run_header()
    passed = sum(t["bit_identical"] and t["same_metrics"] and t["reader_ok"] for t in trials)
    result = {"meta": header, "events_per_run": total, "kill_points": len(trials), "bit_identical": passed,
              "seconds": time.perf_counter() - started, "trials": trials}  # fmt: skip
    write_json_atomically(args.output_dir / "fault_check.json", result)
    rows = [[t["kill_point"], t["event"], t["reader_after_kill"], t["then"], t["bit_identical"]] for t in trials]
    text = "# Kill-anywhere check (bench/fault_check.py)\n\n" + header_markdown(header)
    text += f"\n{len(trials)} kill points of {total} events per run; {passed} resumed bit-identical with the same"
    text += " metrics, after a reader of the folder had loaded nothing, an earlier model or the final one.\n\n"
    text += markdown_table(["kill point", "event", "reader after the kill", "then", "bit-identical"], rows)
    write_text_atomically(args.output_dir / "fault_check.md", text)
    print(f"{len(trials)} kill points, {passed} bit-identical; written {args.output_dir / 'fault_check.json'}")
    sys.exit(0 if passed == len(trials) else 1)


if __name__ == "__main__":
    main()
