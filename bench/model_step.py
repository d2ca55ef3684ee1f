#!/usr/bin/env python
"""Training-step throughput of the reference MISSRec configuration, and the cost of its k-means.

    python bench/model_step.py                                    # full run (the 1M-token k-means takes long)
    python bench/model_step.py --kmeans_sizes 100000              # without the 1M case
    python bench/model_step.py --steps 2 --warmup 1 --batch_size 64 --kmeans_sizes 5000 --output_dir /tmp/b

Model: `MissrecForSequentialRecommendation` with the `MissrecConfig` defaults (hidden 300, text and image
features of 512), transductive (item ID table), num_items 4385 (the Scientific catalogue) with random features,
interests refreshed once before timing. One step = forward with `labels` (full-softmax loss over the whole
catalogue), backward, Adam step, `zero_grad`, in train mode, as `MissrecTrainer.train_epoch` does it.

Scenarios:
  fixed50       every history has 50 items (the longest allowed);
  real_grouped  history lengths drawn from the train split of data/scientific_mm (mean 3.4: the rows are every
                prefix of each user's history; --length_split test gives whole histories), batched by the
                trainer's `LengthGroupedBatchSampler` (group_factor 50) and padded by `HistoryDataset` to each
                batch's own longest history, as in training;
  real_pool4    the same lengths sorted only within pools of 4 batches (`length_group_batches=4`), so that
                users and lengths mix in a batch;
  real_random   the same lengths in plain random batches (group_factor 1), so the gain of grouping shows;
  real_random_bucketed  those random batches with `bucket_by_length=True`: each batch computed in groups of
                similar length (the same values up to rounding), so that random batches cost their real positions.

k-means: `modeling_missrec.interests.kmeans` with each `--kmeans_init` seeding (on a subsample of 32 K points; at
most 10 Lloyd iterations, tolerance 1e-4; k-means++ is skipped above 200k points on the CPU, where its K
sequential passes take hours) on Gaussian random points `[n, hidden]` with K = ceil(ratio x n); the time is
split into seeding / assignments / centroid updates by wrapping the module's internal functions (timings only,
the computation is unchanged). Then one Lloyd iteration from the same seeds (`max_iterations=1` with
`initial_centroids`: assignment, update, final assignment). Random points have no cluster structure, so the
full run usually takes all 10 iterations (worst case for the iteration count).

Results: a table on stdout and `<output_dir>/model_step.json` and `.md`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from help_format import HelpFormatter
from locations import REPO_ROOT
from measurement import peak_rss_mib, synchronize
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec import interests as interests_module
from modeling_missrec.data import HistoryDataset, LengthGroupedBatchSampler, read_index_file, read_inter_file

SCENARIOS = ("fixed50", "real_grouped", "real_pool4", "real_random", "real_random_bucketed")
GROUP_FACTORS = {"real_grouped": 50, "real_pool4": 4}  # batches per length-sorted pool; others random
LENGTHS_DATA_DIR = REPO_ROOT / "data" / "scientific_mm"
LENGTHS_DATASET = "Scientific"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--batch_size", type=int, default=512, help="Histories per training step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps per scenario.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed training steps before the timed ones.")
    parser.add_argument("--num_items", type=int, default=4385, help="Catalogue size (4385 = Scientific).")
    parser.add_argument(
        "--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS, help="Training-step scenarios to run."
    )
    parser.add_argument(
        "--length_split",
        default="train",
        choices=("train", "valid", "test"),
        help="Split of data/scientific_mm whose history lengths the real_* scenarios sample. The train split "
        "(what training sees: every prefix of a user's history) has mean length 3.4; test has the longest.",
    )
    parser.add_argument(
        "--kmeans_sizes",
        nargs="*",
        type=int,
        default=[100000, 1000000],
        help="Numbers of points (tokens) of the k-means timings; give none to skip k-means. "
        "1000000 (K = 20000) takes a long time on a small CPU.",
    )
    parser.add_argument(
        "--kmeans_init",
        nargs="+",
        default=["k-means++", "batched-k-means++"],
        choices=("k-means++", "batched-k-means++", "random"),
        help="Seedings timed at every size (batched-k-means++ costs about one Lloyd pass: the one for 1M points).",
    )
    parser.add_argument(
        "--kmeans_ratio", type=float, default=0.02, help="K = ceil(ratio x points) (0.02 = the pre-training ratio)."
    )
    parser.add_argument(
        "--kmeans_dim", type=int, default=None, help="Width of the k-means points; None = the model's hidden size."
    )
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model, data and k-means.")
    parser.add_argument(
        "--device", default="cpu", help="Torch device to run on (cpu, cuda, cuda:1 ...); CUDA work is synchronised."
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch.set_num_threads before running (default: torch's). On a CPU shared with other jobs, more "
        "threads than free cores makes every op wait at thread barriers (10x slower steps were seen on 2 cores).",
    )
    parser.add_argument(
        "--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where model_step.json and .md are written."
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "num_items"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if any(n < 1 for n in args.kmeans_sizes):
        parser.error("--kmeans_sizes must be positive")
    if not 0 < args.kmeans_ratio <= 1:
        parser.error("--kmeans_ratio must be in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    return args


# ---------------------------------------------------------------------------------------------- training step
def build_model(args, device: torch.device, **config_fields) -> tuple[MissrecForSequentialRecommendation, dict]:
    """The reference configuration (with `config_fields` changed) over a random catalogue, interests refreshed
    once."""
    torch.manual_seed(args.seed)
    config = MissrecConfig(num_items=args.num_items, use_item_ids=True, **config_fields)
    model = MissrecForSequentialRecommendation(config)
    generator = torch.Generator().manual_seed(args.seed)
    features = {m: torch.randn(args.num_items, config.feature_size(m), generator=generator) for m in config.modalities}
    model.load_item_features(features)
    model.to(device)
    started = time.perf_counter()
    k = model.refresh_interests(seed=args.seed)
    synchronize(device)
    refresh_seconds = time.perf_counter() - started
    model.train()
    info = {
        "hidden_size": config.hidden_size,
        "modalities": list(config.modalities),
        "feature_sizes": {m: config.feature_size(m) for m in config.modalities},
        "num_items": config.num_items,
        "use_item_ids": config.use_item_ids,
        "max_seq_length": config.max_seq_length,
        "interest_ratio": config.interest_ratio,
        "num_interests": k,
        "refresh_interests_seconds": refresh_seconds,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model, info


def lengths_file(split: str) -> Path:
    return LENGTHS_DATA_DIR / f"{LENGTHS_DATASET}.{split}.inter"


def real_lengths(split: str) -> np.ndarray:
    """History lengths of a split shipped in the repository (read directly: no cache is written)."""
    num_items = len(read_index_file(LENGTHS_DATA_DIR / f"{LENGTHS_DATASET}.item2index"))
    return np.diff(read_inter_file(lengths_file(split), num_items)["offsets"])


def make_batches(
    scenario: str, args, lengths_pool: np.ndarray, max_len: int, pad_to_multiple_of: int = 1
) -> list[dict[str, torch.Tensor]]:
    """`warmup + steps` batches built by the trainer's own sampler and `HistoryDataset` collation."""
    count = args.warmup + args.steps
    rows = count * args.batch_size
    rng = np.random.default_rng(args.seed)
    if scenario == "fixed50":
        lengths = np.full(rows, max_len, dtype=np.int64)
    else:
        lengths = rng.choice(lengths_pool, size=rows, replace=True).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    split = {
        "items": rng.integers(1, args.num_items + 1, size=int(offsets[-1]), dtype=np.int64),
        "offsets": offsets,
        "user": np.arange(rows, dtype=np.int64),
        "target": rng.integers(1, args.num_items + 1, size=rows, dtype=np.int64),
    }
    dataset = HistoryDataset(split, max_len, pad_to_multiple_of)
    group_factor = GROUP_FACTORS.get(scenario, 1)
    sampler = LengthGroupedBatchSampler(
        dataset.lengths, args.batch_size, shuffle=True, seed=args.seed, group_factor=group_factor
    )
    return [dataset.__getitems__(indices) for indices in sampler]


