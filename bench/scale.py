#!/usr/bin/env python
"""How missrec scales with the catalogue: training and full-ranking evaluation on synthetic Amazon-like data.

    python bench/scale.py                                        # 10k / 100k / 1M items, 100k users, CPU
    python bench/scale.py --num_items 10000 --train_steps 5 --eval_users 500 --kmeans   # a quick look
    python bench/scale.py --preset office --device cuda --precisions no bf16              # the GPU check

Data: a catalogue of `num_items` items with random text and image features (512 wide each, as CLIP/MiniLM
features are in the shared sets) and `num_users` users whose history lengths follow the 5-core Amazon shape
(5 + a geometric tail, mean `--mean_length`, 8 by default as in Scientific/Office) over Zipf-like item
popularity. Splits are leave-one-out as in the benchmark files: the train split holds every prefix of a
user's history but the last two items, valid and test the two longer prefixes. `--preset office` takes the
Office figures of the paper: 87,346 users, 25,986 items, 422,799 training rows.

Per catalogue size, precision and training loss (`--losses full sampled`: the full softmax over the catalogue,
or the sampled softmax with `--num_negatives` shared negatives), in a fresh process (so that peak memory
belongs to that case alone):
  train   `MissrecTrainer.train_epoch` (the real training loop: length-grouped batches of 512 padded to their
          own longest history, full-softmax loss over the whole catalogue, Adam) for `--train_steps` steps
          after `--warmup_steps` untimed ones (0 = one whole epoch); samples/s.
  eval    `evaluate_ranking` (streaming full ranking over item blocks of `--eval_block_size`) of the test
          split, or its first `--eval_users` users; users/s and the memory the evaluation adds above what
          the model and catalogue hold (sampled resident memory on CPU, allocator peak on CUDA). With
          running top-k state and blocks this must stay flat as the catalogue grows.
The interest state is random (K = min(ceil(0.5 x tokens), 20,000) interests): a step costs the same whatever
the centroids are, and clustering is measured on its own:
  kmeans  `interests.kmeans` on random points `[n, 300]` with K = ceil(0.02 x n) (the pre-training ratio),
          seeded by `--kmeans_init`, at most `--kmeans_iterations` Lloyd iterations.

Results: a table on stdout, `<output_dir>/scale.json` and `.md`, and `scale.png` (time and memory against
catalogue size) when matplotlib is installed (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from help_format import HelpFormatter
from measurement import peak_rss_mib, synchronize
from provenance import header_markdown, run_header
from result_files import (
    DEFAULT_RESULTS_DIR,
    markdown_table,
    pyplot,
    save_figure_atomically,
    write_json_atomically,
    write_text_atomically,
)

FEATURE_SIZE = 512
MAX_INTERESTS = 20_000
PRESETS = {"office": {"num_items": [25_986], "num_users": 87_346, "train_rows": 422_799}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="Take the sizes of a paper dataset.")
    parser.add_argument("--num_items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="Catalogues.")
    parser.add_argument("--num_users", type=int, default=100_000, help="Users of the synthetic log.")
    parser.add_argument("--train_rows", type=int, default=None, help="Cut the train split to this many rows.")
    parser.add_argument("--mean_length", type=float, default=8.0, help="Mean items per user (>= 6).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda.")
    parser.add_argument("--precisions", nargs="+", default=["no"], choices=("no", "bf16"), help="Autocast modes.")
    parser.add_argument(
        "--losses", nargs="+", default=["full"], choices=("full", "sampled"), help="Training losses (loss_type)."
    )
    parser.add_argument("--num_negatives", type=int, default=4096, help="Sampled negatives per step (sampled loss).")
    parser.add_argument("--batch_size", type=int, default=512, help="Training histories per step.")
    parser.add_argument("--eval_batch_size", type=int, default=1024, help="Users per evaluation batch.")
    parser.add_argument("--eval_block_size", type=int, default=8192, help="Items scored at once in evaluation.")
    parser.add_argument(
        "--eval_min_fill", type=float, default=0.7, help="TrainingArguments.eval_min_fill (0 = fixed batches)."
    )
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed training steps first.")
    parser.add_argument("--train_steps", type=int, default=20, help="Timed training steps (0 = a whole epoch).")
    parser.add_argument("--eval_users", type=int, default=5000, help="Test users ranked (0 = all of them).")
    parser.add_argument("--kmeans", type=int, nargs="*", default=[100_000, 1_000_000], help="k-means sizes (points).")
    parser.add_argument(
        "--kmeans_init",
        nargs="+",
        default=["batched-k-means++"],
        choices=("k-means++", "batched-k-means++", "random"),
        help="Seedings to time (each size runs with each).",
    )
    parser.add_argument("--kmeans_iterations", type=int, default=10, help="Lloyd iterations at most.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    parser.add_argument("--output_name", default="scale", help="Base name of the result files.")
    parser.add_argument(
        "--append",
        action="store_true",
        help="Keep the records already in the result file (a case measured again replaces its old record), e.g. "
        "to add a full-softmax case at a smaller batch where batch 512 does not fit in memory.",
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case, as JSON
    args = parser.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    if args.mean_length < 6:
        parser.error("--mean_length must be >= 6 (5-core histories plus the valid and test items)")
    return args


# ------------------------------------------------------------------------------------------ synthetic data
def synthetic_log(num_users: int, num_items: int, mean_length: float, seed: int) -> dict[str, dict]:
    """Leave-one-out splits in the CSR form of `HistoryDataset` (1-based item ids), built without row loops."""
    rng = np.random.default_rng(seed)
    lengths = 4 + rng.geometric(1.0 / (mean_length - 4.0), size=num_users)  # >= 5, mean = mean_length
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    items = (
        1 + rng.permutation(num_items)[rng.choice(num_items, size=int(lengths.sum()), p=popularity / popularity.sum())]
    )
    user_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    def prefixes(users: np.ndarray, prefix_lengths: np.ndarray) -> dict:
        offsets = np.concatenate([[0], np.cumsum(prefix_lengths)])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], prefix_lengths)
        flat = items[np.repeat(user_start[users], prefix_lengths) + within]
        return {"user": users, "items": flat, "offsets": offsets, "target": items[user_start[users] + prefix_lengths]}

    train_counts = lengths - 3  # targets at positions 1 .. L-3 (0-based)
    train_users = np.repeat(np.arange(num_users), train_counts)
    train_prefix = np.arange(len(train_users)) - np.repeat(np.cumsum(train_counts) - train_counts, train_counts) + 1
    everyone = np.arange(num_users)
    return {
        "train": prefixes(train_users, train_prefix),
        "valid": prefixes(everyone, lengths - 2),
        "test": prefixes(everyone, lengths - 1),
    }


def take_rows(split: dict, count: int | None, seed: int) -> dict:
    """A random subset of `count` rows (kept in order), or the split itself."""
    if count is None or count <= 0 or count >= len(split["target"]):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(len(split["target"]), size=count, replace=False))
    lengths = np.diff(split["offsets"])[rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    flat = split["items"][np.repeat(split["offsets"][rows], lengths) + within]
    return {"user": split["user"][rows], "items": flat, "offsets": offsets, "target": split["target"][rows]}


def synthetic_features(num_items: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {m: rng.standard_normal((num_items, FEATURE_SIZE), dtype=np.float32) for m in ("text", "image")}


def random_interest_state(model, seed: int) -> int:
    """Random centroids and interest ids, K = min(ceil(ratio x tokens), 20,000): a training step costs the same
    whatever the clusters are, and k-means over 2 x 1M tokens is timed on its own. Returns K."""
    from modeling_missrec.interests import num_interests

    config = model.config
    k = min(num_interests(len(config.modalities) * config.num_items, config.interest_ratio), MAX_INTERESTS)
    generator = torch.Generator().manual_seed(seed)
    interest_ids = torch.randint(1, k + 1, (len(config.modalities), config.num_items + 1), generator=generator)
    interest_ids[:, 0] = 0
    model.missrec.interest_tokenizer.set_state(torch.randn(k, config.hidden_size, generator=generator), interest_ids)
    config.num_interests = k
    return k


# ------------------------------------------------------------------------------------------------ memory
class ResidentMemorySampler:
    """Peak resident memory of this process above its level at start, sampled every 2 ms in a thread
    (ru_maxrss cannot be reset, so it cannot tell one phase's peak from an earlier one)."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self.baseline = self.peak = self._current()

    def _current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._current())

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._current())

    @property
    def added_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


