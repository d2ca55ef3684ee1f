#!/usr/bin/env python
"""What can be ranked with no training at all? Training-free scorers beside the pre-trained model's zero-shot.

    export MISSREC_SHARED_DATA=/path/to/shared/data
    python bench/zero_shot_baselines.py --dataset scientific_full

The question behind it: the shipped backbone's zero-shot ranking (`bench/transfer.py --methods zero-shot`) is
below popularity on scientific_full. Is that because the text features carry little signal for the next item
here, or because pre-training learned less than the raw features already give? Each scorer below uses only what
zero-shot uses (the history, the items' MiniLM text rows, counts of the split's own histories) and is ranked by
the same pessimistic kernel (`ranking.streaming_ranks`, ties against the target, no items excluded):

  popularity          the item's count in the split's histories (as `bench/transfer.py`)
  last-item cosine    cosine between the last history item's text row and the candidate's
  history cosine      cosine between the mean of the history's text rows (L2-normalised) and the candidate's
  ... no repeats      the same, with the user's own history items scored lowest (a scorer's choice, not the
                      protocol's: Scientific's targets are rarely repeats, and a text row is closest to itself)
  cosine + pop        last-item cosine (no repeats) + lambda * log(1 + count), lambda chosen on valid NDCG@10

Writes `<output_dir>/zero_shot_baselines_<dataset>.{json,md}` with the run header.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from help_format import HelpFormatter
from locations import resolve_data_root
from provenance import header_markdown, run_header
from quality import METRICS
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

from modeling_missrec.data import find_dataset_name, load_atomic_dataset, read_feature_file, read_index_file
from modeling_missrec.metrics import metrics_from_ranks
from modeling_missrec.ranking import streaming_ranks

LAMBDAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data folder (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--dataset", default="scientific_full", help="A folder of the data root, or a path to one.")
    parser.add_argument("--features", default="{name}.text_minilm.npy", help="Text feature file of the folder.")
    parser.add_argument("--feature_size", type=int, default=None, help="Width of a raw float32 feature file.")
    parser.add_argument("--cache_dir", type=Path, default=None, help="Arrow cache of the parsed splits.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    return parser.parse_args(argv)


class SplitScorer:
    """The scores of one split's users over every item, built from tensors (no per-user loop)."""

    def __init__(self, histories: list[np.ndarray], features: torch.Tensor, num_items: int) -> None:
        lengths = torch.tensor([len(h) for h in histories])
        flat = torch.from_numpy(np.concatenate(histories).astype(np.int64))
        rows = torch.repeat_interleave(torch.arange(len(histories)), lengths)
        self.features = torch.nn.functional.normalize(features, dim=-1)
        self.last = flat[torch.cumsum(lengths, 0) - 1]
        mean = torch.zeros(len(histories), features.shape[1]).index_add_(0, rows, self.features[flat - 1])
        self.mean = torch.nn.functional.normalize(mean, dim=-1)
        self.seen = torch.zeros(len(histories), num_items, dtype=torch.bool)
        self.seen[rows, flat - 1] = True
        counts = np.bincount(flat.numpy(), minlength=num_items + 1)[1:]
        self.log_count = torch.from_numpy(np.log1p(counts).astype(np.float32))

    def scores(self, name: str, weight: float = 0.0) -> torch.Tensor:
        if name == "popularity":
            return self.log_count.unsqueeze(0).expand(len(self.last), -1)
        query = self.features[self.last - 1] if name.startswith("last") else self.mean
        scores = query @ self.features.T
        if name.endswith("no repeats"):
            scores = scores.masked_fill(self.seen, -2.0)  # below any cosine
        return scores + weight * self.log_count if weight else scores


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    result = streaming_ranks(lambda s, e: scores[:, s - 1 : e - 1], targets, scores.shape[1])
    metrics = metrics_from_ranks(result.ranks)
    return {k: metrics[k] for k in METRICS}


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    folder = Path(args.dataset) if Path(args.dataset).is_dir() else resolve_data_root(args.data_root) / args.dataset
    name = find_dataset_name(folder)
    num_items = len(read_index_file(folder / f"{name}.item2index"))
    path = folder / args.features.format(name=name)
    features = torch.from_numpy(read_feature_file(path, num_items, args.feature_size).copy())
    dataset = load_atomic_dataset(folder, cache_dir=args.cache_dir)
    splits = {}
    for split in ("valid", "test"):
        columns = dataset[split].with_format("numpy")[:]
        splits[split] = (SplitScorer(list(columns["history"]), features, num_items), torch.as_tensor(columns["target"]))
    names = ["popularity", "last-item cosine", "history cosine", "last-item cosine, no repeats",
             "history cosine, no repeats"]  # fmt: skip
    records = []
    for name in names:
        records.append({"scorer": name, **{s: rank_metrics(sc.scores(name), t) for s, (sc, t) in splits.items()}})
    blend = "last-item cosine, no repeats"
    valid = {w: rank_metrics(splits["valid"][0].scores(blend, w), splits["valid"][1]) for w in LAMBDAS}
    best = max(LAMBDAS, key=lambda w: valid[w]["ndcg@10"])
    test = rank_metrics(splits["test"][0].scores(blend, best), splits["test"][1])
    records.append({"scorer": f"cosine + pop (lambda {best})", "valid": valid[best], "test": test,
                    "valid_by_lambda": {str(w): valid[w]["ndcg@10"] for w in LAMBDAS}})  # fmt: skip
    header = run_header()
    header["seconds"] = round(time.perf_counter() - started, 1)
    payload = {"meta": {**header, "dataset": args.dataset, "features": args.features}, "records": records}
    rows = [[r["scorer"], *(f"{r['valid'][k]:.4f}" for k in METRICS[:2]), *(f"{r['test'][k]:.4f}" for k in METRICS)]
            for r in records]  # fmt: skip
    table = markdown_table(["scorer", "valid NDCG@10", "valid HR@10", *(f"test {k.upper()}" for k in METRICS)], rows)
    text = f"# Training-free scorers on {folder.name}\n\n{header_markdown(header)}\n\n{table}\n"
    print(text)
    out = args.output_dir
    stem = f"zero_shot_baselines_{folder.name}"
    write_json_atomically(out / f"{stem}.json", payload)
    write_text_atomically(out / f"{stem}.md", text)
    print(f"written: {out / stem}.json, .md")


if __name__ == "__main__":
    sys.exit(main())
