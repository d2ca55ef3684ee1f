"""Training a MISSRec recommender with `transformers.Trainer` instead of `run_finetune.py`'s loop.

    from transformers import Trainer, TrainingArguments
    from modeling_missrec.data import HistoryDataset
    from modeling_missrec.hf_trainer import missrec_trainer_kwargs

    trainer = Trainer(
        model,
        TrainingArguments("out", eval_strategy="epoch", metric_for_best_model="ndcg@10", remove_unused_columns=False),
        train_dataset=HistoryDataset(dataset["train"], 50), eval_dataset=HistoryDataset(dataset["valid"], 50),
        **missrec_trainer_kwargs(seed=2020),
    )

What the model needs from the loop, as Trainer pieces: the interests are re-clustered before every epoch
(`InterestRefreshCallback`), batches carry only what `forward` takes (`collate_histories`), and evaluation
turns each batch's logits into the target's rank at once (`ranks_from_logits`: ties count against the
target), so that `compute_metrics` receives one rank per user, never the score matrix, and reports HR, NDCG
and MRR at each K (`RankingMetricsFromRanks`). `run_finetune.py` remains the reference path: it streams the
catalogue in blocks instead of forming each batch's logits, checkpoints atomically and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import EvalPrediction, TrainerCallback

from .metrics import metrics_from_ranks
from .ranking import reference_ranks

MODEL_INPUTS = ("input_ids", "attention_mask", "labels")


class InterestRefreshCallback(TrainerCallback):
    """k-means over the catalogue before every epoch, seeded `seed + epoch` as `run_finetune.py` does. Every
    process clusters the same catalogue with the same seed, so their interests agree."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.refresh_interests(seed=self.seed + int(state.epoch or 0))


def collate_histories(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`HistoryDataset` batches (already padded to their longest history) with only the model's inputs."""
    if not isinstance(batch, Mapping):  # Trainer's column filter took the batch for a list of rows
        raise ValueError(
            "collate_histories received a list, not a HistoryDataset batch: pass remove_unused_columns=False to "
            "transformers.TrainingArguments (HistoryDataset pads whole batches; the columns are chosen here)"
        )
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def ranks_from_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: each row's target rank among all items (1 = best, ties against it)."""
    if isinstance(logits, tuple):  # the output's fields after the loss: logits come first
        logits = logits[0]
    return reference_ranks(logits.float(), labels)


class RankingMetricsFromRanks:
    """`compute_metrics`: HR/NDCG@K and MRR from the ranks `ranks_from_logits` gathered over the split."""

    def __init__(self, ks: Sequence[int] = (10, 50)):
        self.ks = tuple(ks)

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        ranks = np.asarray(prediction.predictions).reshape(-1)
        return metrics_from_ranks(torch.from_numpy(ranks.astype(np.int64)), self.ks)


def missrec_trainer_kwargs(seed: int = 0, ks: Sequence[int] = (10, 50)) -> dict:
    """The `Trainer(...)` arguments that make it train and evaluate a MISSRec recommender."""
    return {
        "data_collator": collate_histories,
        "preprocess_logits_for_metrics": ranks_from_logits,
        "compute_metrics": RankingMetricsFromRanks(ks),
        "callbacks": [InterestRefreshCallback(seed)],
    }
