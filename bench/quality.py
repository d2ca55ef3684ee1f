#!/usr/bin/env python
"""Controlled quality experiments: named configurations x seeds, each run a fresh process, one protocol.

    export MISSREC_SHARED_DATA=/path/to/shared/data          # or pass --data_root
    python bench/quality.py --dataset scientific_mm --modes transductive inductive \\
        --configs default reg_original batches_random kmeans_original all_original --seeds 2020 2021 2022
    python bench/quality.py --list                            # the named configurations

Every run is `bench/finetune_quality.py` (the real training path: interests refreshed every epoch, early
stopping on valid NDCG@10 with patience 10, the best epoch's model evaluated once on test by full ranking) in
its own process, so no state leaks between runs. A finished run is appended at once to
`<output_dir>/quality_runs.json` and skipped when the harness is started again; the run that was interrupted
continues from its last finished epoch (`finetune_quality.py --resume`), so a stop loses one epoch; the
summary is rewritten after every run.

Summary (`<output_dir>/quality.json` and `.md`): per (dataset, mode, configuration) the mean and standard
deviation over the seeds of the valid and test HR/NDCG@10/50, the best epochs, seconds per epoch and training
samples/s, and the paired difference against the baseline configuration over the seeds both have (per-seed
values, mean, and a 95% t interval). Per (dataset, mode) one configuration is marked as chosen, on *valid*
NDCG@10 only: the baseline, unless a configuration's paired difference against it is shown better (the 95%
interval above 0), and then the best mean of those; a mean ahead by less than the seeds move it is not a
reason to change. The test figures of the others are shown for the ablation, not for choosing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from help_format import HelpFormatter
from locations import BENCH_DIR, checkout_env, resolve_data_root
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

METRICS = ("ndcg@10", "hr@10", "ndcg@50", "hr@50")
MODES = ("transductive", "inductive")
DATASETS = ("scientific_mm", "scientific_full")

# The original's setting of each departure the review named (REVIEW_2026-12 H1-H3 and the k-means), alone
# and together, beside today's defaults. `model` goes to MissrecConfig, `training` to TrainingArguments.
ORIGINAL_REGULARISER = {"interest_reg_pooling": "original"}
ORIGINAL_BATCHES = {"group_by_length": False}
ORIGINAL_MISSING = {"mask_missing_modalities": False}
ORIGINAL_KMEANS = {"kmeans_init": "random", "kmeans_max_iterations": 1, "kmeans_warm_start": False}
CONFIGS: dict[str, dict] = {
    "default": {
        "about": "the shipped defaults (the learned history prior; with it, transductive, temperature 0.1)",
        "model": {},
        "training": {},
    },
    "temperature_0.07": {
        "about": "the paper's temperature 0.07 (transductive, the default until 2026-12-07; inductive, the default)",
        "model": {"temperature": 0.07},
        "training": {},
    },
    "no_prior": {
        "about": "no history prior: the paper's scoring (the defaults until 2026-12-02)",
        "model": {"history_prior": False},
        "training": {},
    },
    "reg_original": {
        "about": "the original's interest regulariser (pooling incl. padded slots)",
        "model": ORIGINAL_REGULARISER,
        "training": {},
    },
    "batches_random": {
        "about": "random training batches (no length grouping)",
        "model": {},
        "training": ORIGINAL_BATCHES,
    },
    "batches_pool4": {
        "about": "length-sorted within pools of 4 batches, batches shuffled",
        "model": {},
        "training": {"length_group_batches": 4},
    },
    "mask_original": {
        "about": "missing modalities as the adaptor bias (K from every token)",
        "model": ORIGINAL_MISSING,
        "training": {},
    },
    "kmeans_original": {
        "about": "one random-init Lloyd step per refresh, no warm start",
        "model": ORIGINAL_KMEANS,
        "training": {},
    },
    "all_original": {
        "about": "all four original settings together",
        "model": {**ORIGINAL_REGULARISER, **ORIGINAL_MISSING, **ORIGINAL_KMEANS},
        "training": ORIGINAL_BATCHES,
    },
    # The same computations as batches_random / all_original up to float rounding (tests/test_length_buckets.py),
    # each random batch computed in groups of similar length: the original's batches at the grouped batches' speed.
    "batches_random_bucketed": {
        "about": "random training batches, computed in length groups (bucket_by_length)",
        "model": {"bucket_by_length": True},
        "training": ORIGINAL_BATCHES,
    },
    "all_original_bucketed": {
        "about": "all four original settings together, random batches computed in length groups",
        "model": {**ORIGINAL_REGULARISER, **ORIGINAL_MISSING, **ORIGINAL_KMEANS, "bucket_by_length": True},
        "training": ORIGINAL_BATCHES,
    },
    # Levers past the paper (screened on scientific_mm, chosen on validation only).
    # (The temperature's screen ran on the defaults of before, 0.07: transductive, its runs are
    # `temperature_0.07+X`, and `temperature_0.1` is today's `default`; see `as_today`.)
    "temperature_0.05": {"about": "softmax temperature 0.05", "model": {"temperature": 0.05}, "training": {}},
    "temperature_0.1": {
        "about": "softmax temperature 0.1 (transductive, the default since 2026-12-07; inductive 0.07)",
        "model": {"temperature": 0.1},
        "training": {},
    },
    "temperature_0.15": {"about": "softmax temperature 0.15", "model": {"temperature": 0.15}, "training": {}},
    "temperature_0.2": {"about": "softmax temperature 0.2", "model": {"temperature": 0.2}, "training": {}},
    "dropout_0.3": {
        "about": "hidden and attention dropout 0.3 (0.5)",
        "model": {"hidden_dropout_prob": 0.3, "attention_dropout_prob": 0.3},
        "training": {},
    },
    "adamw_0.01": {
        "about": "AdamW with decoupled weight decay 0.01 (Adam, no decay)",
        "model": {},
        "training": {"optimizer": "adamw", "weight_decay": 0.01},
    },
    "cosine_60": {
        "about": "cosine learning-rate decay over at most 60 epochs, 5% warm-up (constant over 300)",
        "model": {},
        "training": {"lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "num_train_epochs": 60},
    },
    "interests_1.0": {
        "about": "interest ratio 1.0: K = every item token (0.5)",
        "model": {"interest_ratio": 1.0},
        "training": {},
    },
    "sampled_2048": {
        "about": "sampled softmax: the batch's targets and 2,048 uniform negatives per step, logQ-corrected "
        "(the full softmax over the catalogue)",
        "model": {"loss_type": "sampled", "num_negatives": 2048},
        "training": {},
    },
    "default_bf16": {
        "about": "the defaults with bf16 autocast in training",
        "model": {},
        "training": {"mixed_precision": "bf16"},
    },
}
# t quantiles (two-sided 95%) for n - 1 degrees of freedom, for the paired interval.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data folder (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--dataset", default="scientific_mm", choices=DATASETS, help="The dataset of this grid.")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="Modes, in run order.")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["default"],
        help="Named configurations (see --list), or several joined by '+' (no_prior+batches_random).",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022], help="Seeds (at least 3).")
    parser.add_argument("--baseline", default="default", help="Configuration the paired differences refer to.")
    parser.add_argument("--num_threads", type=int, default=None, help="Torch threads of each run.")
    parser.add_argument("--max_steps_per_epoch", type=int, default=None, help="Cut epochs short (smoke tests).")
    parser.add_argument("--num_train_epochs", type=int, default=300, help="Maximum epochs per run.")
    parser.add_argument("--work_dir", type=Path, default=BENCH_DIR / "scratch" / "quality", help="Scratch folder.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    parser.add_argument("--summarise", action="store_true", help="Rewrite the summary from the runs; train nothing.")
    parser.add_argument("--list", action="store_true", help="Print the named configurations and exit.")
    args = parser.parse_args(argv)
    unknown = [c for c in [*args.configs, args.baseline] for part in c.split("+") if part not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}, or several joined by '+'")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def overrides(settings: dict) -> str:
    return ",".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


# ------------------------------------------------------------------------------------------------------- runs
def run_key(run: dict) -> tuple:
    return (run["dataset"], run["mode"], run["config"], run["seed"], run.get("max_steps_per_epoch"))
    # (num_train_epochs is part of a configuration where it differs from the harness's 300)


def config_spec(config: str) -> dict:
    """The settings of a named configuration, or of several joined by '+' (`no_prior+batches_random`: the
    first's settings, then the next's on top: the name `as_today` gives X run on the defaults of before)."""
    spec = {"model": {}, "training": {}, "flags": []}
    for part in config.split("+"):
        named = CONFIGS[part]
        spec["model"] = {**spec["model"], **named["model"]}
        spec["training"] = {**spec["training"], **named["training"]}
        spec["flags"] = [*spec["flags"], *named.get("flags", [])]
    return spec


def run_one(args, data_root: Path, mode: str, config: str, seed: int) -> dict:
    """One run of a named configuration (see `run_finetune_quality`)."""
    spec = config_spec(config)
    run = run_finetune_quality(
        args, data_root, mode, seed, f"{config}-{seed}", spec["model"], spec["training"], spec.get("flags", [])
    )
    return {"config": config, **run}


def run_paths(work_dir: Path, dataset: str, mode: str, name: str) -> tuple[Path, Path]:
    """A run's folder and its log beside it. The log's name is the folder's plus ".log", never a suffix swap:
    names such as `temperature_0.1-2020` hold dots, and `with_suffix` would give every temperature one log."""
    run_dir = work_dir / f"{dataset}-{mode}-{name}"
    return run_dir, run_dir.parent / f"{run_dir.name}.log"


def clear_finished_run(run_dir: Path) -> bool:
    """Remove a run folder that holds a finished run (its `finetune_quality.json`) that is not recorded under
    this name: a run of the configuration the name meant before a default changed (e.g. `default` at the
    temperature 0.07). `--resume` would refuse its checkpoint (other settings) or, worse, take its result. A
    folder with only checkpoints is an interrupted run of this configuration, and is kept to be resumed."""
    if not (run_dir / "finetune_quality.json").exists():
        return False
    shutil.rmtree(run_dir)
    return True


def run_finetune_quality(
    args, data_root: Path, mode: str, seed: int, name: str, model: dict, training: dict, flags: list[str]
) -> dict:
    """One fresh `finetune_quality.py` process (its last stdout line is the run's JSON), as a run record.

    `args` gives dataset, num_train_epochs, work_dir, num_threads and max_steps_per_epoch; `model` and
    `training` are MissrecConfig / TrainingArguments overrides, `flags` more finetune_quality flags."""
    run_dir, log_path = run_paths(args.work_dir, args.dataset, mode, name)
    command = [
        sys.executable, str(BENCH_DIR / "finetune_quality.py"),
        "--data_root", str(data_root), "--datasets", args.dataset, "--modes", mode, "--seed", str(seed),
        "--num_train_epochs", str(args.num_train_epochs), "--work_dir", str(run_dir), "--output_dir", str(run_dir),
        "--print_json", "--resume", *flags,
    ]  # fmt: skip
    if model:
        command += ["--config_overrides", overrides(model)]
    if training:
        command += ["--training_overrides", overrides(training)]
    if args.num_threads:
        command += ["--num_threads", str(args.num_threads)]
    if args.max_steps_per_epoch is not None:
        command += ["--max_steps_per_epoch", str(args.max_steps_per_epoch)]
    started = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if clear_finished_run(run_dir):
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"---- {run_dir.name}: a finished run of an earlier configuration of this name removed\n")
    # The run imports the package of this checkout (a git worktree pinned to the commit being measured), not
    # whatever an editable install points at: the script's folder, not the repository, is first on sys.path.
    env = checkout_env()
    # A run killed part-way (a stopped session) continues from its last finished epoch: `--resume` above, and
    # its log goes on in the same file.
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"run {name} / {mode} failed (exit {process.returncode}); see {log_path}")
    payload = json.loads(process.stdout.strip().splitlines()[-1])
    record, history = payload["record"], payload["history"]
    train_seconds = [h["train_seconds"] for h in history]
    return {
        "dataset": args.dataset,
        "mode": mode,
        "seed": seed,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "model_overrides": model,
        "training_overrides": training,
        "flags": flags,
        "valid": {k: record["valid"][k] for k in METRICS},
        "test": {k: record["test"][k] for k in METRICS},
        "test_at_k_plus_1": {k: record["test_at_k_plus_1"][k] for k in METRICS},
        "best_epoch": record["best_epoch"],
        "epochs_run": record["epochs_run"],
        "seconds_per_epoch": record["seconds_per_epoch"],
        "train_samples_per_s": payload["train_rows"] / statistics.fmean(train_seconds) if train_seconds else None,
        "trainable_params": payload.get("trainable_parameters"),
        "temperature": payload.get("temperature"),  # the run's own, whatever its configuration's name says
        "num_interests": payload.get("num_interests"),
        "wall_seconds": time.perf_counter() - started,
        "defaults_have_prior": True,  # see `as_today`
        "default_temperature": DEFAULT_TEMPERATURE[mode],
        **{k: v for k, v in run_header().items() if k in ("commit", "date")},
        "command": " ".join(command[1:]),
    }


def as_today(run: dict) -> dict:
    """A recorded run named as today's configurations name it (the settings are unchanged, only the names):
    see `prior_as_today` and `temperature_as_today`."""
    return temperature_as_today(prior_as_today(run))


# From scratch with the history prior, the defaults' temperature by mode (`modeling_missrec.transfer`); runs
# recorded before 2026-12-07 (no `default_temperature`) had the paper's 0.07 in both.
DEFAULT_TEMPERATURE = {"transductive": 0.1, "inductive": 0.07}
# Transductive configurations of before that the temperature 0.1 turned into today's: X on 0.1 is today's X.
RENAMED_WITH_TEMPERATURE = {"temperature_0.1": "default", "temperature_0.1_dropout_0.3": "dropout_0.3"}


def temperature_as_today(run: dict) -> dict:
    """A run recorded by code whose defaults had the temperature 0.07 from scratch with the prior (no
    `default_temperature`), named as today's: transductive, X is `temperature_0.07+X` (its `default` is
    `temperature_0.07`), and X set to 0.1 is today's X (`RENAMED_WITH_TEMPERATURE`). Inductive runs (0.07 then
    and now), runs without the prior (the same) and explicit temperatures (the same setting today) keep their
    names."""
    if run.get("default_temperature") is not None:
        return run
    if DEFAULT_TEMPERATURE[run["mode"]] == 0.07:
        return {**run, "default_temperature": 0.07}
    overrides = dict(run.get("model_overrides") or {})
    name = run["config"]
    if name in RENAMED_WITH_TEMPERATURE:
        overrides.pop("temperature", None)
        name = RENAMED_WITH_TEMPERATURE[name]
    elif "temperature" not in overrides and overrides.get("history_prior") is not False:
        overrides["temperature"] = 0.07
        name = "temperature_0.07" if name == "default" else f"temperature_0.07+{name}"
    today = DEFAULT_TEMPERATURE[run["mode"]]
    return {**run, "config": name, "model_overrides": overrides, "default_temperature": today}


def prior_as_today(run: dict) -> dict:
    """A run recorded by code whose defaults had no history prior (before 2026-12-02; no `defaults_have_prior`),
    named as today's configurations name it: its `default` is `no_prior`, another configuration X without the
    prior is `no_prior+X`, and `history_prior` (the prior on top of those defaults) is today's `default`. The
    settings are unchanged, only the names: `model_overrides` says `history_prior` explicitly."""
    if run.get("defaults_have_prior"):
        return run
    overrides = dict(run.get("model_overrides") or {})
    if overrides.get("history_prior"):
        name = "default" if run["config"] == "history_prior" else run["config"]
    else:
        overrides["history_prior"] = False
        name = "no_prior" if run["config"] == "default" else f"no_prior+{run['config']}"
    return {**run, "config": name, "model_overrides": overrides, "defaults_have_prior": True}


def recorded_runs(path: Path) -> list[dict]:
    """The runs as recorded (the file is appended to, never rewritten in another form: a grid of an older
    checkout may be appending to it too)."""
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        sys.exit(f"error: {path} is not a quality_runs file ({error}); move it away to start afresh.")


def load_runs(path: Path) -> list[dict]:
    """The recorded runs, named as today's configurations (`as_today`)."""
    return [as_today(run) for run in recorded_runs(path)]


