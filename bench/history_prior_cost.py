#!/usr/bin/env python
"""What the history prior (`config.history_prior`) costs: training steps and evaluation, with and without it.

    python bench/history_prior_cost.py                      # Scientific-sized catalogue (4,385 items)
    python bench/history_prior_cost.py --num_items 100000 --steps 5

Two models of the same configuration (transductive, text 384 + image 512, hidden 300), one with the prior, timed
in alternation in one process with the same threads, so that a change of the machine's load falls on both. A
training step is forward with labels (full softmax), backward, Adam step; an evaluation pass scores the whole
catalogue for one batch in blocks of 8,192 (`score_items`, as the evaluator). Histories: lengths drawn from 1
to `--max_length`, right-padded to the batch's longest. Writes `<output_dir>/history_prior_cost.{json,md}`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from help_format import HelpFormatter
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--num_items", type=int, default=4385, help="Catalogue size (4385 = Scientific).")
    parser.add_argument("--batch_size", type=int, default=512, help="Histories per step.")
    parser.add_argument("--max_length", type=int, default=10, help="Longest history drawn.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per model (alternating).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per model first.")
    parser.add_argument("--num_threads", type=int, default=2, help="Torch threads.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    return parser.parse_args(argv)


def build(num_items: int, prior: bool) -> MissrecForSequentialRecommendation:
    torch.manual_seed(0)
    config = MissrecConfig(num_items=num_items, text_feature_size=384, image_feature_size=512, history_prior=prior)
    model = MissrecForSequentialRecommendation(config)
    model.load_item_features({"text": torch.randn(num_items, 384), "image": torch.randn(num_items, 512)})
    model.refresh_interests(seed=0)
    if prior:
        model.set_item_popularity(torch.randint(0, 30, (num_items + 1,)))
    return model


def batch(args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(1, args.max_length + 1, (args.batch_size,), generator=generator)
    ids = torch.randint(1, args.num_items + 1, (args.batch_size, int(lengths.max())), generator=generator)
    ids = ids * (torch.arange(ids.shape[1]) < lengths.unsqueeze(1))
    return ids, torch.randint(1, args.num_items + 1, (args.batch_size,), generator=generator)


def train_step(model, optimizer, ids, labels) -> None:
    model.train()
    model(ids, labels=labels, check_inputs=False).loss.backward()  # as the trainer: no per-step host sync
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluation_pass(model, ids) -> None:
    model.eval()
    sequence = model.encode(ids, check_inputs=False).sequence_embedding
    items = model.item_tokens()
    for start in range(1, model.config.num_items + 1, 8192):
        model.score_items(sequence, items, start, min(start + 8192, model.config.num_items + 1), ids)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    models = {name: build(args.num_items, name == "prior") for name in ("plain", "prior")}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    times = {(name, what): [] for name in models for what in ("train", "eval")}
    for step in range(args.warmup + args.steps):
        ids, labels = batch(args, generator)
        for name, model in models.items():
            started = time.perf_counter()
            train_step(model, optimizers[name], ids, labels)
            middle = time.perf_counter()
            evaluation_pass(model, ids)
            if step >= args.warmup:
                times[(name, "train")].append(middle - started)
                times[(name, "eval")].append(time.perf_counter() - middle)
    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    rows = [
        [what, f"{median[('plain', what)]:.1f}", f"{median[('prior', what)]:.1f}",
         f"{median[('prior', what)] / median[('plain', what)]:.2f}x"]
        for what in ("train", "eval")
    ]  # fmt: skip
    header = run_header()
    table = markdown_table(["ms (median)", "without prior", "with prior", "ratio"], rows)
    text = (
        f"# History prior cost ({args.num_items:,} items, batch {args.batch_size}, histories 1-{args.max_length})\n\n"
        f"{header_markdown(header)}\n\n{table}\n"
    )
    print(text)
    payload = {"meta": {**header, **vars(args), "output_dir": str(args.output_dir)}, "median_ms": {
        f"{name}/{what}": value for (name, what), value in median.items()}}  # fmt: skip
    write_json_atomically(args.output_dir / "history_prior_cost.json", payload)
    write_text_atomically(args.output_dir / "history_prior_cost.md", text)


if __name__ == "__main__":
    sys.exit(main())
