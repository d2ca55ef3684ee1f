#!/usr/bin/env python
"""Fine-tune MISSRec on one domain and evaluate it by full ranking.

    accelerate launch run_finetune.py                                   # the embedded demo (data/scientific_mm)
    accelerate launch run_finetune.py --config configuration/finetune/run01_scientific_id_scratch.yaml
    accelerate launch run_finetune.py --mode inductive --output_dir outputs/inductive
    accelerate launch run_finetune.py --model_name_or_path outputs/pretrain --finetune_method frozen

Settings come from the dataclasses below (see --help), a YAML file (--config, by default
configuration/finetune/default.yaml), then command-line flags, the last winning. The output directory receives
the final model (save_pretrained), metrics.json and results.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from accelerate.utils import set_seed

from modeling_missrec.data import dataset_statistics, load_atomic_dataset, load_item_catalog
from modeling_missrec.trainer import (
    DataArguments,
    MissrecTrainer,
    ModelArguments,
    TrainingArguments,
    build_model,
    configure_logging,
    parse_config_and_flags,
    results_table,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configuration" / "finetune" / "default.yaml"
logger = logging.getLogger("run_finetune")


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args, config_path = parse_config_and_flags(
        (DataArguments, ModelArguments, TrainingArguments), sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG
    )
    configure_logging(training_args.disable_tqdm)
    set_seed(training_args.seed)  # the model's initial weights follow the seed too
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