# ---------------------------------------------------------------------------------------------------- summary
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(runs: dict[int, dict], base: dict[int, dict], split: str, metric: str) -> dict | None:
    seeds = sorted(set(runs) & set(base))
    if not seeds:
        return None
    diffs = [runs[s][split][metric] - base[s][split][metric] for s in seeds]
    mean, std = mean_std(diffs)
    half = T_975.get(len(diffs) - 1, 1.96) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else "no difference shown"
    return {
        "seeds": seeds,
        "per_seed": diffs,
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half],
        "verdict": verdict,
    }


def summarise(runs: list[dict], baseline: str) -> list[dict]:
    groups: dict[tuple, dict[int, dict]] = {}
    for run in runs:
        if run.get("max_steps_per_epoch") is None:
            groups.setdefault((run["dataset"], run["mode"], run["config"]), {})[run["seed"]] = run
    order = {name: i for i, name in enumerate(CONFIGS)}
    records = []
    for (dataset, mode, config), by_seed in sorted(
        groups.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]), order.get(kv[0][2], 99))
    ):
        seeds = sorted(by_seed)
        record = {"dataset": dataset, "mode": mode, "config": config, "seeds": seeds}
        for split in ("valid", "test"):
            stats = {m: mean_std([by_seed[s][split][m] for s in seeds]) for m in METRICS}
            record[f"{split}_mean"] = {m: v[0] for m, v in stats.items()}
            record[f"{split}_std"] = {m: v[1] for m, v in stats.items()}
        record["best_epochs"] = [by_seed[s]["best_epoch"] for s in seeds]
        record["seconds_per_epoch"] = statistics.fmean(by_seed[s]["seconds_per_epoch"] for s in seeds)
        record["train_samples_per_s"] = statistics.fmean(by_seed[s]["train_samples_per_s"] for s in seeds)
        # "no_prior+X" is X on the earlier defaults: its difference is against those.
        against = config.split("+")[0] if "+" in config else baseline
        base = groups.get((dataset, mode, against))
        if base is not None and config != against:
            record["paired_vs"] = against
            record["paired"] = {
                f"{split}_ndcg@10": paired(by_seed, base, split, "ndcg@10") for split in ("valid", "test")
            }
        record["overrides"] = {
            "model": by_seed[seeds[0]]["model_overrides"],
            "training": by_seed[seeds[0]]["training_overrides"],
        }
        records.append(record)
    mark_chosen(records, baseline)
    return records


