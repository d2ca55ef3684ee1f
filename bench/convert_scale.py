#!/usr/bin/env python
"""`convert` on dump-sized logs: time and peak memory of `python -m modeling_missrec.convert` on synthetic
Amazon-shaped interaction logs of millions of rows.

    python bench/convert_scale.py                                   # 5M and 50M rows, CSV, the arrow reader
    python bench/convert_scale.py --sizes 1000000 --readers arrow pandas        # against the pandas reader
    python bench/convert_scale.py --sizes 5000000 --formats csv parquet

The log (`<work_dir>/<rows>/log.<format>` + `items.csv`, written once and reused) is shaped like a raw Amazon
dump before any filtering: users' lengths are 1 + a geometric tail (mean `--mean_length`, so most users have
one or two ratings and the 5-core drops them), item popularity is Zipf-like (exponent 0.8) over `rows /
--rows_per_item` items, ids are 13-character strings as Amazon's reviewer ids and ASINs are, timestamps unix
seconds increasing within a user, and the rows shuffled in blocks (a dump is not sorted by user). Every item
has a metadata row (a title).

Each conversion runs in a fresh process (5-core, histories of 50, the CLI's defaults), so that its peak
resident memory is its own: wall seconds, peak RSS (MiB) and the output's size and counts. Results:
`<output_dir>/convert_scale.json` and `.md`, each case written as soon as it finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from help_format import HelpFormatter
from locations import BENCH_DIR, checkout_env
from measurement import peak_rss_mib
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

RESULT_NAME = "convert_scale"
USERS_PER_CHUNK = 500_000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[5_000_000, 50_000_000], help="Rows per log.")
    parser.add_argument("--formats", nargs="+", default=["csv"], choices=("csv", "parquet"), help="Log formats.")
    parser.add_argument("--readers", nargs="+", default=["arrow"], choices=("arrow", "pandas"), help="Log readers.")
    parser.add_argument("--mean_length", type=float, default=4.0, help="Mean interactions per user (raw log).")
    parser.add_argument("--rows_per_item", type=int, default=20, help="Rows per catalogue item (sets the items).")
    parser.add_argument("--seed", type=int, default=2020, help="Seed of the synthetic log.")
    parser.add_argument(
        "--work_dir", type=Path, default=BENCH_DIR / "scratch" / RESULT_NAME, help="Logs and outputs (large)."
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where the results go.")
    parser.add_argument("--child", nargs=4, metavar=("LOG", "ITEMS", "OUT", "READER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.sizes) < 1000:
        parser.error("--sizes must be at least 1000 rows")
    if args.mean_length <= 1:
        parser.error("--mean_length must be above 1")
    return args


# ------------------------------------------------------------------------------------------------ the log
def ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    """13-character ids (`prefix` + 12 base-36 digits of a scrambled number), as Amazon's look."""
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    scrambled = (numbers.astype(np.uint64) * np.uint64(2654435761) + np.uint64(97)) % np.uint64(36**12)
    text = []
    for value in scrambled.tolist():
        chars = []
        for _ in range(12):
            value, rest = divmod(value, 36)
            chars.append(digits[rest])
        text.append(prefix + "".join(chars))
    return pa.array(text, type=pa.string())


