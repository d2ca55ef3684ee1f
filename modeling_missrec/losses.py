"""The training objectives as named functions of scores: what the heads' `forward` combines.

Each takes the logits a head computed (already divided by the temperature) and the ids it needs to tell a
real negative from the target; none knows about the model. Fine-tuning: the full softmax (cross-entropy over
the catalogue) or `sampled_softmax_loss`. Pre-training: `in_batch_contrastive_loss` (sequence to next item,
negatives from every process) and `augmented_view_loss` (sequence to its augmented view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax_loss(
    logits: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, expected_counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of row b's target (column b) among sampled candidates `candidates` `[B + S]` (the batch's
    targets, then S shared negatives). Each column's logit is lowered by the log of its expected count among
    the candidates (`expected_counts` `[B + S]`, the logQ correction that makes the sampled softmax an unbiased
    estimate of the full one); a column holding row b's target elsewhere than column b (an accidental hit) is
    masked, not a negative. Returns the loss and the corrected, masked logits."""
    logits = logits - expected_counts.log()
    diagonal = torch.eye(len(labels), len(candidates), dtype=torch.bool, device=logits.device)
    accidental = (candidates.unsqueeze(0) == labels.unsqueeze(1)) & ~diagonal
    logits = logits.masked_fill(accidental, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(labels), device=logits.device)), logits


def in_batch_contrastive_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor | None = None,
    all_target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each row's own next item (column `labels[b]`) among the next items of the global batch
    (`logits` `[B, global batch]`). With the item ids (`target_ids` `[B]` of these rows, `all_target_ids` of
    every column), a column holding the same item as the row's target is masked: it is no negative."""
    if target_ids is not None and all_target_ids is not None:
        duplicate = all_target_ids.unsqueeze(0) == target_ids.unsqueeze(1)
        duplicate[torch.arange(len(labels), device=logits.device), labels] = False
        logits = logits.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(logits, labels)


def augmented_view_loss(
    sequence_embedding: torch.Tensor, augmented_embeddings: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy of each sequence's own augmented view (row `labels[b]` of `augmented_embeddings`, the
    gathered views of the global batch) by cosine / temperature (the embeddings are normalised)."""
    return F.cross_entropy(sequence_embedding @ augmented_embeddings.T / temperature, labels)