def time_training(model, batches, args, device: torch.device) -> dict:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    step_seconds, widths, real_tokens, padded_tokens, samples = [], [], 0, 0, 0
    losses = []
    for index, batch in enumerate(batches):
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        synchronize(device)
        started = time.perf_counter()
        # check_inputs=False as MissrecTrainer: no host sync per step for input validation
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, check_inputs=False)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        elapsed = time.perf_counter() - started
        if index < args.warmup:
            continue
        step_seconds.append(elapsed)
        widths.append(int(input_ids.shape[1]))
        real_tokens += int(batch["attention_mask"].sum())
        padded_tokens += batch["input_ids"].numel()
        samples += int(input_ids.shape[0])
        losses.append(float(output.loss.detach()))
    total = sum(step_seconds)
    return {
        "timed_steps": len(step_seconds),
        "samples": samples,
        "samples_per_second": samples / total,
        "ms_per_step_mean": 1000 * total / len(step_seconds),
        "ms_per_step_median": 1000 * statistics.median(step_seconds),
        "ms_per_step_min": 1000 * min(step_seconds),
        "ms_per_step_max": 1000 * max(step_seconds),
        "mean_batch_width": statistics.fmean(widths),
        "mean_history_length": real_tokens / samples,
        "padding_efficiency": real_tokens / padded_tokens,
        "final_loss": losses[-1],
    }


