#!/usr/bin/env python
"""Top-k serving over large catalogues: the full scan against certified per-representation lists.

    python bench/serve.py                                     # 100k and 1M items, every list kind
    python bench/serve.py --num_items 20000 --queries 50 --kinds faiss-flat faiss-hnsw    # a quick look

Catalogue: `num_items` synthetic items with normalised text and image tokens and ID tokens (hidden 300, the
model's width), drawn around `--clusters` shared centres so that a query has real neighbours (random tokens
in 300 dimensions are all nearly orthogonal, which no real catalogue is); `--image_share` of the items have
an image (36% on scientific_full). `--no_ids` drops the ID tokens (inductive). Queries are drawn like items.
The fused score is the model's (`MissrecFusionHead`, dynamic fusion with factor `--fusion_factor`, ID weight
1/3). Per catalogue size:
  exact      `streaming_topk` over every item in blocks (what `MissrecRecommender(index="exact")` does)
  <kind>     `FusedScoreRetriever` with that list kind (torch, faiss-flat: exact lists, certified; faiss-ivf,
             faiss-hnsw: approximate lists), starting at C = `--initial_candidates`
Figures (record keys in brackets): list build seconds (`build_s`) and size (`memory_mb`, 10^6 bytes),
single-query latency p50/p99 over `--queries` queries (`latency_ms_p50`, `latency_ms_p99`), batch-of-1024
latency and queries/s (`batch_ms`, `queries_per_s`), recall@k against the exact scan (`recall@10`), the share
of single queries whose answer is certified (`certified`; by construction 1 for exact lists, and for
approximate lists a certificate about the lists that were returned, not about the catalogue), the share
certified at the first C (`certified_at_first_c`) and the mean final C. Results: stdout,
`<output_dir>/serve.json` and `.md` (with the command, machine, date and commit), each size written as soon
as it is done, and `serve.png` (latency and recall against catalogue size) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from help_format import HelpFormatter
from measurement import peak_rss_mib
from provenance import header_markdown, run_header
from result_files import (
    DEFAULT_RESULTS_DIR,
    markdown_table,
    pyplot,
    save_figure_atomically,
    write_json_atomically,
    write_text_atomically,
)

from modeling_missrec import MissrecConfig
from modeling_missrec.modeling_missrec import ItemTokens, MissrecFusionHead
from modeling_missrec.ranking import streaming_topk
from modeling_missrec.retrieval import LIST_KINDS, FusedScoreRetriever

HIDDEN = 300
BATCH = 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--num_items", type=int, nargs="+", default=[100_000, 1_000_000], help="Catalogue sizes.")
    parser.add_argument("--kinds", nargs="+", default=list(LIST_KINDS), choices=LIST_KINDS, help="List kinds.")
    parser.add_argument("--queries", type=int, default=200, help="Single queries timed per case.")
    parser.add_argument("--k", type=int, default=10, help="Items per recommendation.")
    parser.add_argument("--initial_candidates", type=int, default=128, help="First C of the certified search.")
    parser.add_argument("--clusters", type=int, default=2000, help="Centres the synthetic tokens are drawn around.")
    parser.add_argument("--noise", type=float, default=0.6, help="Spread of a token around its centre.")
    parser.add_argument("--image_share", type=float, default=0.36, help="Share of items with an image.")
    parser.add_argument("--fusion_factor", type=float, default=2.0, help="Dynamic fusion factor of the head.")
    parser.add_argument("--no_ids", action="store_true", help="No ID tokens (the inductive model).")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF cells visited per query.")
    parser.add_argument("--ef_search", type=int, default=256, help="HNSW search breadth.")
    parser.add_argument("--skip_batch", action="store_true", help="Skip the batch-of-1024 timing.")
    parser.add_argument("--num_threads", type=int, default=None, help="Torch and faiss threads.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic catalogue.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    return parser.parse_args(argv)


def synthetic_catalogue(args, num_items: int) -> tuple[ItemTokens, MissrecFusionHead, torch.Tensor]:
    """Tokens for ids 0..num_items (0 = padding), the fusion head, and the cluster centres."""
    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.nn.functional.normalize(torch.randn(args.clusters, HIDDEN, generator=generator), dim=-1)
    cluster = torch.randint(args.clusters, (num_items + 1,), generator=generator)

    def around(scale: float) -> torch.Tensor:
        noise = torch.randn(num_items + 1, HIDDEN, generator=generator) * (scale / HIDDEN**0.5)
        return torch.nn.functional.normalize(centres[cluster] + noise, dim=-1)

    tokens = torch.stack([around(args.noise), around(args.noise)])
    present = torch.ones(2, num_items + 1, dtype=torch.bool)
    present[1] = torch.rand(num_items + 1, generator=generator) < args.image_share
    present[:, 0] = False
    ids = None if args.no_ids else around(args.noise * 1.5)
    config = MissrecConfig(num_items=num_items, fusion_factor_init=args.fusion_factor)
    return ItemTokens(tokens, present, ids, 0), MissrecFusionHead(config), centres


def queries_like(centres: torch.Tensor, count: int, noise: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    picked = centres[torch.randint(len(centres), (count,), generator=generator)]
    return torch.nn.functional.normalize(
        picked + torch.randn(count, HIDDEN, generator=generator) * (noise / HIDDEN**0.5), dim=-1
    )


def exact_search(items: ItemTokens, head, queries: torch.Tensor, k: int):
    num_items = items.modality_tokens.shape[1] - 1
    return streaming_topk(lambda s, e: head(queries, items.slice(s, e)), num_items, k, 65536)


def timed(function, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def latency_summary(seconds: list[float]) -> dict:
    values = np.asarray(seconds) * 1000
    return {"latency_ms_p50": float(np.percentile(values, 50)), "latency_ms_p99": float(np.percentile(values, 99))}


def list_bytes(retriever: FusedScoreRetriever) -> int:
    import faiss

    total = 0
    for listed in retriever.lists.values():
        if listed.index is None:
            total += listed.vectors.numel() * 4 + listed.ids.numel() * 8
        else:
            total += faiss.serialize_index(listed.index).nbytes
    return total


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist()))
    return hits / truth.numel()


@torch.no_grad()
def run_size(args, num_items: int) -> list[dict]:
    items, head, centres = synthetic_catalogue(args, num_items)
    singles = queries_like(centres, args.queries, args.noise, args.seed + 1)
    batch = queries_like(centres, BATCH, args.noise, args.seed + 2)
    truth_scores, truth_ids = exact_search(items, head, singles, args.k)
    records = []
    recall_name = f"recall@{args.k}"
    exact = {"num_items": num_items, "index": "exact", "build_s": 0.0, "memory_mb": 0.0}
    exact.update(latency_summary(timed(lambda: exact_search(items, head, singles[:1], args.k), min(args.queries, 20))))
    if not args.skip_batch:
        batch_seconds = timed(lambda: exact_search(items, head, batch, args.k), 1)[0]
        exact.update(batch_ms=batch_seconds * 1000, queries_per_s=BATCH / batch_seconds)
    exact.update({recall_name: 1.0, "certified": 1.0, "certified_at_first_c": None, "mean_final_c": None})
    records.append(exact)
    print(format_record(exact), flush=True)
    for kind in args.kinds:
        options = {"nprobe": args.nprobe} if kind == "faiss-ivf" else {}
        options.update({"ef_search": args.ef_search} if kind == "faiss-hnsw" else {})
        started = time.perf_counter()
        retriever = FusedScoreRetriever(items, head, kind, args.initial_candidates, **options)
        record = {"num_items": num_items, "index": kind, "build_s": time.perf_counter() - started}
        record["memory_mb"] = list_bytes(retriever) / 1e6
        per_query, results = [], []
        for row in range(args.queries):
            started = time.perf_counter()
            results.append(retriever.search(singles[row : row + 1], args.k))
            per_query.append(time.perf_counter() - started)
        record.update(latency_summary(per_query))
        found = torch.cat([r.item_ids for r in results])
        final_c = torch.cat([r.candidates for r in results])
        record[recall_name] = recall(found, truth_ids)
        record["certified"] = float(torch.cat([r.certified for r in results]).float().mean())
        record["certified_at_first_c"] = float((final_c == max(args.initial_candidates, args.k)).float().mean())
        record["mean_final_c"] = float(final_c.float().mean())
        if not args.skip_batch:
            batch_seconds = timed(lambda retriever=retriever: retriever.search(batch, args.k), 1)[0]
            record.update(batch_ms=batch_seconds * 1000, queries_per_s=BATCH / batch_seconds)
        records.append(record)
        print(format_record(record), flush=True)
        del retriever
        gc.collect()
    for record in records:
        record["peak_rss_mib"] = peak_rss_mib()
    return records


def recall_key(record: dict) -> str:
    return next(key for key in record if key.startswith("recall@"))


def format_record(r: dict) -> str:
    batch = f", batch {r['batch_ms']:.0f} ms ({r['queries_per_s']:.0f} q/s)" if "batch_ms" in r else ""
    certified = "" if r["certified_at_first_c"] is None else f", certified at first C {r['certified_at_first_c']:.2f}"
    return (
        f"{r['num_items']:>10,} {r['index']:<11} build {r['build_s']:.1f} s, {r['memory_mb']:.0f} MB, "
        f"single p50 {r['latency_ms_p50']:.2f} ms p99 {r['latency_ms_p99']:.2f} ms{batch}, "
        f"{recall_key(r)} {r[recall_key(r)]:.4f}, certified {r['certified']:.2f}{certified}"
    )


def render(records: list[dict], header: dict, args) -> str:
    lines = ["# Top-k serving: full scan against certified lists (bench/serve.py)", "", header_markdown(header)]
    lines += [
        f"Synthetic catalogue: hidden {HIDDEN}, {args.clusters} centres, noise {args.noise}, images on "
        f"{args.image_share:.0%} of the items, {'no ID tokens' if args.no_ids else 'ID tokens'}; k = {args.k}; "
        f"first C = {args.initial_candidates}; nprobe {args.nprobe}, efSearch {args.ef_search}.",
        "",
    ]
    rows = [
        [
            f"{r['num_items']:,}", r["index"], f"{r['build_s']:.1f}", f"{r['memory_mb']:.0f}",
            f"{r['latency_ms_p50']:.2f}", f"{r['latency_ms_p99']:.2f}", f"{r.get('batch_ms', float('nan')):.0f}",
            f"{r.get('queries_per_s', float('nan')):.0f}", f"{r[recall_key(r)]:.4f}", f"{r['certified']:.2f}",
            "" if r["certified_at_first_c"] is None else f"{r['certified_at_first_c']:.2f}",
            "" if r["mean_final_c"] is None else f"{r['mean_final_c']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
        ]
        for r in records
    ]  # fmt: skip
    headers = ["items", "index", "build s", "lists MB", "single p50 ms", "single p99 ms", "batch-1024 ms", "q/s",
               f"recall@{args.k}", "certified", "certified at first C", "mean final C",
               "process peak RSS so far MiB"]  # fmt: skip
    return "\n".join([*lines, markdown_table(headers, rows)]) + "\n"


def plot(records: list[dict], path: Path) -> bool:
    """Single-query p50 latency and recall against catalogue size, one line per index."""
    plt = pyplot()
    if plt is None:
        return False
    figure, (latency_axis, recall_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index in dict.fromkeys(r["index"] for r in records):
        rows = [r for r in records if r["index"] == index]
        sizes = [r["num_items"] for r in rows]
        latency_axis.loglog(sizes, [r["latency_ms_p50"] for r in rows], "o-", label=index)
        recall_axis.semilogx(sizes, [r[recall_key(r)] for r in rows], "o-", label=index)
    latency_axis.axhline(10, color="grey", linestyle=":", label="10 ms goal")
    latency_axis.set(xlabel="catalogue size (items)", ylabel="single-query latency p50 (ms)")
    recall_axis.set(xlabel="catalogue size (items)", ylabel=recall_key(records[0]) + " vs the exact scan")
    latency_axis.legend()
    recall_axis.legend()
    figure.tight_layout()
    save_figure_atomically(figure, path)
    return True


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.num_threads)
        except ImportError:
            pass
    header = run_header()
    try:
        import faiss

        header["faiss"] = faiss.__version__
    except ImportError:
        header["faiss"] = None  # the torch lists and the exact scan still run
    records: list[dict] = []
    for num_items in args.num_items:
        records += run_size(args, num_items)
        payload = {"meta": header, "settings": vars(args), "records": records}
        write_json_atomically(args.output_dir / "serve.json", payload)
        write_text_atomically(args.output_dir / "serve.md", render(records, header, args))
        plot(records, args.output_dir / "serve.png")
    print(f"written: {args.output_dir / 'serve.json'} and {args.output_dir / 'serve.md'}")


if __name__ == "__main__":
    sys.exit(main())
