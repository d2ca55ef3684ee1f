#!/usr/bin/env python
"""Fine-tune MISSRec on one domain and evaluate it by full ranking.

    accelerate launch run_finetune.py                                   # the embedded demo (data/scientific_mm)
    accelerate launch run_finetune.py --config configuration/finetune/run01_scientific_id_scratch.yaml
    accelerate launch run_finetune.py --mode inductive --output_dir outputs/inductive

Settings come from the dataclasses below (see --help), a YAML file (--config), then command-line flags, the
last winning. The output directory receives the final model (save_pretrained), metrics.json and results.md.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from modeling_missrec.data import dataset_statistics, load_atomic_dataset, load_item_catalog
from modeling_missrec.trainer import (
    DataArguments,
    MissrecTrainer,
    ModelArguments,
    TrainingArguments,
    build_model,
    results_table,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configuration" / "finetune" / "default.yaml"
logger = logging.getLogger("run_finetune")


def parse_arguments(argv: list[str]) -> tuple[DataArguments, ModelArguments, TrainingArguments, str | None]:
    """YAML (from --config, or the embedded default when no --config is given) under command-line flags."""
    parser = HfArgumentParser((DataArguments, ModelArguments, TrainingArguments))
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML file of settings; flags given on the command line override it (default: {DEFAULT_CONFIG}).",
    )
    config_path = parser.parse_known_args(argv)[0].config
    config_path = config_path or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)
    if config_path:
        with open(config_path, encoding="utf-8") as handle:
            settings = yaml.safe_load(handle) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown settings {unknown}; see --help for the valid names")
        parser.set_defaults(**settings)
    data_args, model_args, training_args, extra = parser.parse_args_into_dataclasses(argv)
    return data_args, model_args, training_args, config_path


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args, config_path = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    data_dir = data_args.resolved_data_dir()
    dataset = load_atomic_dataset(data_dir, data_args.dataset_name, data_args.cache_dir)
    catalog = load_item_catalog(data_dir, data_args.dataset_name, data_args.feature_files(), data_args.feature_sizes())
    model = build_model(model_args, catalog)
    trainer = MissrecTrainer(model, dataset, catalog, training_args)
    if trainer.accelerator.is_main_process:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("configuration file: %s", config_path or "none (dataclass defaults)")
        logger.info("data: %s | %s", data_args, catalog.summary())
        logger.info("statistics: %s", dataset_statistics(dataset, catalog.num_items))
        logger.info("model: %s", model_args)
        logger.info("training: %s", training_args)
        logger.info("MissrecConfig: %s", model.config.to_json_string(use_diff=True).replace("\n", " "))
        logger.info("trainable parameters: %d (processes: %d)", trainable, trainer.accelerator.num_processes)
    metrics = trainer.train()
    if trainer.accelerator.is_main_process:
        print(results_table(metrics, training_args.eval_ks))
        print(f"model, metrics.json and results.md written to {training_args.output_dir}")
    return metrics


if __name__ == "__main__":
    main()
