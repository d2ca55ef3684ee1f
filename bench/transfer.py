#!/usr/bin/env python
"""Does pre-training on five Amazon domains help Scientific? Transfer methods x seeds x regimes, one protocol.

    export MISSREC_SHARED_DATA=/path/to/shared/data
    python bench/pretrain_amazon5.py                          # the pre-trained backbone (once)
    python bench/transfer.py --dataset scientific_mm --modes transductive inductive \\
        --methods scratch frozen full lora --seeds 2020 2021 2022
    python bench/transfer.py --dataset scientific_full --modes inductive --methods zero-shot popularity
    python bench/transfer.py --dataset scientific_full --regime 10% --methods scratch frozen

Every method uses the same features: MiniLM text (the pre-training's feature space; `Scientific.text_minilm.npy`)
and CLIP images (`Scientific.feat3CLS` on scientific_mm, `Scientific.image_clip.npy` on scientific_full, zero
rows where an item has none):
  scratch     no pre-training
  frozen      the paper's recipe: position table, encoder and decoder frozen; adaptors, input LayerNorm, fusion
              factor (and the ID table, transductive) trained
  full        everything trained, starting from the pre-trained weights
  lora        LoRA on the attention q/k/v/o; adaptors, LayerNorm, fusion head, ID table trained in full
  prior       inductive, text only: only the history prior's 3 weights trained on Scientific (`--finetune_method
              prior`), the backbone as shipped
  zero-shot   inductive, text only, no training on Scientific (`run_finetune.py --do_train false`)
  popularity  every test user gets the items ranked by how often they occur in the histories of the test split
              (everything known at test time), ties against the target as for the models
Regimes: `full` (every training user) and `10%` (the training rows of 10% of the users, drawn with the seed;
the same valid and test users). Each training run is `bench/finetune_quality.py` in a fresh process, through
the runner of `bench/quality.py`; a finished run is written at once to `<output_dir>/transfer_runs.json` and
skipped when started again. `<output_dir>/transfer.json` / `.md` hold the mean and standard deviation per
(dataset, mode, regime, method) and the paired difference of each pre-trained method against scratch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from finetune_quality import DATASETS
from help_format import HelpFormatter
from locations import BENCH_DIR, REPO_ROOT, resolve_data_root
from provenance import header_markdown, run_header
from quality import CONFIGS as QUALITY_CONFIGS
from quality import DEFAULT_TEMPERATURE as QUALITY_DEFAULT_TEMPERATURE
from quality import METRICS, mean_std, paired, run_finetune_quality
from quality import as_today as quality_as_today
from quality import recorded_runs as quality_recorded_runs
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

from modeling_missrec import MissrecConfig
from modeling_missrec.data import load_atomic_dataset, read_index_file
from modeling_missrec.metrics import metrics_from_ranks
from modeling_missrec.ranking import streaming_ranks
from modeling_missrec.training_args import parse_overrides

METHODS = ("scratch", "frozen", "full", "lora", "prior", "zero-shot", "popularity")
REGIMES = {"full": 1.0, "10%": 0.1}
TEXT = "Scientific.text_minilm.npy"
FOLDERS = {"scientific_mm": "scientific_mm", "scientific_full": "scientific_full"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data folder (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--dataset", default="scientific_mm", choices=list(FOLDERS), help="Downstream set.")
    parser.add_argument("--modes", nargs="+", default=["transductive", "inductive"], help="Modes, in run order.")
    parser.add_argument("--methods", nargs="+", default=["scratch", "frozen", "full", "lora"], choices=METHODS)
    parser.add_argument("--regime", default="full", choices=list(REGIMES), help="Share of the training users.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022], help="Seeds (at least 3).")
    parser.add_argument(
        "--pretrained",
        type=Path,
        default=REPO_ROOT / "pretrained" / "missrec-amazon5-minilm",
        help="The pre-trained backbone folder (the shipped one; bench/pretrain_amazon5.py writes it).",
    )
    parser.add_argument(
        "--model_overrides",
        default="",
        help="MissrecConfig fields for every method, 'name=value,...' (e.g. history_prior=true).",
    )
    parser.add_argument("--num_threads", type=int, default=None, help="Torch threads of each run.")
    parser.add_argument("--max_steps_per_epoch", type=int, default=None, help="Cut epochs short (smoke tests).")
    parser.add_argument("--num_train_epochs", type=int, default=300, help="Maximum epochs per run.")
    parser.add_argument("--work_dir", type=Path, default=BENCH_DIR / "scratch" / "transfer", help="Scratch folder.")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where results are written.")
    parser.add_argument("--summarise", action="store_true", help="Rewrite the summary from the runs; train nothing.")
    parser.add_argument(
        "--scratch_from",
        type=Path,
        default=None,
        help="A bench/quality.py runs file (quality_runs.json) whose runs of the shipped defaults at the backbone's "
        "temperature (config `temperature_0.07` for the shipped backbone; `default` at 0.1) of "
        "this dataset, the grid's modes and seeds are the scratch runs, instead of training them again: the same "
        "finetune_quality.py protocol and features. Only where quality.py's text features are transfer.py's "
        "(scientific_full) and in the full regime; each imported run keeps its commit and command.",
    )
    args = parser.parse_args(argv)
    needs_backbone = {"frozen", "full", "lora", "zero-shot"} & set(args.methods)
    if needs_backbone and not args.summarise and not (args.pretrained / "model.safetensors").exists():
        parser.error(f"--pretrained {args.pretrained} has no model.safetensors (run bench/pretrain_amazon5.py)")
    return args


def backbone_fingerprint(folder: Path) -> str:
    """Which pre-trained model a run started from: the same folder may be re-shipped (e.g. calibrated)."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:10]


