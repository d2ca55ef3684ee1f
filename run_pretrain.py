#!/usr/bin/env python
"""Pre-train MISSRec on several domains (contrastive, content only), on CPU, one GPU or many.

    accelerate launch run_pretrain.py                                        # embedded data, a short demo
    accelerate launch run_pretrain.py --config configuration/pretrain/fhckm.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no run_pretrain.py            # two CPU processes (gloo)

Settings: the dataclasses below (see --help), a YAML file (--config, by default
configuration/pretrain/default.yaml), then command-line flags. The output folder receives a from_pretrained
model every `save_every_epochs` (checkpoint-epoch-N/), the final model, and pretrain_metrics.json. Fine-tune it
with `run_finetune.py --model_name_or_path <folder> --finetune_method frozen|full|lora`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from accelerate.utils import set_seed

from modeling_missrec.cli import configure_logging, run_command
from modeling_missrec.data import load_pretraining_corpus
from modeling_missrec.trainer import MissrecPretrainer
from modeling_missrec.training_args import (
    PretrainDataArguments,
    PretrainingArguments,
    PretrainModelArguments,
    parse_config_and_flags,
)
from modeling_missrec.transfer import build_pretraining_model

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configuration" / "pretrain" / "default.yaml"
logger = logging.getLogger("run_pretrain")


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args, config_path = parse_config_and_flags(
        (PretrainDataArguments, PretrainModelArguments, PretrainingArguments),
        sys.argv[1:] if argv is None else argv,
        DEFAULT_CONFIG,
    )
    configure_logging(training_args.disable_tqdm)
    set_seed(training_args.seed)
    corpus = load_pretraining_corpus(
        data_args.resolved_domain_dirs(),
        data_args.feature_files(),
        data_args.feature_sizes(),
        data_args.augmented_text_features,
    )
    model = build_pretraining_model(model_args, corpus)
    trainer = MissrecPretrainer(model, corpus, training_args, data_args.load_validation_domains())
    if trainer.accelerator.is_main_process:
        logger.info("configuration file: %s", config_path or "none (dataclass defaults)")
        logger.info("data: %s | %s", data_args, corpus.summary())
        logger.info("model: %s", model_args)
        logger.info("training: %s", training_args)
        logger.info("MissrecConfig: %s", model.config.to_json_string(use_diff=True).replace("\n", " "))
        logger.info(
            "trainable parameters: %d (processes: %d)",
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            trainer.accelerator.num_processes,
        )
    summary = trainer.train()
    if trainer.accelerator.is_main_process:
        last = summary["history"][-1] if summary["history"] else {}
        print(
            f"pre-trained {summary['epochs_run']} epochs on {summary['num_processes']} process(es); "
            f"last loss {last.get('loss', float('nan')):.4f}; model written to {training_args.output_dir}"
        )
    return summary


if __name__ == "__main__":
    run_command(main)