# ---------------------------------------------------------------------------------------------------- k-means
class KMeansProbe:
    """Times the internal stages of `interests.kmeans` by wrapping the module's functions it looks up at call
    time (`_kmeans_init`, `_assign`, `_update_centroids`); keeps the seeds so a Lloyd step can restart from them."""

    STAGES = {"_kmeans_init": "init", "_assign": "assign", "_update_centroids": "update"}

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.seconds = {stage: 0.0 for stage in self.STAGES.values()}
        self.calls = {stage: 0 for stage in self.STAGES.values()}
        self.initial_centroids = None

    @contextmanager
    def installed(self):
        originals = {name: getattr(interests_module, name) for name in self.STAGES}
        for name, stage in self.STAGES.items():
            setattr(interests_module, name, self._wrap(originals[name], stage))
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(interests_module, name, function)

    def _wrap(self, function, stage: str):
        def timed(*args, **kwargs):
            synchronize(self.device)
            started = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - started
            self.calls[stage] += 1
            if stage == "init":
                self.initial_centroids = result
            return result

        return timed

    def summary(self) -> dict:
        return {f"{stage}_seconds": self.seconds[stage] for stage in self.seconds} | {
            f"{stage}_calls": self.calls[stage] for stage in self.calls
        }


def time_kmeans(n: int, args, dim: int, device: torch.device, init: str) -> dict:
    k = interests_module.num_interests(n, args.kmeans_ratio)
    generator = torch.Generator().manual_seed(args.seed)
    points = torch.randn(n, dim, generator=generator).to(device)
    probe = KMeansProbe(device)
    with probe.installed():
        synchronize(device)
        started = time.perf_counter()
        result = interests_module.kmeans(points, k, seed=args.seed, init=init)
        synchronize(device)
        full_seconds = time.perf_counter() - started
        full = {"seconds": full_seconds, "num_iterations": result.num_iterations, **probe.summary()}
        seeds = probe.initial_centroids
        probe.reset()
        synchronize(device)
        started = time.perf_counter()
        interests_module.kmeans(points, k, max_iterations=1, initial_centroids=seeds, seed=args.seed)
        synchronize(device)
        lloyd_seconds = time.perf_counter() - started
        lloyd = {"seconds": lloyd_seconds, **probe.summary()}
    assign = lloyd["assign_seconds"] / max(lloyd["assign_calls"], 1)
    return {
        "points": n,
        "dim": dim,
        "num_clusters": k,
        "init": init,
        "init_sample_size": min(n, k * getattr(interests_module, "_DEFAULT_INIT_POINTS_PER_CLUSTER", 32)),
        "full": full,
        "one_lloyd_iteration": lloyd,
        "seconds_per_assignment": assign,
        "seconds_per_iteration": assign + lloyd["update_seconds"] / max(lloyd["update_calls"], 1),
    }