def write_log(folder: Path, rows: int, file_format: str, args) -> dict:
    """The synthetic log and its items file, unless a finished one (`.done.json`) is there."""
    marker = folder / f".log-{file_format}.done.json"
    if marker.exists():
        return json.loads(marker.read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    num_items = max(rows // args.rows_per_item, 10)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity /= popularity.sum()
    item_ids = ids("B", rng.permutation(num_items))
    started, written, users = time.perf_counter(), 0, 0
    log_path = folder / f"log.{file_format}"
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    writer = pa_csv.CSVWriter(log_path, schema) if file_format == "csv" else pq.ParquetWriter(log_path, schema)
    with writer:
        while written < rows:
            lengths = rng.geometric(1.0 / args.mean_length, size=USERS_PER_CHUNK)  # >= 1, mean mean_length
            lengths = lengths[: max(int(np.searchsorted(np.cumsum(lengths), rows - written, side="right")), 1)]
            lengths[-1] = min(lengths[-1], rows - written - int(lengths[:-1].sum()))
            n = int(lengths.sum())
            owner = np.repeat(np.arange(len(lengths)), lengths)
            first = np.cumsum(lengths) - lengths  # each user's first row
            starts = rng.integers(946_684_800, 1_538_352_000, size=len(lengths))  # 2000 to 2018
            gaps = rng.integers(0, 30 * 86_400, size=n)
            elapsed = np.cumsum(gaps)
            elapsed -= np.repeat(elapsed[first] - gaps[first], lengths)  # the running sum within each user
            order = rng.permutation(n)
            table = pa.table(
                {
                    "user_id": ids("A", users + np.arange(len(lengths))).take(pa.array(owner[order])),
                    "item_id": item_ids.take(pa.array(rng.choice(num_items, size=n, p=popularity)[order])),
                    "timestamp": pa.array((starts[owner] + elapsed)[order]),
                },
                schema=schema,
            )
            writer.write_table(table)
            written, users = written + n, users + len(lengths)
    titles = pa.table({"item_id": item_ids, "title": pa.array([f"item {i} title" for i in range(num_items)])})
    pa_csv.write_csv(titles, folder / "items.csv")
    record = {"rows": written, "users": users, "items": num_items, "seconds": time.perf_counter() - started,
              "log_bytes": log_path.stat().st_size}  # fmt: skip
    write_json_atomically(marker, record)
    return record


# ---------------------------------------------------------------------------------------------- measuring
def convert_in_child(log: Path, items: Path, out: Path, reader: str) -> dict:
    command = [sys.executable, str(Path(__file__)), "--child", str(log), str(items), str(out), reader]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=checkout_env())
    if process.returncode != 0:
        sys.exit(f"error: conversion of {log} failed:\n{process.stderr[-3000:]}")
    return {**json.loads(process.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - started}


def child(log: str, items: str, out: str, reader: str) -> None:
    """Inside the fresh process: the conversion, then its own peak memory as one JSON line."""
    from modeling_missrec.convert import main as convert_main

    started = time.perf_counter()
    stats = convert_main([log, items, "--output_dir", out, "--dataset_name", "Dump", "--text_fields", "title",
                          "--log_reader", reader, "--quiet"])  # fmt: skip
    seconds = time.perf_counter() - started
    peak_mib = peak_rss_mib()
    output_bytes = sum(p.stat().st_size for p in Path(out).iterdir())
    print(json.dumps({"convert_seconds": seconds, "peak_rss_mib": peak_mib, "output_bytes": output_bytes,
                      "users": stats.users, "items": stats.items, "interactions": stats.interactions,
                      "train_rows": stats.train_rows}))  # fmt: skip


# ------------------------------------------------------------------------------------------------- output
def render(results: dict) -> str:
    lines = ["# `convert` on dump-sized synthetic logs", "", header_markdown(results["meta"]).rstrip(), ""]
    lines += [
        "Raw Amazon-shaped logs (1 + geometric lengths, Zipf 0.8 items, 13-character ids, shuffled), 5-core, "
        "histories of 50, each conversion a fresh process. Peak RSS is the converting process's.",
        "",
    ]
    rows = [
        [
            r["rows"],
            r["format"],
            r["reader"],
            f"{r['wall_seconds']:.1f}",
            f"{r['peak_rss_mib']:.0f}",
            r["users"],
            r["items"],
            r["interactions"],
            r["train_rows"],
            f"{r['output_bytes'] / 2**30:.2f}",
            f"{r['log_seconds']:.0f}",
        ]  # fmt: skip
        for r in results["records"]
    ]
    headers = ["log rows", "format", "reader", "convert s", "peak RSS MiB", "users kept", "items kept",
               "interactions kept", "train rows", "output GiB", "writing the log s"]  # fmt: skip
    return "\n".join([*lines, markdown_table(headers, rows)])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return
    path = args.output_dir / f"{RESULT_NAME}.json"
    results = {"meta": run_header(), "records": []}
    for rows in args.sizes:
        folder = args.work_dir / str(rows)
        for file_format in args.formats:
            log = write_log(folder, rows, file_format, args)
            for reader in args.readers:
                print(f"== {rows} rows, {file_format}, {reader} reader", flush=True)
                measured = convert_in_child(folder / f"log.{file_format}", folder / "items.csv", folder / "out",
                                            reader)  # fmt: skip
                record = {"rows": log["rows"], "format": file_format, "reader": reader, "log_seconds": log["seconds"],
                          **measured}  # fmt: skip
                print(json.dumps(record), flush=True)
                results["records"].append(record)
                write_json_atomically(path, results)
                write_text_atomically(path.with_suffix(".md"), render(results))
    print(render(results))
    print(f"written: {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