# The first shipped backbone (before its calibration) had no history prior; runs from it inherited none.
BACKBONES_WITHOUT_PRIOR = ("46edab62f5",)


def as_today(run: dict) -> dict:
    """A run with the history prior it actually had written as today's harness names it, so that runs of one
    setting group together: runs recorded by code whose defaults had no prior (no `defaults_have_prior`) from
    scratch, and runs from a backbone without one, had none (`history_prior=false`); `history_prior=true`
    is today's default (from scratch, and the shipped backbone's own setting), so it is no override."""
    if run["method"] == "popularity":
        return run
    overrides = dict(run.get("model_overrides") or {})
    without = run.get("backbone") in BACKBONES_WITHOUT_PRIOR
    if "history_prior" not in overrides and (
        without or (run["method"] == "scratch" and not run.get("defaults_have_prior"))
    ):
        overrides["history_prior"] = False
    elif overrides.get("history_prior") is True and not without:
        del overrides["history_prior"]
    return {**run, "model_overrides": overrides, "defaults_have_prior": True}


def recorded_runs(path: Path) -> list[dict]:
    """The runs as recorded (appended to, never rewritten: a grid of an older checkout may append too)."""
    return json.loads(path.read_text(encoding="utf-8"))["runs"] if path.exists() else []


def run_group(run: dict) -> tuple:
    """Runs that are seeds of one configuration: scratch and popularity have no backbone."""
    backbone = "" if run["method"] in ("scratch", "popularity") else run.get("backbone", "")
    overrides = json.dumps(run.get("model_overrides") or {}, sort_keys=True)
    return (run["dataset"], run["mode"], run["regime"], run["method"], backbone, overrides)


def method_flags(args, method: str, mode: str) -> tuple[dict, list[str]]:
    """The training overrides and finetune_quality flags of a method."""
    flags = ["--text_features", TEXT, "--train_users_fraction", str(REGIMES[args.regime])]
    if method == "scratch":
        if "temperature" in parse_overrides(args.model_overrides):  # the user's, for every method alike
            return {}, flags
        return {}, [*flags, "--temperature", str(scratch_temperature(args.pretrained))]
    flags += ["--model_name_or_path", str(args.pretrained)]
    if method == "zero-shot":
        return {"do_train": False}, [*flags, "--image_features", ""]
    if method == "prior":
        return {}, [*flags, "--image_features", "", "--finetune_method", "prior"]
    return {}, [*flags, "--finetune_method", method]