def mark_chosen(records: list[dict], baseline: str) -> None:
    """Mark per (dataset, mode) the configuration chosen on validation, among those with at least 3 seeds:
    the baseline, unless a configuration's paired valid NDCG@10 difference against it is shown better (its 95%
    interval above 0), and then the best mean valid NDCG@10 of those. A mean that is ahead by less than the
    seeds move it changes nothing (without a baseline: the best mean)."""
    for dataset, mode in {(r["dataset"], r["mode"]) for r in records}:
        candidates = [r for r in records if (r["dataset"], r["mode"]) == (dataset, mode) and len(r["seeds"]) >= 3]
        base = [r for r in candidates if r["config"] == baseline]
        better = [
            r
            for r in candidates
            if r.get("paired_vs") == baseline and (r["paired"]["valid_ndcg@10"] or {}).get("verdict") == "better"
        ]
        eligible = better or base or candidates
        if eligible:
            max(eligible, key=lambda r: r["valid_mean"]["ndcg@10"])["chosen_on_valid"] = True


def render_markdown(records: list[dict], header: dict) -> str:
    lines = [
        "# Controlled quality experiments (bench/quality.py)",
        "",
        "Latest invocation:",
        "",
        header_markdown(header).rstrip(),
        "",
        "Each cell: mean ± standard deviation over the seeds. Full ranking over every item, ties against the "
        "target, standard @K. `paired Δ` is the configuration minus the baseline on the same seeds (95% t "
        "interval); `chosen` marks, per (dataset, mode) among configurations with at least 3 seeds, the baseline "
        "unless some configuration is better on valid NDCG@10 by its paired interval, and then the best mean "
        "valid of those: configurations are chosen on validation only.",
        "",
    ]
    rows = []
    for r in records:
        pair = r.get("paired", {})

        def delta(split: str, pair=pair) -> str:
            p = pair.get(f"{split}_ndcg@10")
            return "" if p is None else f"{p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] {p['verdict']}"

        rows.append(
            [
                r["dataset"],
                r["mode"],
                r["config"] + (" (chosen)" if r.get("chosen_on_valid") else ""),
                len(r["seeds"]),
                *(f"{r['valid_mean'][m]:.4f} ± {r['valid_std'][m]:.4f}" for m in ("ndcg@10",)),
                *(f"{r['test_mean'][m]:.4f} ± {r['test_std'][m]:.4f}" for m in METRICS),
                delta("valid"),
                delta("test"),
                " ".join(map(str, r["best_epochs"])),
                f"{r['seconds_per_epoch']:.1f}",
                f"{r['train_samples_per_s']:.0f}",
            ]
        )
    headers = ["dataset", "mode", "config", "seeds", "valid NDCG@10", "test NDCG@10", "test HR@10", "test NDCG@50"]
    headers += ["test HR@50", "paired Δ valid NDCG@10", "paired Δ test NDCG@10", "best epochs", "s/epoch"]
    headers += ["train samples/s"]
    lines.append(markdown_table(headers, rows))
    lines += ["## Configurations", ""]
    for name, spec in CONFIGS.items():
        lines.append(f"- `{name}`: {spec['about']}; model {spec['model'] or '{}'}, training {spec['training'] or '{}'}")
    per_seed = [
        f"- {r['dataset']} / {r['mode']} / {r['config']}: {split} NDCG@10 Δ per seed "
        + ", ".join(f"{s}: {d:+.4f}" for s, d in zip(p["seeds"], p["per_seed"], strict=True))
        for r in records
        for split, p in ((s, r.get("paired", {}).get(f"{s}_ndcg@10")) for s in ("valid", "test"))
        if p is not None
    ]
    if per_seed:
        lines += ["", "## Paired differences per seed", "", *per_seed]
    return "\n".join(lines) + "\n"