# ------------------------------------------------------------------------------------------------------ output
def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render_markdown(result: dict) -> str:
    model, settings = result["model"], result["settings"]
    lines = [
        "# MISSRec training-step throughput and k-means cost",
        "",
        header_markdown(result["meta"]).rstrip(),
        f"- device: {settings['device']}, peak RSS {result['peak_rss_mib']:.0f} MiB",
        f"- model: reference MissrecConfig (hidden {model['hidden_size']}, modalities "
        f"{model['feature_sizes']}), transductive, {model['num_items']} items with random features, "
        f"{model['trainable_parameters']:,} trainable parameters; K = {model['num_interests']} interests, "
        f"refresh_interests took {format_seconds(model['refresh_interests_seconds'])}",
        f"- step = forward with labels + backward + Adam + zero_grad, train mode; batch {settings['batch_size']}, "
        f"{settings['warmup']} warm-up then {settings['steps']} timed steps",
        "",
    ]
    if result["training"]:
        lines += ["## Training step", ""]
        rows = [
            [
                name,
                f"{r['samples_per_second']:.0f}",
                f"{r['ms_per_step_mean']:.1f}",
                f"{r['ms_per_step_median']:.1f}",
                f"{r['mean_batch_width']:.1f}",
                f"{r['mean_history_length']:.2f}",
                f"{r['padding_efficiency']:.2f}",
            ]
            for name, r in result["training"].items()
        ]
        lines.append(
            markdown_table(
                [
                    "scenario",
                    "samples/s",
                    "ms/step (mean)",
                    "ms/step (median)",
                    "batch width",
                    "mean length",
                    "real/padded",
                ],
                rows,
            )
        )
    if result["kmeans"]:
        lines += [
            "## k-means (`interests.kmeans`: seeding on a subsample of 32 K points, <= 10 Lloyd iterations)",
            "",
            "Points are Gaussian random (no cluster structure). `full` is the default call; its time is split "
            "into seeding, assignments (nearest centroid for every point) and centroid updates. `1 Lloyd` = "
            "`max_iterations=1` from the same seeds (assignment, update, final assignment).",
            "",
        ]
        rows = []
        for r in result["kmeans"]:
            full, lloyd = r["full"], r["one_lloyd_iteration"]
            rows.append(
                [
                    f"{r['points']:,} x {r['dim']}",
                    f"{r['num_clusters']:,}",
                    r.get("init", "k-means++"),
                    format_seconds(full["seconds"]),
                    str(full["num_iterations"]),
                    f"{format_seconds(full['init_seconds'])} (sample {r['init_sample_size']:,})",
                    f"{format_seconds(full['assign_seconds'])} / {full['assign_calls']}",
                    f"{format_seconds(full['update_seconds'])} / {full['update_calls']}",
                    format_seconds(lloyd["seconds"]),
                    format_seconds(r["seconds_per_assignment"]),
                    format_seconds(r["seconds_per_iteration"]),
                ]
            )
        lines.append(
            markdown_table(
                [
                    "points",
                    "K",
                    "seeding",
                    "full",
                    "iterations",
                    "seeding time",
                    "assignments (total / calls)",
                    "updates (total / calls)",
                    "1 Lloyd",
                    "1 assignment",
                    "1 iteration (assign + update)",
                ],
                rows,
            )
        )
    return "\n".join(lines)


