"""Full-ranking evaluation for sequential recommendation.

Conventions: item id 0 is padding and never ranked; real items are ``1..num_items``. A user's rank is
pessimistic: ``1 + #{real items j != target, not excluded, with score_j >= score_target}`` (equal within a
few units in the last place, see :func:`.ranking.tie_floor`), so a model that gives every item the same score
gets the worst rank, not the best.

Ranks come from :mod:`.ranking` (re-exported here): :func:`reference_ranks` from a full score matrix (what
tests and the ``evaluate`` module use), :func:`streaming_ranks` over item blocks (real catalogues).

Metrics are computed from ranks by :func:`metrics_from_ranks` or, batch by batch, by :class:`RankingMetrics`.
Both reduce ranks to an integer histogram first, so they agree bit for bit however the users are batched.

This module sits at the bottom of the import graph: it imports only torch, the standard library and
:mod:`.ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .ranking import RankingResult, is_int, reference_ranks, streaming_ranks, streaming_topk

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


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------


def _check_ks(ks: object, metric_cutoff_offset: object) -> tuple[int, ...]:
    if not isinstance(ks, Sequence) or isinstance(ks, str) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, e.g. (10, 50); got {ks!r}")
    bad = [k for k in ks if not is_int(k) or k < 1]
    if bad:
        raise ValueError(f"ks must be positive ints; got invalid value(s) {bad!r} in {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not contain duplicates; got {ks!r}")
    if not is_int(metric_cutoff_offset) or metric_cutoff_offset < 0:
        raise ValueError(f"metric_cutoff_offset must be an int >= 0, got {metric_cutoff_offset!r}")
    return tuple(int(k) for k in ks)


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