def write_summary(args, runs: list[dict]) -> None:
    records = summarise(runs, args.baseline)
    header = run_header()
    write_json_atomically(
        args.output_dir / "quality.json", {"meta": {**header, "baseline": args.baseline}, "records": records}
    )
    write_text_atomically(args.output_dir / "quality.md", render_markdown(records, header))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.list:
        for name, spec in CONFIGS.items():
            print(f"{name:<16} {spec['about']}; model {spec['model']}, training {spec['training']}")
        return
    runs_path = args.output_dir / "quality_runs.json"
    runs = load_runs(runs_path)
    if args.summarise:
        write_summary(args, runs)
        return
    data_root = resolve_data_root(args.data_root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    grid = [(mode, seed, config) for mode in args.modes for seed in args.seeds for config in args.configs]
    done = {run_key(r) for r in runs}
    todo = [g for g in grid if (args.dataset, g[0], g[2], g[1], args.max_steps_per_epoch) not in done]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already done, {len(todo)} to run", flush=True)
    for index, (mode, seed, config) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {args.dataset} / {mode} / {config} / seed {seed} ...", flush=True)
        run = run_one(args, data_root, mode, config, seed)
        recorded = [*recorded_runs(runs_path), run]  # re-read: another invocation may have added runs meanwhile
        write_json_atomically(runs_path, {"runs": recorded})
        runs = [as_today(r) for r in recorded]
        write_summary(args, runs)
        print(
            f"    valid NDCG@10 {run['valid']['ndcg@10']:.4f}  test NDCG@10 {run['test']['ndcg@10']:.4f}  "
            f"HR@10 {run['test']['hr@10']:.4f}  best epoch {run['best_epoch']}  "
            f"{run['seconds_per_epoch']:.1f} s/epoch  {run['wall_seconds']:.0f} s",
            flush=True,
        )
    print(f"written: {runs_path}, {args.output_dir / 'quality.json'}, {args.output_dir / 'quality.md'}")


if __name__ == "__main__":
    main()
