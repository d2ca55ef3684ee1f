#!/usr/bin/env python
"""Does a trained MISSRec already know what the raw text rows know? The model's scores blended with two
training-free terms, the blend weights chosen on validation, test reported once.

    export MISSREC_SHARED_DATA=/path/to/shared/data
    python bench/hybrid_scores.py --dataset scientific_full \\
        --runs bench/scratch/transfer/scientific_full-inductive-10-scratch-20{20,21,22}/scientific_full-inductive

`bench/zero_shot_baselines.py` found that on Scientific a scorer with no training (the cosine of the last history
item's MiniLM row with each candidate's, the user's own history scored lowest, plus a weight times log(1 +
popularity)) ranks better than the trained model. If the model had learned that signal, adding it back would
change nothing; if the blend gains, the model is missing it. For each saved run (one per seed) the score of
item i for a user is

    s_model(i) / sd_model + beta * s_cos(i) / sd_cos + gamma * log(1 + count(i)) / sd_pop

(sd: each term's standard deviation over the valid scores, so the weights are comparable), with (beta, gamma)
chosen on the valid split's NDCG@10 from a small grid and the test split ranked once with the chosen pair, by
the same pessimistic kernel as the evaluator (`ranking.streaming_ranks`, ties against the target). Popularity
counts come from the split's own histories, as in `bench/transfer.py`. The per-seed records, the mean and
standard deviation and the paired difference (hybrid - model) go to `<output_dir>/hybrid_scores_<dataset>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from help_format import HelpFormatter
from locations import resolve_data_root
from provenance import header_markdown, run_header
from quality import METRICS, mean_std, paired
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically
from zero_shot_baselines import rank_metrics

from modeling_missrec.data import build_loader, load_atomic_dataset, read_feature_file
from modeling_missrec.modeling_missrec import MissrecForSequentialRecommendation

BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
GAMMAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data folder (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--dataset", default="scientific_full", help="A folder of the data root (Scientific.*).")
    parser.add_argument("--features", default="Scientific.text_minilm.npy", help="Text rows of the cosine term.")
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="Saved model folders, one per seed.")
    parser.add_argument("--label", default=None, help="A name for the runs in the results (default: the folder).")
    parser.add_argument("--cache_dir", type=Path, default=None, help="Arrow cache of the parsed splits.")
    parser.add_argument("--num_threads", type=int, default=None, help="Torch threads.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    return parser.parse_args(argv)


@torch.no_grad()
def split_scores(model, split, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three `[users, items]` score terms of one split, and its targets, in the loader's order."""
    num_items = model.config.num_items
    loader = build_loader(split, model.config.max_seq_length, 512, False, 0, 1, 0)
    raw = model._catalog_raw_tokens()
    items = model.item_tokens(raw)
    parts = {"model": [], "cos": [], "targets": [], "seen": []}
    for batch in loader:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        sequence = model.encode(input_ids, mask, raw_tokens=raw).sequence_embedding
        parts["model"].append(model.score_items(sequence, items, 1, num_items + 1, input_ids, mask))
        last = input_ids.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0))[:, 0]
        seen = torch.zeros(len(input_ids), num_items + 1, dtype=torch.bool).scatter_(1, input_ids, True)[:, 1:]
        parts["cos"].append((features[last - 1] @ features.T).masked_fill(seen, -2.0))
        parts["targets"].append(batch["labels"])
        parts["seen"].append(seen)
    out = {k: torch.cat(v) for k, v in parts.items()}
    counts = out["seen"].sum(0).float()  # users whose history holds the item (histories rarely repeat)
    out["pop"] = torch.log1p(counts).unsqueeze(0)
    return out


def blend(terms: dict, scale: dict, beta: float, gamma: float) -> torch.Tensor:
    return terms["model"] / scale["model"] + beta * terms["cos"] / scale["cos"] + gamma * terms["pop"] / scale["pop"]


