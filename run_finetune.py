#!/usr/bin/env python
"""Fine-tune MISSRec on one domain and evaluate it by full ranking.

    accelerate launch run_finetune.py                                   # the embedded demo (data/scientific_mm)
    accelerate launch run_finetune.py --config configuration/finetune/run01_scientific_id_scratch.yaml
    accelerate launch run_finetune.py --mode inductive --output_dir outputs/inductive
    accelerate launch run_finetune.py --model_name_or_path outputs/pretrain --finetune_method frozen
    accelerate launch run_finetune.py --model_name_or_path outputs/pretrain --mode inductive \
        --image_features "" --do_train false                           # zero-shot: no training on this domain

Settings come from the dataclasses below (see --help), a YAML file (--config, by default
configuration/finetune/default.yaml), then command-line flags, the last winning. The output directory receives
the final model (save_pretrained), metrics.json and results.md.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed

from modeling_missrec.cli import configure_logging, run_command
from modeling_missrec.data import dataset_statistics, load_atomic_dataset, load_item_catalog, subsample_training_users
from modeling_missrec.evaluation import results_table
from modeling_missrec.recommend import model_card, push_to_hub
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import DataArguments, ModelArguments, TrainingArguments, parse_config_and_flags
from modeling_missrec.transfer import build_model

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configuration" / "finetune" / "default.yaml"
logger = logging.getLogger("run_finetune")


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args, config_path = parse_config_and_flags(
        (DataArguments, ModelArguments, TrainingArguments), sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG
    )
    configure_logging(training_args.disable_tqdm)
    if not training_args.do_train and model_args.model_name_or_path is None:
        raise ValueError(
            "--do_train false evaluates the model as loaded: give --model_name_or_path (a pre-trained or "
            "fine-tuned MISSRec folder); a model built from scratch would be evaluated with random weights."
        )
    set_seed(training_args.seed)  # the model's initial weights follow the seed too
    data_dir = data_args.resolved_data_dir()
    with PartialState().main_process_first():  # one process writes the parsed-data cache, the others read it
        dataset = load_atomic_dataset(data_dir, data_args.dataset_name, data_args.cache_dir)
    dataset = subsample_training_users(dataset, data_args.train_users_fraction, training_args.seed)
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
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. 'user/missrec-scientific')")
    mode = "transductive" if model.config.use_item_ids else "inductive"
    trainer.model_card = lambda metrics: model_card(metrics, Path(data_dir).name, mode, training_args.hub_model_id)
    metrics = trainer.train() if training_args.do_train else trainer.evaluate_without_training()
    if trainer.accelerator.is_main_process:
        print(results_table(metrics, training_args.eval_ks))
        print(f"model, metrics.json, results.md and a model card written to {training_args.output_dir}")
        if training_args.push_to_hub:
            push_to_hub(
                training_args.output_dir,
                training_args.hub_model_id,
                private=training_args.hub_private_repo,
                dataset=Path(data_dir).name,
                mode=mode,
            )
            print(f"uploaded to the Hub as {training_args.hub_model_id}")
    return metrics


if __name__ == "__main__":
    run_command(main)
