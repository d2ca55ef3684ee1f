"""Full-ranking evaluation for sequential recommendation.

Conventions: item id 0 is padding and never ranked; real items are ``1..num_items``. A user's rank is
pessimistic: ``1 + #{real items j != target, not excluded, with score_j >= score_target}``, so a model that
gives every item the same score gets the worst rank, not the best.

Two ways to get ranks:

* :func:`reference_ranks` takes the full ``[B, num_items + 1]`` score matrix. It is short and obviously
  correct, and it is what tests and the ``evaluate`` module use.
* :func:`streaming_ranks` walks the item ids in blocks and keeps only a running count (and, optionally, a
  running top-k), so the ``[B, num_items]`` matrix never exists. Use it for real catalogues.

Metrics are computed from ranks by :func:`metrics_from_ranks` or, batch by batch, by :class:`RankingMetrics`.
Both reduce ranks to an integer histogram first, so they agree bit for bit however the users are batched.

This module sits at the bottom of the import graph: it imports only torch, numpy and the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "EVALUATE_MODULE_PATH",
    "RankingMetrics",
    "RankingResult",
    "metrics_from_ranks",
    "reference_ranks",
    "streaming_ranks",
    "streaming_topk",
]

EVALUATE_MODULE_PATH = str(Path(__file__).parent / "missrec_ranking")
"""Pass to ``evaluate.load`` to get the ``missrec_ranking`` metric without network access."""


@dataclass
class RankingResult:
    """What :func:`streaming_ranks` returns.

    ``ranks`` is ``[B]`` (1 is best). ``topk_scores`` / ``topk_items`` are ``[B, top_k]`` when ``top_k > 0``,
    sorted by score descending with ties broken towards the lower item id; slots that hold no item (fewer
    than ``top_k`` rankable items, or items scored ``-inf`` / NaN) have score ``-inf`` and item id 0.
    """

    ranks: Tensor
    topk_scores: Tensor | None = None
    topk_items: Tensor | None = None


# --------------------------------------------------------------------------------------------------------
# input validation helpers
# --------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int_tensor(name: str, tensor: object, ndim: int) -> Tensor:
    tensor = torch.as_tensor(tensor)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of item ids, got dtype {tensor.dtype}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    return tensor


def _check_id_range(name: str, ids: Tensor, low: int, high: int, what: str) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < low or hi > high:
        raise ValueError(f"{name} must hold {what} in {low}..{high}; got values in {lo}..{hi}")


def _check_exclude(exclude_items: object, batch: int, num_items: int) -> Tensor:
    exclude = _check_int_tensor("exclude_items", exclude_items, 2)
    if exclude.shape[0] != batch:
        raise ValueError(f"exclude_items must have shape [B, L] with B={batch}, got shape {tuple(exclude.shape)}")
    _check_id_range("exclude_items", exclude, 0, num_items, "item ids (0 = padding, ignored)")
    return exclude


def _check_ks(ks: object, metric_cutoff_offset: object) -> tuple[int, ...]:
    if not isinstance(ks, Sequence) or isinstance(ks, str) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, e.g. (10, 50); got {ks!r}")
    bad = [k for k in ks if not _is_int(k) or k < 1]
    if bad:
        raise ValueError(f"ks must be positive ints; got invalid value(s) {bad!r} in {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not contain duplicates; got {ks!r}")
    if not _is_int(metric_cutoff_offset) or metric_cutoff_offset < 0:
        raise ValueError(f"metric_cutoff_offset must be an int >= 0, got {metric_cutoff_offset!r}")
    return tuple(int(k) for k in ks)


# --------------------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------------------


def reference_ranks(scores: Tensor, targets: Tensor, exclude_items: Tensor | None = None) -> Tensor:
    """Pessimistic rank of each target from the full score matrix (brute force, the ground truth).

    ``scores`` is ``[B, num_items + 1]`` (column 0 = padding, never counted); ``targets`` is ``[B]`` with ids
    in ``1..num_items``. ``exclude_items`` is ``[B, L]`` of item ids removed from the ranking (0 = padding,
    ignored; the target itself is never removed). Returns ``[B]`` int64 ranks, 1 = best.
    """
    if not isinstance(scores, Tensor) or not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating-point torch.Tensor, got {getattr(scores, 'dtype', scores)}")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape [B, num_items + 1] with num_items >= 1, got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    batch, num_items = scores.shape[0], scores.shape[1] - 1
    targets = _check_int_tensor("targets", targets, 1).to(scores.device)
    if targets.shape[0] != batch:
        raise ValueError(f"targets must have shape [{batch}] to match scores, got {tuple(targets.shape)}")
    _check_id_range("targets", targets, 1, num_items, "item ids")

    rows = torch.arange(batch, device=scores.device)
    competitor = torch.ones_like(scores, dtype=torch.bool)
    competitor[:, 0] = False
    if exclude_items is not None:
        exclude = _check_exclude(exclude_items, batch, num_items).to(scores.device)
        competitor.scatter_(1, exclude, False)
    competitor[rows, targets] = False  # the target never competes with itself (and is never excluded)

    target_scores = scores[rows, targets].unsqueeze(1)
    return 1 + ((scores >= target_scores) & competitor).sum(dim=1)


def _block_topk(key: Tensor, k: int, start: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best columns of ``key`` by (score desc, column asc), returned in column order.

    ``torch.topk`` picks arbitrarily among ties at the k-th value; to make the result deterministic we keep
    every column strictly above the k-th value plus the lowest-numbered columns equal to it.
    """
    width = key.shape[1]
    if width <= k:
        ids = torch.arange(start, start + width, device=key.device).expand(key.shape[0], width)
        return key, ids
    kth = torch.topk(key, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = key > kth
    at_kth = key == kth
    needed = k - above.sum(dim=1, keepdim=True)
    take = above | (at_kth & (at_kth.cumsum(dim=1, dtype=torch.int32) <= needed))  # exactly k per row
    positions = torch.topk(take.to(torch.uint8), k, dim=1, sorted=False).indices.sort(dim=1).values
    return key.gather(1, positions), positions + start


def streaming_ranks(
    score_block: Callable[[int, int], Tensor],
    target_scores: Tensor,
    targets: Tensor,
    num_items: int,
    block_size: int = 8192,
    exclude_items: Tensor | None = None,
    top_k: int = 0,
) -> RankingResult:
    """Pessimistic ranks (and optionally the top-k items) without materialising ``[B, num_items]`` scores.

    ``score_block(start, end)`` must return the ``[B, end - start]`` scores of item ids ``start..end-1``;
    it is called for consecutive blocks covering ``1..num_items``, under ``torch.no_grad()``.
    ``target_scores`` [B] should come from the same computation as the blocks (rounding differences change
    ties); the target's own column is skipped when counting. Same rank semantics as :func:`reference_ranks`;
    a NaN competitor score counts against the target (pessimistic), a NaN target score is an error. Memory
    stays ``O(B * L + B * block_size + B * top_k)``.
    """
    if not _is_int(num_items) or num_items < 1:
        raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    targets = _check_int_tensor("targets", targets, 1)
    batch = targets.shape[0]
    _check_id_range("targets", targets, 1, num_items, "item ids")
    if not isinstance(target_scores, Tensor) or target_scores.shape != (batch,):
        raise ValueError(
            f"target_scores must be a tensor of shape [{batch}] to match targets, "
            f"got {tuple(getattr(target_scores, 'shape', ()))}"
        )
    if torch.isnan(target_scores).any():
        raise ValueError("target_scores must not contain NaN")
    exclude = None if exclude_items is None else _check_exclude(exclude_items, batch, num_items)

    if batch == 0:
        empty = torch.zeros(0, dtype=torch.long, device=targets.device)
        if top_k == 0:
            return RankingResult(ranks=empty)
        return RankingResult(
            ranks=empty,
            topk_scores=torch.zeros(0, top_k, dtype=target_scores.dtype, device=targets.device),
            topk_items=torch.zeros(0, top_k, dtype=torch.long, device=targets.device),
        )

    count = best_scores = best_items = None
    with torch.no_grad():
        for start in range(1, num_items + 1, block_size):
            end = min(start + block_size, num_items + 1)
            width = end - start
            block = score_block(start, end)
            if not isinstance(block, Tensor) or block.shape != (batch, width):
                raise ValueError(
                    f"score_block({start}, {end}) must return a tensor of shape [{batch}, {width}], "
                    f"got {tuple(getattr(block, 'shape', ())) or type(block).__name__}"
                )
            if count is None:  # first block: adopt its device and dtype
                device = block.device
                targets = targets.to(device)
                target_col = target_scores.detach().to(device).unsqueeze(1)
                exclude = None if exclude is None else exclude.to(device)
                count = torch.zeros(batch, dtype=torch.long, device=device)
                if top_k:
                    best_scores = torch.full((batch, top_k), -math.inf, dtype=block.dtype, device=device)
                    best_items = torch.zeros(batch, top_k, dtype=torch.long, device=device)

            ids = torch.arange(start, end, device=device)
            is_target = ids.unsqueeze(0) == targets.unsqueeze(1)
            if exclude is None:
                excluded = None
                dropped = is_target
            else:
                # Scatter exclusions into a [B, width + 1] mask; ids outside this block land in the spare
                # last column. Every write is True, so duplicate indices are harmless.
                offset = exclude - start
                offset = torch.where((offset >= 0) & (offset < width), offset, width)
                mask = torch.zeros(batch, width + 1, dtype=torch.bool, device=device)
                excluded = mask.scatter_(1, offset, True)[:, :width] & ~is_target
                dropped = excluded | is_target
            count += (~(block < target_col) & ~dropped).sum(dim=1)  # NaN competitors count against

            if top_k:
                unrankable = torch.isnan(block) if excluded is None else excluded | torch.isnan(block)
                key = block.masked_fill(unrankable, -math.inf)
                block_scores, block_items = _block_topk(key, top_k, start)
                # Running entries all have lower ids than this block's and both parts are in id order among
                # equal scores, so a stable sort keeps ties broken towards the lower id.
                merged = torch.cat([best_scores, block_scores], dim=1)
                merged_items = torch.cat([best_items, block_items], dim=1)
                best_scores, order = merged.sort(dim=1, descending=True, stable=True)
                best_scores = best_scores[:, :top_k]
                best_items = merged_items.gather(1, order[:, :top_k])

    if not top_k:
        return RankingResult(ranks=count + 1)
    best_items = best_items.masked_fill(best_scores == -math.inf, 0)
    return RankingResult(ranks=count + 1, topk_scores=best_scores, topk_items=best_items)


def streaming_topk(
    score_block: Callable[[int, int], Tensor],
    num_items: int,
    top_k: int,
    block_size: int = 8192,
    exclude_items: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``top_k`` best items per row (scores, item ids), best first, over item ids ``1..num_items``, keeping
    only a running top-k (never ``[B, num_items]``). Ties go to the lower item id; ``exclude_items`` [B, L]
    (0 = padding) are never returned; rows with fewer than ``top_k`` rankable items end in (-inf, 0)."""
    if not _is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not _is_int(num_items) or num_items < 1:
        raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
    best_scores = best_items = exclude = None
    with torch.no_grad():
        for start in range(1, num_items + 1, block_size):
            end = min(start + block_size, num_items + 1)
            block = score_block(start, end)
            batch, width = block.shape
            if best_scores is None:
                best_scores = torch.full((batch, top_k), -math.inf, dtype=block.dtype, device=block.device)
                best_items = torch.zeros(batch, top_k, dtype=torch.long, device=block.device)
                if exclude_items is not None:
                    exclude = _check_exclude(exclude_items, batch, num_items).to(block.device)
            unrankable = torch.isnan(block)
            if exclude is not None:
                offset = exclude - start
                offset = torch.where((offset >= 0) & (offset < width), offset, width)
                mask = torch.zeros(batch, width + 1, dtype=torch.bool, device=block.device)
                unrankable |= mask.scatter_(1, offset, True)[:, :width]
            block_scores, block_items = _block_topk(block.masked_fill(unrankable, -math.inf), top_k, start)
            merged = torch.cat([best_scores, block_scores], dim=1)
            merged_items = torch.cat([best_items, block_items], dim=1)
            best_scores, order = merged.sort(dim=1, descending=True, stable=True)
            best_scores = best_scores[:, :top_k]
            best_items = merged_items.gather(1, order[:, :top_k])
    return best_scores, best_items.masked_fill(best_scores == -math.inf, 0)


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------


def _check_ranks(ranks: object) -> Tensor:
    ranks = torch.as_tensor(ranks)
    if ranks.dtype.is_floating_point or ranks.dtype.is_complex or ranks.dtype == torch.bool:
        raise ValueError(f"ranks must be an integer tensor, got dtype {ranks.dtype}")
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D [num_users], got shape {tuple(ranks.shape)}")
    ranks = ranks.detach().to("cpu", torch.long)
    if ranks.numel() and int(ranks.min()) < 1:
        raise ValueError(f"ranks must be >= 1 (1 = best), got minimum {int(ranks.min())}")
    return ranks


def _metrics_from_histogram(histogram: Tensor, ks: tuple[int, ...], offset: int) -> dict[str, float]:
    """Metrics from ``histogram[r]`` = number of users with rank ``r``.

    Everything is a deterministic function of integer counts, so batching cannot change a single bit.
    """
    num_users = int(histogram.sum())
    if num_users == 0:
        raise ValueError("no users to compute metrics over: ranks is empty")
    nonzero = torch.nonzero(histogram).flatten()
    histogram = histogram[: int(nonzero.max()) + 1].to(torch.float64)  # canonical length
    rank = torch.arange(histogram.shape[0], dtype=torch.float64)
    rank[0] = 1.0  # histogram[0] is always 0; avoid 1/0 and log2(1) = 0 there
    gain = histogram / torch.log2(rank + 1.0)

    result: dict[str, float] = {}
    for k in ks:
        cutoff = k + offset
        hit_rate = float(histogram[: cutoff + 1].sum()) / num_users
        result[f"hr@{k}"] = hit_rate
        result[f"recall@{k}"] = hit_rate  # one target per user: recall == hit rate
        result[f"ndcg@{k}"] = float(gain[: cutoff + 1].sum()) / num_users
    result["mrr"] = float((histogram / rank).sum()) / num_users
    result["num_users"] = num_users
    return result


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (10, 50), metric_cutoff_offset: int = 0) -> dict[str, float]:
    """HR@K, Recall@K, NDCG@K for each K, plus MRR and num_users, from 1-based ranks (float64).

    The cut-off is ``K + metric_cutoff_offset`` while the key stays ``@K``: offset 1 reproduces the original
    MISSRec code, whose "@10" numbers were really computed at 11.
    """
    ks = _check_ks(ks, metric_cutoff_offset)
    return _metrics_from_histogram(torch.bincount(_check_ranks(ranks)), ks, metric_cutoff_offset)


class RankingMetrics:
    """Accumulates ranks batch by batch; ``compute()`` equals :func:`metrics_from_ranks` on all of them.

    The state is an int64 histogram of ranks (size ``max rank + 1``, at most ``num_items + 1``), not the list
    of ranks. Integer counts make the result exactly independent of how users were split into batches,
    which running float sums would not be.
    """

    def __init__(self, ks: Sequence[int] = (10, 50), metric_cutoff_offset: int = 0) -> None:
        self.ks = _check_ks(ks, metric_cutoff_offset)
        self.metric_cutoff_offset = int(metric_cutoff_offset)
        self.reset()

    def reset(self) -> None:
        """Forget every rank added so far."""
        self._histogram = torch.zeros(1, dtype=torch.long)

    @property
    def num_users(self) -> int:
        """Number of ranks added since the last reset."""
        return int(self._histogram.sum())

    def update(self, ranks: Tensor) -> None:
        """Add a batch of 1-based ranks (any device)."""
        counts = torch.bincount(_check_ranks(ranks))
        if counts.shape[0] > self._histogram.shape[0]:
            counts[: self._histogram.shape[0]] += self._histogram
            self._histogram = counts
        else:
            self._histogram[: counts.shape[0]] += counts

    def compute(self) -> dict[str, float]:
        """Metrics over every rank added since the last reset; ValueError if there were none."""
        if self.num_users == 0:
            raise ValueError("RankingMetrics.compute() called before any ranks were added with update()")
        return _metrics_from_histogram(self._histogram, self.ks, self.metric_cutoff_offset)