def scratch_temperature(pretrained: Path) -> float:
    """The temperature scratch trains at: the backbone's (the paper's 0.07 without one), not run_finetune.py's
    default from scratch (0.1): scratch and the transferred methods then differ in their starting weights only,
    and today's scratch runs are seeds of the same setting as those recorded before 2026-12-07."""
    config = pretrained / "config.json"
    paper = MissrecConfig.temperature  # the config's default: the paper's 0.07
    return json.loads(config.read_text(encoding="utf-8")).get("temperature", paper) if config.exists() else paper


def popularity(args, data_root: Path, seed: int) -> dict:
    """Test (and valid) metrics of ranking every item by its count in the split's histories."""
    started = time.perf_counter()
    folder = data_root / FOLDERS[args.dataset]
    dataset = load_atomic_dataset(folder, cache_dir=args.work_dir / "cache")
    num_items = len(read_index_file(folder / "Scientific.item2index"))
    result = {}
    for split in ("valid", "test"):
        columns = dataset[split].with_format("numpy")[:]
        items = np.concatenate(list(columns["history"])).astype(np.int64)
        counts = torch.from_numpy(np.bincount(items, minlength=num_items + 1).astype(np.float32))
        targets = torch.as_tensor(columns["target"])
        scores = counts[1:].unsqueeze(0).expand(len(targets), -1)  # one row of counts, viewed per user
        ranks = streaming_ranks(lambda s, e, scores=scores: scores[:, s - 1 : e - 1], targets, num_items).ranks
        result[split] = {k: metrics_from_ranks(ranks)[k] for k in METRICS}
    return {
        "dataset": args.dataset, "mode": "inductive", "seed": seed, "valid": result["valid"], "test": result["test"],
        "best_epoch": None, "epochs_run": 0, "seconds_per_epoch": 0.0, "trainable_params": 0,
        "wall_seconds": time.perf_counter() - started, **{k: run_header()[k] for k in ("commit", "date")},
    }  # fmt: skip


def imported_scratch_runs(
    path: Path, dataset: str, modes: list[str], seeds: list[int], regime: str, pretrained: Path
) -> list[dict]:
    """The scratch runs of `--scratch_from`: bench/quality.py's runs of the shipped defaults at the temperature
    this script's scratch runs use (`scratch_temperature`), named as this script names a scratch run. quality.py
    trains every user with its set's own features, so only a set whose text features are this script's (MiniLM)
    and the full regime qualify."""
    if regime != "full":
        raise SystemExit(f"--scratch_from: quality.py trains on every training user, not on {regime} of them")
    if DATASETS[dataset]["text_features"] != TEXT:
        raise SystemExit(
            f"--scratch_from: quality.py trains {dataset} on {DATASETS[dataset]['text_features']}, this script on "
            f"{TEXT}: not the same runs"
        )
    # quality.py's defaults at the temperature this script's scratch runs use (`scratch_temperature`), by mode
    temperature = scratch_temperature(pretrained)
    configs = {
        mode: "default" if temperature == QUALITY_DEFAULT_TEMPERATURE[mode] else f"temperature_{temperature:g}"
        for mode in modes
    }
    for config in configs.values():
        if config not in QUALITY_CONFIGS:
            raise SystemExit(
                f"--scratch_from: the backbone's temperature is {temperature}, and bench/quality.py has no "
                f"configuration of its defaults at that temperature ({config}): run the scratch method here instead"
            )
    imported = []
    for run in map(quality_as_today, quality_recorded_runs(path)):
        if run["dataset"] != dataset or run["mode"] not in modes or run["config"] != configs[run["mode"]]:
            continue
        if run["seed"] in seeds and run.get("max_steps_per_epoch") is None:
            imported.append(
                {
                    **run,
                    # the temperature is this script's scratch setting, not an override of it
                    "model_overrides": {k: v for k, v in run["model_overrides"].items() if k != "temperature"},
                    "method": "scratch",
                    "regime": regime,
                    "pretrained": "",
                    "backbone": "",
                    "imported_from": str(path),
                }
            )
    return imported


