"""Ranking evaluation over a split: every user's target ranked among all items by the streaming kernel, and
the results table written beside a trained model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .metrics import metrics_from_ranks, streaming_ranks
from .modeling_missrec import MissrecForSequentialRecommendation


def _min_fill(loader) -> float:
    """The `min_fill` of the loader's LengthGroupedBatchSampler, under any wrappers (Accelerate's shards)."""
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None and not hasattr(sampler, "min_fill"):
        sampler = getattr(sampler, "batch_sampler", None)
    return getattr(sampler, "min_fill", 0.0)


@torch.no_grad()
def evaluate_ranking(
    model: MissrecForSequentialRecommendation,
    loader: DataLoader,
    accelerator: Accelerator | None = None,
    ks: tuple[int, ...] = (10, 50),
    exclude_history: bool = False,
    block_size: int = 8192,
    show_progress: bool = False,
    description: str = "eval",
    check_inputs: bool = True,
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """Full ranking of every user's target among all items, streaming over item blocks.

    Returns the standard @K metrics, the @K+1 metrics of the original code, and the ranks (all processes).
    `check_inputs=False` skips validating each batch's ids (a host sync), for loaders of checked data."""
    if accelerator is not None and accelerator.num_processes > 1 and _min_fill(loader):
        raise ValueError(
            "evaluate_ranking with several processes needs batches of equal size; build the loader with "
            "min_fill=0 (unequal batches would be trimmed or duplicated by gather_for_metrics)."
        )
    was_training = model.training
    model.eval()
    raw = model._catalog_raw_tokens()
    items = model.item_tokens(raw)
    all_ranks = []
    for batch in tqdm(loader, desc=description, disable=not show_progress, leave=False):
        input_ids, labels = batch["input_ids"], batch["labels"]
        sequence = model.encode(
            input_ids, batch["attention_mask"], raw_tokens=raw, check_inputs=check_inputs
        ).sequence_embedding
        # The target's score is read from its own block: the same arithmetic as its competitors, so ties
        # between items with identical features count against the target as they should.
        result = streaming_ranks(
            lambda start, end, s=sequence, i=input_ids, m=batch["attention_mask"]: model.score_items(
                s, items, start, end, i, m
            ),
            labels,
            model.config.num_items,
            block_size=block_size,
            exclude_items=input_ids if exclude_history else None,
        )
        ranks = result.ranks
        # gather_for_metrics cuts the last batch to len(dataset) % batch size, assuming equal batches; with one
        # process there is nothing to gather, and the batches may differ in size (`eval_min_fill`).
        if accelerator is not None and accelerator.num_processes > 1:
            ranks = accelerator.gather_for_metrics(ranks)
        all_ranks.append(ranks.cpu())
    model.train(was_training)
    ranks = torch.cat(all_ranks)
    return metrics_from_ranks(ranks, ks, 0), metrics_from_ranks(ranks, ks, 1), ranks


def results_table(metrics: Mapping, ks) -> str:
    """A Markdown table of valid/test metrics at @K and the original's @K+1."""
    columns = [f"{name}@{k}" for k in ks for name in ("hr", "ndcg")] + ["mrr"]
    lines = [
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
        f"{metrics['seconds_per_epoch']:.1f} s per epoch",
        "",
        "| split | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for split in ("valid", "valid_at_k_plus_1", "test", "test_at_k_plus_1"):
        values = metrics[split]
        label = split.replace("_at_k_plus_1", " (@K+1, as the original)")
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"