# ------------------------------------------------------------------------------------------------- cases
def run_train_eval_case(case: dict) -> dict:
    from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
    from modeling_missrec.data import ItemCatalog, build_loader
    from modeling_missrec.trainer import MissrecTrainer
    from modeling_missrec.training_args import TrainingArguments

    device, n = case["device"], case["num_items"]
    started = time.perf_counter()
    splits = synthetic_log(case["num_users"], n, case["mean_length"], case["seed"])
    splits["train"] = take_rows(splits["train"], case["train_rows"], case["seed"])
    splits["test"] = take_rows(splits["test"], case["eval_users"], case["seed"])
    features = synthetic_features(n, case["seed"])
    catalog = ItemCatalog([str(i) for i in range(n)], features, {m: np.ones(n, bool) for m in features})
    config = MissrecConfig(
        num_items=n,
        use_item_ids=True,
        text_feature_size=FEATURE_SIZE,
        image_feature_size=FEATURE_SIZE,
        loss_type=case.get("loss", "full"),
        num_negatives=case.get("num_negatives", 4096),
    )
    model = MissrecForSequentialRecommendation(config)
    model.load_item_features(catalog.features, catalog.present)
    del features
    catalog = ItemCatalog(catalog.raw_item_ids)  # the trainer needs the ids and their count, not the features
    k = random_interest_state(model, case["seed"])
    prepared = time.perf_counter()

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            train_batch_size=case["batch_size"],
            eval_batch_size=case["eval_batch_size"],
            eval_block_size=case["eval_block_size"],
            eval_min_fill=case["eval_min_fill"],
            mixed_precision=case["precision"],
            report_to="none",
            disable_tqdm=True,
            max_steps_per_epoch=case["warmup_steps"],
        )
        trainer = MissrecTrainer(model, splits, catalog, args)
        if trainer.accelerator.device.type != torch.device(device).type:
            raise RuntimeError(f"asked for {device}, the trainer runs on {trainer.accelerator.device}")

        # Evaluation first, so that its memory is measured above the model and catalogue alone.
        # A short warm-up: the first calls pay for kernel loading, autotuning and the allocator's pools.
        warm_split = take_rows(splits["test"], 2 * case["eval_batch_size"], case["seed"])
        warm_loader = build_loader(warm_split, config.max_seq_length, case["eval_batch_size"], False, 0, 1, 0)
        trainer._evaluate(trainer.accelerator.prepare(warm_loader), "warm-up")
        synchronize(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        with ResidentMemorySampler() as resident:
            eval_start = time.perf_counter()
            metrics, _, ranks = trainer._evaluate(trainer.test_loader, "test")
            synchronize(device)
            eval_seconds = time.perf_counter() - eval_start
        eval_added = (
            (torch.cuda.max_memory_allocated() - held) / 2**20 if device.startswith("cuda") else resident.added_mib
        )

        trainer.train_epoch(0)  # warm-up steps (allocator, autotuning)
        trainer.args.max_steps_per_epoch = case["train_steps"] or None
        synchronize(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        train_start = time.perf_counter()
        loss, samples = trainer.train_epoch(1)
        synchronize(device)
        train_seconds = time.perf_counter() - train_start
    record = {
        "kind": "train_eval",
        **{key: case[key] for key in ("num_items", "num_users", "device", "precision", "batch_size")},
        "loss": case.get("loss", "full"),
        "num_negatives": case.get("num_negatives") if case.get("loss") == "sampled" else None,
        "train_rows": len(splits["train"]["target"]),
        "num_interests": k,
        "setup_seconds": prepared - started,
        "train_samples": samples,
        "train_seconds": train_seconds,
        "train_samples_per_s": samples / train_seconds,
        "train_loss": loss,
        "eval_users": int(ranks.numel()),
        "eval_seconds": eval_seconds,
        "eval_users_per_s": ranks.numel() / eval_seconds,
        "eval_added_memory_mib": eval_added,
        "test_ndcg@10": metrics["ndcg@10"],
        "peak_rss_mib": peak_rss_mib(),
    }
    if device.startswith("cuda"):
        record["train_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def run_kmeans_case(case: dict) -> dict:
    from model_step import KMeansProbe  # times the seeding inside `interests.kmeans`

    from modeling_missrec import interests

    device, n = case["device"], case["points"]
    k = interests.num_interests(n, 0.02)
    points = torch.randn(n, 300, generator=torch.Generator().manual_seed(case["seed"])).to(device)
    probe = KMeansProbe(torch.device(device))
    with probe.installed():
        synchronize(device)
        start = time.perf_counter()
        result = interests.kmeans(points, k, init=case["init"], max_iterations=case["iterations"], seed=case["seed"])
        synchronize(device)
        total = time.perf_counter() - start
    return {
        "kind": "kmeans",
        "points": n,
        "clusters": k,
        "device": device,
        "init": case["init"],
        "iterations": result.num_iterations,
        "seconds": total,
        "seed_seconds": probe.seconds["init"],
        "lloyd_seconds_per_iteration": (total - probe.seconds["init"]) / (result.num_iterations + 1),
        "seconds_per_assignment": probe.seconds["assign"] / max(probe.calls["assign"], 1),
        "inertia_per_point": result.inertia / n,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_case_in_subprocess(case: dict) -> dict:
    """One case in a fresh interpreter: its peak memory is its own, and an out-of-memory kill is recorded."""
    command = [sys.executable, __file__, "--case", json.dumps(case)]
    print(f"-> {case}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1:]
        print(done.stderr[-3000:], file=sys.stderr)
        return {**case, "error": f"exit {done.returncode}: {reason}"}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"   {record}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------ report
def case_key(record: dict) -> tuple:
    """What makes two records the same measurement (then the newer replaces the older with --append)."""
    fields = ("kind", "num_items", "device", "precision", "loss", "batch_size", "points", "init")
    return tuple(record.get(f) for f in fields)


def invocation(header: dict) -> dict:
    """The part of a run header that says which invocation measured a record."""
    return {key: header[key] for key in ("command", "commit", "date")}


def kept_records(json_path: Path) -> list[dict]:
    """The records of an earlier result file (--append), each naming the invocation that measured it (taken
    from that file's header where the record does not say it itself), since the new header replaces it."""
    if not json_path.exists():
        return []
    earlier = json.loads(json_path.read_text())
    return [{"measured": invocation(earlier["meta"]), **r} for r in earlier["records"]]


def earlier_runs(header: dict, records: list[dict]) -> list[str]:
    """Lines naming the other invocations whose records a file kept (--append)."""
    runs = {(m["command"], m["date"], m.get("commit")) for r in records if (m := r.get("measured"))}
    runs.discard((header["command"], header["date"], header.get("commit")))
    return [f"- also from `{c}` ({d}, commit {k})" for c, d, k in sorted(runs, key=lambda run: run[1])]


def sampled_speedups(train: list[dict]) -> list[str]:
    """One line per (size, device, precision) measured with both losses: sampled over full samples/s."""
    speed = {
        (r["num_items"], r["device"], r["precision"], r.get("loss", "full")): r
        for r in train
        if "train_samples_per_s" in r
    }
    lines = []
    for (n, device, precision, loss), full in speed.items():
        sampled = speed.get((n, device, precision, "sampled"))
        if loss != "full" or sampled is None:
            continue
        ratio = sampled["train_samples_per_s"] / full["train_samples_per_s"]
        batches = f"batch {sampled['batch_size']} against {full['batch_size']}"
        lines.append(f"- {n:,} items, {device}, {precision}: sampled softmax {ratio:.1f}x the full softmax's "
                     f"training samples/s ({batches})")  # fmt: skip
    return ["", *lines] if lines else []


def render(header: dict, records: list[dict]) -> str:
    lines = ["# missrec at scale: synthetic Amazon-like catalogues", "", header_markdown(header).rstrip()]
    lines += [*earlier_runs(header, records), ""]
    train = [r for r in records if r["kind"] == "train_eval"]
    if train:
        rows = [
            [
                r["num_items"],
                r.get("train_rows", ""),
                r["device"],
                r["precision"],
                r.get("loss", "full") + (f" ({r['num_negatives']})" if r.get("loss") == "sampled" else ""),
                r.get("batch_size"),
                r.get("train_samples_per_s", r.get("error")),
                r.get("eval_users_per_s"),
                r.get("eval_seconds"),
                r.get("eval_users"),
                r.get("eval_added_memory_mib"),
                r.get("peak_rss_mib"),
                r.get("train_peak_gpu_mib"),
            ]
            for r in train
        ]
        headers = [
            "items",
            "train rows",
            "device",
            "precision",
            "loss (negatives)",
            "batch",
            "train samples/s",
            "eval users/s",
            "eval s",
            "eval users",
            "eval added MiB",
            "peak RSS MiB",
            "train peak GPU MiB",
        ]
        lines += ["## Training and full-ranking evaluation", "", markdown_table(headers, rows)]
        lines += sampled_speedups(train)
    kmeans = [r for r in records if r["kind"] == "kmeans"]
    if kmeans:
        rows = [
            [
                r["points"],
                r.get("clusters"),
                r["device"],
                r["init"],
                r.get("iterations"),
                r.get("seconds", r.get("error")),
                r.get("seed_seconds"),
                r.get("lloyd_seconds_per_iteration"),
                r.get("inertia_per_point"),
            ]
            for r in kmeans
        ]
        headers = [
            "points",
            "K",
            "device",
            "init",
            "iterations",
            "total s",
            "seeding s",
            "s per Lloyd iteration",
            "inertia/point",
        ]
        lines += ["## k-means (300-d random points, K = ceil(0.02 n))", "", markdown_table(headers, rows)]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in records if r.get("kind") == "train_eval" and r["precision"] == "no" and "error" not in r]
    if len({r["num_items"] for r in rows}) < 2:
        return False
    by_loss: dict[str, list[dict]] = {}
    for r in rows:
        by_loss.setdefault(r.get("loss", "full"), []).append(r)
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for loss, lines in by_loss.items():
        time_axis.loglog(
            [r["num_items"] for r in lines],
            [1e6 / r["train_samples_per_s"] for r in lines],  # per sample: batch sizes may differ (--append)
            "o-",
            label=f"train, 1000 samples, {loss} softmax (ms)",
        )
    # Evaluation does not depend on the training loss: per size, the record that ranked the most users.
    evaluated = sorted(
        {r["num_items"]: r for r in sorted(rows, key=lambda r: r["eval_users"])}.values(), key=lambda r: r["num_items"]
    )
    sizes = [r["num_items"] for r in evaluated]
    eval_ms = [1e3 * 1000 / r["eval_users_per_s"] for r in evaluated]
    time_axis.loglog(sizes, eval_ms, "s-", label="eval, 1000 users (ms)")
    time_axis.set_xlabel("catalogue size (items)")
    time_axis.legend()
    memory_axis.semilogx(sizes, [r["eval_added_memory_mib"] for r in evaluated], "s-", label="evaluation, added (MiB)")
    for loss, lines in by_loss.items():
        memory_axis.semilogx(
            [r["num_items"] for r in lines], [r["peak_rss_mib"] for r in lines], "o-", label=f"peak RSS, {loss} (MiB)"
        )
    memory_axis.set_xlabel("catalogue size (items)")
    memory_axis.legend()
    figure.tight_layout()
    save_figure_atomically(figure, path)
    return True


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.case is not None:
        case = json.loads(args.case)
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        record = run_kmeans_case(case) if case["kind"] == "kmeans" else run_train_eval_case(case)
        print(json.dumps(record))
        return [record]
    header = run_header(args.device)
    common = {"device": args.device, "seed": args.seed}
    json_path = args.output_dir / f"{args.output_name}.json"
    kept = kept_records(json_path) if args.append else []
    records = []
    measured = invocation(header)

    def write(final: bool = False) -> None:  # after every case, so that a stop loses one case at most
        new = {case_key(r) for r in records}
        everything = [r for r in kept if case_key(r) not in new] + records
        report = render(header, everything)
        if final:
            print(report)
        write_json_atomically(json_path, {"meta": header, "records": everything})
        write_text_atomically(args.output_dir / f"{args.output_name}.md", report)
        plot(everything, args.output_dir / f"{args.output_name}.png")

    def measure(case: dict) -> None:
        records.append({**run_case_in_subprocess(case), "measured": measured})
        write()

    for n in args.num_items:
        for precision, loss in ((p, lo) for p in args.precisions for lo in args.losses):
            case = {
                "kind": "train_eval",
                **common,
                "num_items": n,
                "num_users": args.num_users,
                "precision": precision,
                "loss": loss,
                "num_negatives": args.num_negatives,
                "train_rows": args.train_rows,
                "mean_length": args.mean_length,
                "batch_size": args.batch_size,
                "eval_batch_size": args.eval_batch_size,
                "eval_min_fill": args.eval_min_fill,
                "eval_block_size": args.eval_block_size,
                "warmup_steps": args.warmup_steps,
                "train_steps": args.train_steps,
                "eval_users": args.eval_users,
            }
            measure(case)
    for points in args.kmeans:
        for init in args.kmeans_init:
            measure({"kind": "kmeans", **common, "points": points, "init": init, "iterations": args.kmeans_iterations})
    write(final=True)
    return records


if __name__ == "__main__":
    main()