def print_summary(result: dict) -> None:
    model = result["model"]
    print(
        f"model: hidden {model['hidden_size']}, {model['num_items']} items, K={model['num_interests']}, "
        f"refresh_interests {format_seconds(model['refresh_interests_seconds'])}"
    )
    if result["training"]:
        print(f"{'scenario':<14}{'samples/s':>11}{'ms/step':>10}{'median':>10}{'width':>8}{'length':>8}{'eff':>6}")
        for name, r in result["training"].items():
            print(
                f"{name:<14}{r['samples_per_second']:>11.0f}{r['ms_per_step_mean']:>10.1f}"
                f"{r['ms_per_step_median']:>10.1f}{r['mean_batch_width']:>8.1f}{r['mean_history_length']:>8.2f}"
                f"{r['padding_efficiency']:>6.2f}"
            )
    if result["kmeans"]:
        print(
            f"{'points':>10}{'K':>8}{'seeding':>10}{'full':>11}{'iters':>6}{'seed s':>11}{'assign':>11}"
            f"{'1 Lloyd':>11}{'1 iter':>11}"
        )
        for r in result["kmeans"]:
            full = r["full"]
            print(
                f"{r['points']:>10}{r['num_clusters']:>8}{r['init'][:9]:>10}{format_seconds(full['seconds']):>11}"
                f"{full['num_iterations']:>6}{format_seconds(full['init_seconds']):>11}"
                f"{format_seconds(r['seconds_per_assignment']):>11}"
                f"{format_seconds(r['one_lloyd_iteration']['seconds']):>11}"
                f"{format_seconds(r['seconds_per_iteration']):>11}"
            )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    meta = run_header(args.device)
    model, model_info = build_model(args, device)
    result = {
        "meta": meta,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": model_info,
        "training": {},
        "kmeans": [],
    }
    print(
        f"model ready: K={model_info['num_interests']} interests, "
        f"refresh {format_seconds(model_info['refresh_interests_seconds'])}",
        flush=True,
    )

    lengths_pool = real_lengths(args.length_split) if any(s != "fixed50" for s in args.scenarios) else None
    if lengths_pool is not None:
        result["length_source"] = {
            "file": str(lengths_file(args.length_split).relative_to(REPO_ROOT)),
            "rows": int(len(lengths_pool)),
            "mean_length": float(lengths_pool.mean()),
            "mean_length_clipped": float(np.minimum(lengths_pool, model.config.max_seq_length).mean()),
            "max_length": int(lengths_pool.max()),
        }
    for scenario in args.scenarios:
        batches = make_batches(scenario, args, lengths_pool, model.config.max_seq_length)
        model.config.bucket_by_length = scenario.endswith("_bucketed")  # read at every forward
        result["training"][scenario] = time_training(model, batches, args, device)
        r = result["training"][scenario]
        print(f"{scenario}: {r['samples_per_second']:.0f} samples/s, {r['ms_per_step_mean']:.1f} ms/step", flush=True)
    del model

    dim = args.kmeans_dim or model_info["hidden_size"]
    for n in args.kmeans_sizes:
        k = interests_module.num_interests(n, args.kmeans_ratio)
        for init in args.kmeans_init:
            if init == "k-means++" and n > 200_000 and device.type == "cpu":
                print(f"k-means: {n} points: k-means++ seeding skipped on the CPU (K sequential passes)", flush=True)
                continue
            print(f"k-means: {n} points x {dim}, K={k}, {init} ...", flush=True)
            result["kmeans"].append(time_kmeans(n, args, dim, device, init))

    result["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        result["peak_cuda_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    output_dir = Path(args.output_dir)
    write_json_atomically(output_dir / "model_step.json", result)
    write_text_atomically(output_dir / "model_step.md", render_markdown(result))
    print()
    print_summary(result)
    print(f"\nwritten: {output_dir / 'model_step.json'} and {output_dir / 'model_step.md'}")
    return result


if __name__ == "__main__":
    main()