# ---------------------------------------------------------------------------------------------------- summary
def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, dict[int, dict]] = {}
    for run in runs:
        if run.get("max_steps_per_epoch") is None:
            groups.setdefault(run_group(run), {})[run["seed"]] = run
    records = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (dataset, mode, regime, method, backbone, overrides), by_seed in sorted(
        groups.items(), key=lambda kv: (*kv[0][:3], kv[0][5], order[kv[0][3]], kv[0][4])
    ):
        seeds = sorted(by_seed)
        test = {m: mean_std([by_seed[s]["test"][m] for s in seeds]) for m in METRICS}
        valid = {m: mean_std([by_seed[s]["valid"][m] for s in seeds]) for m in METRICS}
        record = {
            "dataset": dataset, "mode": mode, "regime": regime, "method": method, "seeds": seeds,
            "backbone": backbone, "model_overrides": json.loads(overrides),
            "trainable_params": by_seed[seeds[0]].get("trainable_params"),
            "test": {m: v[0] for m, v in test.items()}, "test_std": {m: v[1] for m, v in test.items()},
            "valid": {m: v[0] for m, v in valid.items()}, "valid_std": {m: v[1] for m, v in valid.items()},
            "seconds_per_epoch": statistics.fmean(by_seed[s]["seconds_per_epoch"] for s in seeds),
            "best_epochs": [by_seed[s]["best_epoch"] for s in seeds],
            "imported_from": sorted({by_seed[s]["imported_from"] for s in seeds if by_seed[s].get("imported_from")}),
        }  # fmt: skip
        base = groups.get((dataset, mode, regime, "scratch", "", overrides))
        if base is not None and method not in ("scratch", "popularity"):
            record["paired_vs_scratch"] = {
                f"{split}_ndcg@10": paired(by_seed, base, split, "ndcg@10") for split in ("valid", "test")
            }  # noqa: E501
        records.append(record)
    return records