def one_run(run: Path, dataset, features: torch.Tensor) -> dict:
    model = MissrecForSequentialRecommendation.from_pretrained(run).eval()
    terms = {s: split_scores(model, dataset[s], features) for s in ("valid", "test")}
    valid = terms["valid"]
    scale = {k: float(valid[k].std()) for k in ("model", "cos")}
    scale["pop"] = float(valid["pop"].std())
    grid = {(b, g): rank_metrics(blend(valid, scale, b, g), valid["targets"])["ndcg@10"] for b in BETAS for g in GAMMAS}
    beta, gamma = max(grid, key=grid.get)
    test = terms["test"]
    return {
        "run": str(run),
        "model": {split: rank_metrics(terms[split]["model"], terms[split]["targets"]) for split in terms},
        "hybrid": {
            "beta": beta, "gamma": gamma,
            "valid": rank_metrics(blend(valid, scale, beta, gamma), valid["targets"]),
            "test": rank_metrics(blend(test, scale, beta, gamma), test["targets"]),
        },
        "valid_ndcg@10_grid": {f"{b},{g}": v for (b, g), v in grid.items()},
    }  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    folder = resolve_data_root(args.data_root) / args.dataset
    dataset = load_atomic_dataset(folder, cache_dir=args.cache_dir)
    runs = []
    for run in args.runs:
        config = MissrecForSequentialRecommendation.config_class.from_pretrained(run)
        rows = read_feature_file(folder / args.features, config.num_items).copy()
        features = torch.nn.functional.normalize(torch.from_numpy(rows), dim=-1)
        runs.append(one_run(run, dataset, features))
        r = runs[-1]
        model, hybrid = r["model"]["test"]["ndcg@10"], r["hybrid"]["test"]["ndcg@10"]
        print(f"{run}: test NDCG@10 model {model:.4f}, hybrid {hybrid:.4f} (beta, gamma {r['hybrid']['beta']}, "
              f"{r['hybrid']['gamma']})", flush=True)  # fmt: skip
    by_seed = {i: r for i, r in enumerate(runs)}  # one run per seed, in the order given
    summary = {name: {k: mean_std([r[name]["test"][k] for r in runs]) for k in METRICS} for name in ("model", "hybrid")}
    summary["hybrid - model"] = paired(
        {i: r["hybrid"] for i, r in by_seed.items()}, {i: r["model"] for i, r in by_seed.items()}, "test", "ndcg@10"
    )
    header = run_header()
    header["seconds"] = round(time.perf_counter() - started, 1)
    label = args.label or args.runs[0].parent.name
    payload = {"meta": {**header, "dataset": args.dataset}, "runs": runs, "summary": summary}
    path = args.output_dir / f"hybrid_scores_{args.dataset}.json"
    results = json.loads(path.read_text(encoding="utf-8"))["results"] if path.exists() else {}
    results[label] = payload
    write_json_atomically(path, {"results": results})
    text = "\n".join(render(name, record) for name, record in results.items())
    write_text_atomically(path.with_suffix(".md"), f"# Model + training-free terms on {args.dataset}\n{text}")
    print(render(label, payload))
    print(f"written: {path}, {path.with_suffix('.md')}")


def render(label: str, payload: dict) -> str:
    rows = [
        [Path(r["run"]).parent.name, f"{r['model']['valid']['ndcg@10']:.4f}", f"{r['model']['test']['ndcg@10']:.4f}",
         f"{r['hybrid']['beta']}, {r['hybrid']['gamma']}", f"{r['hybrid']['valid']['ndcg@10']:.4f}",
         f"{r['hybrid']['test']['ndcg@10']:.4f}", f"{r['hybrid']['test']['hr@10']:.4f}"]
        for r in payload["runs"]
    ]  # fmt: skip
    table = markdown_table(["run", "model valid N@10", "model test N@10", "beta, gamma", "hybrid valid N@10",
                            "hybrid test N@10", "hybrid test HR@10"], rows)  # fmt: skip
    summary = payload["summary"]
    lines = [f"{name}: test NDCG@10 {v['ndcg@10'][0]:.4f} ± {v['ndcg@10'][1]:.4f}, HR@10 {v['hr@10'][0]:.4f} ± "
             f"{v['hr@10'][1]:.4f}" for name, v in summary.items() if name != "hybrid - model"]  # fmt: skip
    diff = summary["hybrid - model"]
    if diff:
        lines.append(f"paired hybrid - model NDCG@10: {diff['mean']:+.4f} ± {diff['std']:.4f} ({diff['verdict']})")
    notes = "\n".join(f"- {line}" for line in lines)
    return f"\n## {label}\n\n{header_markdown(payload['meta'])}\n\n{table}\n\n{notes}\n"


if __name__ == "__main__":
    sys.exit(main())
