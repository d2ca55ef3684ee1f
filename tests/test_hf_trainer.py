"""`transformers.Trainer` trains and evaluates a MISSRec recommender with the pieces of `hf_trainer.py`."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TINY, write_planted_dataset
from transformers import EvalPrediction, Trainer
from transformers import TrainingArguments as HfTrainingArguments

from modeling_missrec.data import HistoryDataset, load_atomic_dataset, load_item_catalog
from modeling_missrec.evaluation import evaluate_ranking
from modeling_missrec.hf_trainer import (
    RankingMetricsFromRanks,
    collate_histories,
    missrec_trainer_kwargs,
    ranks_from_logits,
)
from modeling_missrec.ranking import reference_ranks
from modeling_missrec.training_args import ModelArguments
from modeling_missrec.transfer import build_model


def test_a_few_trainer_epochs_learn_and_the_metrics_are_the_evaluators(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    dataset = load_atomic_dataset(folder, cache_dir=tmp_path / "cache")
    catalog = load_item_catalog(folder, feature_files={"text": "Toy.text.npy", "image": "Toy.image.npy"})
    torch.manual_seed(0)
    model = build_model(ModelArguments(mode="inductive", config_overrides=TINY), catalog)
    train, valid = (HistoryDataset(dataset[split], model.config.max_seq_length) for split in ("train", "valid"))
    args = HfTrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=6, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, learning_rate=5e-3, eval_strategy="epoch", save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=0, logging_strategy="no", remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=valid, **missrec_trainer_kwargs(seed=0))
    assert model.config.num_interests == 0  # nothing clustered before the first epoch's callback
    trainer.train()
    assert model.config.num_interests > 0
    history = [record for record in trainer.state.log_history if "eval_ndcg@10" in record]
    assert len(history) == 6 and history[-1]["eval_ndcg@10"] > history[0]["eval_ndcg@10"]
    assert history[-1]["eval_hr@10"] > 0.5  # the planted next-item rule is learnt
    # the Trainer's figures are the project's evaluator's on the same model (ties against the target in both)
    metrics = trainer.evaluate()
    expected, _, _ = evaluate_ranking(model, [valid.__getitems__(list(range(len(valid))))])
    for name in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"):
        assert abs(metrics[f"eval_{name}"] - expected[name]) < 1e-6, name


def test_the_column_filter_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collate_histories(["input_ids", "labels"])


def test_ranks_from_logits_count_ties_against_the_target():
    logits = torch.tensor([[float("-inf"), 0.5, 0.9, 0.5, 0.1], [float("-inf"), 0.2, 0.2, 0.2, 0.3]])
    labels = torch.tensor([1, 2])
    ranks = ranks_from_logits((logits, None), labels)
    assert ranks.tolist() == [3, 4] and torch.equal(ranks, reference_ranks(logits, labels))
    metrics = RankingMetricsFromRanks(ks=(1, 3))(EvalPrediction(predictions=ranks.numpy(), label_ids=None))
    assert metrics["hr@1"] == 0.0 and metrics["hr@3"] == 0.5