def render(records: list[dict], header: dict, pretrained: str) -> str:
    lines = [
        "# Transfer from the five-domain Amazon pre-training (bench/transfer.py)",
        "",
        header_markdown(header).rstrip(),
    ]
    lines += ["", f"Pre-trained backbone: `{pretrained}`. Mean ± standard deviation over the seeds; standard @K, full"]
    lines += [
        "ranking, ties against the target. Paired Δ: method minus scratch (same overrides) on the same seeds (95% t",
        "interval). backbone: the first hex digits of the pre-trained folder's config and weights (a re-shipped",
        "model, e.g. calibrated, is another backbone).",
        "",
    ]
    rows = []
    for r in records:
        pair = r.get("paired_vs_scratch", {}).get("test_ndcg@10")
        delta = "" if pair is None else f"{pair['mean']:+.4f} [{pair['ci95'][0]:+.4f}, {pair['ci95'][1]:+.4f}]"
        rows.append([
            r["dataset"], r["mode"], r["regime"], r["method"], r["backbone"],
            ",".join(f"{k}={v}" for k, v in r["model_overrides"].items()), len(r["seeds"]), r["trainable_params"],
            *(f"{r['test'][m]:.4f} ± {r['test_std'][m]:.4f}" for m in METRICS),
            f"{delta} {pair['verdict']}" if pair else "",
            " ".join(str(e) for e in r["best_epochs"]), f"{r['seconds_per_epoch']:.1f}",
        ])  # fmt: skip
    headers = ["dataset", "mode", "regime", "method", "backbone", "overrides", "seeds", "trainable", "NDCG@10", "HR@10",
               "NDCG@50", "HR@50"]  # fmt: skip
    lines.append(markdown_table([*headers, "paired Δ NDCG@10 vs scratch", "best epochs", "s/epoch"], rows))
    imported = [r for r in records if r.get("imported_from")]
    if imported:
        lines += ["", "Runs taken from bench/quality.py (`--scratch_from`; the same protocol and features):", ""]
        for r in imported:
            seeds = " ".join(map(str, r["seeds"]))
            lines.append(f"- {r['dataset']} / {r['mode']} / {r['regime']} / {r['method']}: seeds {seeds} from "
                         f"`{', '.join(r['imported_from'])}`")  # fmt: skip
    return "\n".join(lines) + "\n"  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    runs_path = args.output_dir / "transfer_runs.json"
    runs = [as_today(r) for r in recorded_runs(runs_path)]
    if not args.summarise:
        data_root = resolve_data_root(args.data_root)
        backbone = backbone_fingerprint(args.pretrained) if (args.pretrained / "config.json").exists() else ""
        overrides = parse_overrides(args.model_overrides)
        if args.scratch_from is not None:
            runs = import_scratch(args, runs_path, runs)
        done = {(*run_group(r), r["seed"], r.get("max_steps_per_epoch")) for r in runs}  # a run of another
        # backbone or other overrides is not this one
        grid = [(mode, seed, method) for mode in args.modes for seed in args.seeds for method in args.methods
                if mode == "inductive" or method not in ("prior", "zero-shot", "popularity")]  # fmt: skip

        def key(mode, seed, method):
            run = {"dataset": args.dataset, "mode": mode, "regime": args.regime, "method": method,
                   "backbone": backbone, "model_overrides": overrides if method != "popularity" else {}}  # fmt: skip
            return (*run_group(as_today({**run, "defaults_have_prior": True})), seed, args.max_steps_per_epoch)

        todo = [g for g in grid if key(*g) not in done]
        print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already done, {len(todo)} to run", flush=True)
        for index, (mode, seed, method) in enumerate(todo, 1):
            print(f"[{index}/{len(todo)}] {args.dataset} / {mode} / {args.regime} / {method} / seed {seed}", flush=True)
            if method == "popularity":
                run = popularity(args, data_root, seed)
            else:
                training, flags = method_flags(args, method, mode)
                name = f"{args.regime.rstrip('%')}-{method}-{seed}"
                # The backbone is in the name: a run folder is resumed (`--resume`) only by a run of the same one.
                name = f"{name}-{backbone[:10]}" if method != "scratch" else name
                tag = "-".join(f"{k}_{v}" for k, v in overrides.items())
                name = f"{name}-{tag}" if tag else name
                run = run_finetune_quality(args, data_root, mode, seed, name, overrides, training, flags)
            run.update(method=method, regime=args.regime, pretrained=str(args.pretrained), backbone=backbone)
            recorded = [*recorded_runs(runs_path), run]
            write_json_atomically(runs_path, {"runs": recorded})
            runs = [as_today(r) for r in recorded]
            write_summary(args, runs)
            print(f"    test NDCG@10 {run['test']['ndcg@10']:.4f}  HR@10 {run['test']['hr@10']:.4f}", flush=True)
    write_summary(args, runs)
    print(f"written: {runs_path}, {args.output_dir / 'transfer.json'}, {args.output_dir / 'transfer.md'}")


def import_scratch(args, runs_path: Path, runs: list[dict]) -> list[dict]:
    """Append the `--scratch_from` runs that are not recorded yet to the runs file; returns today's runs."""
    have = {(*run_group(r), r["seed"]) for r in runs if r.get("max_steps_per_epoch") is None}
    new = [
        r
        for r in imported_scratch_runs(
            args.scratch_from, args.dataset, args.modes, args.seeds, args.regime, args.pretrained
        )
        if (*run_group(as_today(r)), r["seed"]) not in have
    ]
    if new:
        recorded = [*recorded_runs(runs_path), *new]
        write_json_atomically(runs_path, {"runs": recorded})
        print(f"{len(new)} scratch runs taken from {args.scratch_from}", flush=True)
        return [as_today(r) for r in recorded]
    return runs


def write_summary(args, runs: list[dict]) -> None:
    records = summarise(runs)
    header = run_header()
    payload = {"meta": {**header, "pretrained": str(args.pretrained)}, "records": records}
    write_json_atomically(args.output_dir / "transfer.json", payload)
    write_text_atomically(args.output_dir / "transfer.md", render(records, header, str(args.pretrained)))


if __name__ == "__main__":
    sys.exit(main())
