"""Full ranking over a catalogue: the one streaming kernel behind evaluation and recommendation.

Conventions: item id 0 is padding and never ranked; real items are ``1..num_items``. A user's rank is
pessimistic: ``1 + #{real items j != target, not excluded, with score_j >= tie_floor(score_target)}``, so a
model that gives every item the same score gets the worst rank, not the best, and a NaN competitor counts
against the target.

Ties are ties within rounding: :func:`tie_floor` is the target's score less a few units in the last place
(8 x the dtype's epsilon, relative to max(1, |score|)). A CPU matrix product rounds a column differently
depending on where it falls in the kernel's tiles (two identical items scored in one block of 7 columns
differ by up to 3e-7 on these CPUs; in blocks of 64 or more they agree), so items with duplicated features,
whose scores are equal, would otherwise win or lose their tie by the luck of their column: on the shared
Scientific sets, with hundreds of duplicated feature rows, that luck favoured the model. At 8 ulps a
competitor that is genuinely, not by rounding, within ~1e-6 of the target also counts against it: the rule
errs towards the pessimistic side only.

* :func:`reference_ranks` takes the full ``[B, num_items + 1]`` score matrix: short and obviously correct, the
  ground truth of the tests.
* :func:`streaming_ranks` walks the item ids in blocks and keeps only a running count and, optionally, a
  running top-k, so the ``[B, num_items]`` matrix never exists. The target's score is read from the block that
  holds the target, so it comes from exactly the arithmetic of its competitors: a tie is a tie, bit for bit.
  (A target score computed apart, e.g. by an element-wise product, differs by rounding from the matrix
  product of the blocks, and on items with duplicated features that broke ties in the model's favour.)
* :func:`streaming_topk` is the same kernel without targets: what a recommender needs.

This module is a model file: it imports only torch and the standard library, so ``save_pretrained`` can copy
it beside the modeling code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RankingResult", "ids_in_block", "reference_ranks", "streaming_ranks", "streaming_topk", "tie_floor"]

TIE_ULPS = 8

ScoreBlock = Callable[[int, int], Tensor]


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
# input validation
# --------------------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """An integer that is not a bool."""
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


def _check_exclude(exclude_items: object, batch: int | None, num_items: int) -> Tensor:
    exclude = _check_int_tensor("exclude_items", exclude_items, 2)
    if batch is not None and exclude.shape[0] != batch:
        raise ValueError(f"exclude_items must have shape [B, L] with B={batch}, got shape {tuple(exclude.shape)}")
    _check_id_range("exclude_items", exclude, 0, num_items, "item ids (0 = padding, ignored)")
    return exclude


def _check_sizes(num_items: object, block_size: object, top_k: object, min_top_k: int) -> None:
    if not is_int(num_items) or num_items < 1:
        raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not is_int(top_k) or top_k < min_top_k:
        raise ValueError(f"top_k must be an int >= {min_top_k}, got {top_k!r}")


def tie_floor(target_scores: Tensor) -> Tensor:
    """The lowest score that still ties with each target: ``t - TIE_ULPS x eps x max(1, |t|)``."""
    eps = torch.finfo(target_scores.dtype).eps
    floor = target_scores - TIE_ULPS * eps * target_scores.abs().clamp_min(1.0)
    return torch.where(torch.isinf(target_scores), target_scores, floor)  # inf - 8 eps inf would be NaN


# --------------------------------------------------------------------------------------------------------
# the brute-force reference
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

    floor = tie_floor(scores[rows, targets]).unsqueeze(1)
    return 1 + ((scores >= floor) & competitor).sum(dim=1)


# --------------------------------------------------------------------------------------------------------
# the streaming kernel
# --------------------------------------------------------------------------------------------------------


def ids_in_block(ids: Tensor, start: int, width: int) -> Tensor:
    """``[B, width]`` bool: which item ids ``start..start+width-1`` occur in each row of ``ids`` ``[B, L]``."""
    offset = ids - start
    offset = torch.where((offset >= 0) & (offset < width), offset, width)
    mask = torch.zeros(ids.shape[0], width + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, offset, True)[:, :width]


def _excluded_in_block(exclude: Tensor, start: int, width: int, targets: Tensor | None) -> Tensor:
    """``[B, width]`` bool: which item ids ``start..start+width-1`` each row excludes (never its target).

    Exclusions are scattered into a ``[B, width + 1]`` mask; ids outside the block land in the spare last
    column. Every write is True, so duplicate ids are harmless."""
    excluded = ids_in_block(exclude, start, width)
    if targets is not None:
        ids = torch.arange(start, start + width, device=exclude.device)
        excluded &= ids.unsqueeze(0) != targets.unsqueeze(1)
    return excluded


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


class _RunningTopK:
    """The best ``k`` (score, item id) pairs per row seen so far, ties towards the lower id."""

    def __init__(self, batch: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k = k
        self.scores = torch.full((batch, k), -math.inf, dtype=dtype, device=device)
        self.items = torch.zeros(batch, k, dtype=torch.long, device=device)

    def update(self, block: Tensor, unrankable: Tensor, start: int) -> None:
        block_scores, block_items = _block_topk(block.masked_fill(unrankable, -math.inf), self.k, start)
        # Running entries all have lower ids than this block's and both parts are in id order among equal
        # scores, so a stable sort keeps ties broken towards the lower id.
        merged = torch.cat([self.scores, block_scores], dim=1)
        merged_items = torch.cat([self.items, block_items], dim=1)
        ordered, order = merged.sort(dim=1, descending=True, stable=True)
        self.scores = ordered[:, : self.k]
        self.items = merged_items.gather(1, order[:, : self.k])

    def result(self) -> tuple[Tensor, Tensor]:
        return self.scores, self.items.masked_fill(self.scores == -math.inf, 0)


def _checked_block(score_block: ScoreBlock, start: int, end: int, batch: int | None) -> Tensor:
    block = score_block(start, end)
    width = end - start
    if (
        not isinstance(block, Tensor)
        or block.ndim != 2
        or block.shape[1] != width
        or (batch is not None and block.shape[0] != batch)
    ):
        expected = f"[{batch if batch is not None else 'B'}, {width}]"
        got = tuple(getattr(block, "shape", ())) or type(block).__name__
        raise ValueError(f"score_block({start}, {end}) must return a tensor of shape {expected}, got {got}")
    return block


def _stream(
    score_block: ScoreBlock,
    num_items: int,
    block_size: int,
    targets: Tensor | None,
    exclude: Tensor | None,
    top_k: int,
) -> tuple[Tensor | None, _RunningTopK | None]:
    """One pass over the blocks for the top-k and the ranks of rows whose target is already known, then a
    second pass over the blocks before the last target's block for the rows that met their target late.

    Counting needs the target's score before a block's competitors can be compared with it, and that score
    is only known once its own block has been scored: a row counts the blocks from its target's block on in
    the first pass and the earlier ones in the second. A catalogue of one block (up to `block_size` items)
    is scored once; a larger one up to twice (on average about 1.5 times for targets spread evenly).
    """
    starts = range(1, num_items + 1, block_size)
    count = topk = target_block = floor = None
    bad_target = None
    with torch.no_grad():
        for index, start in enumerate(starts):
            end = min(start + block_size, num_items + 1)
            block = _checked_block(score_block, start, end, None if targets is None else targets.shape[0])
            width = end - start
            if index == 0:  # adopt the block's device and dtype
                device = block.device
                if exclude is not None and exclude.shape[0] != block.shape[0]:
                    raise ValueError(
                        f"exclude_items must have shape [B, L] with B={block.shape[0]}, "
                        f"got shape {tuple(exclude.shape)}"
                    )
                exclude = None if exclude is None else exclude.to(device)
                if top_k:
                    topk = _RunningTopK(block.shape[0], top_k, block.dtype, device)
                if targets is not None:
                    targets = targets.to(device)
                    target_block = (targets - 1) // block_size
                    floor = torch.zeros(targets.shape[0], dtype=block.dtype, device=device)
                    count = torch.zeros(targets.shape[0], dtype=torch.long, device=device)
                    bad_target = torch.zeros(targets.shape[0], dtype=torch.bool, device=device)
            excluded = None if exclude is None else _excluded_in_block(exclude, start, width, targets)
            if topk is not None:
                topk.update(block, torch.isnan(block) if excluded is None else excluded | torch.isnan(block), start)
            if targets is None:
                continue
            here = target_block == index
            own = block.gather(1, (targets - start).clamp(0, width - 1).unsqueeze(1)).squeeze(1)
            floor = torch.where(here, tie_floor(own), floor)
            bad_target |= here & torch.isnan(own)
            count += _count_at_or_above(block, floor, targets, start, excluded) * (target_block <= index)

        if targets is None:
            return None, topk
        if bad_target.any():
            row = int(bad_target.nonzero()[0, 0])
            raise ValueError(f"score_block gave NaN as the score of row {row}'s target (item {int(targets[row])})")
        for index in range(int(target_block.max()) if targets.numel() else 0):  # the second pass
            start = starts[index]
            end = min(start + block_size, num_items + 1)
            block = _checked_block(score_block, start, end, targets.shape[0])
            excluded = None if exclude is None else _excluded_in_block(exclude, start, end - start, targets)
            count += _count_at_or_above(block, floor, targets, start, excluded) * (target_block > index)
    return count + 1, topk


def _count_at_or_above(block: Tensor, floor: Tensor, targets: Tensor, start: int, excluded: Tensor | None) -> Tensor:
    """Per row, the competitors in this block that tie with or beat the target: scored at or above its
    :func:`tie_floor` (NaN counts too: ``~(s < floor)``)."""
    ids = torch.arange(start, start + block.shape[1], device=block.device)
    dropped = ids.unsqueeze(0) == targets.unsqueeze(1)
    if excluded is not None:
        dropped = dropped | excluded
    return (~(block < floor.unsqueeze(1)) & ~dropped).sum(dim=1)


def streaming_ranks(
    score_block: ScoreBlock,
    targets: Tensor,
    num_items: int,
    block_size: int = 8192,
    exclude_items: Tensor | None = None,
    top_k: int = 0,
) -> RankingResult:
    """Pessimistic ranks (and optionally the top-k items) without materialising ``[B, num_items]`` scores.

    ``score_block(start, end)`` must return the ``[B, end - start]`` scores of item ids ``start..end-1``, the
    same values whenever it is called with the same range; it is called under ``torch.no_grad()`` for
    consecutive blocks covering ``1..num_items``, then again for the blocks before the last target's block
    (see ``_stream``). The target's score is taken from its own column, and ties are judged by
    :func:`tie_floor`: ranks equal :func:`reference_ranks` of the same scores exactly, ties included. A NaN
    target score is an error. Memory stays ``O(B * L + B * block_size + B * top_k)``.
    """
    _check_sizes(num_items, block_size, top_k, 0)
    targets = _check_int_tensor("targets", targets, 1)
    batch = targets.shape[0]
    _check_id_range("targets", targets, 1, num_items, "item ids")
    exclude = None if exclude_items is None else _check_exclude(exclude_items, batch, num_items)
    if batch == 0:
        empty = torch.zeros(0, dtype=torch.long, device=targets.device)
        if top_k == 0:
            return RankingResult(ranks=empty)
        return RankingResult(
            ranks=empty,
            topk_scores=torch.zeros(0, top_k, device=targets.device),
            topk_items=torch.zeros(0, top_k, dtype=torch.long, device=targets.device),
        )
    ranks, topk = _stream(score_block, num_items, block_size, targets, exclude, top_k)
    if topk is None:
        return RankingResult(ranks=ranks)
    scores, items = topk.result()
    return RankingResult(ranks=ranks, topk_scores=scores, topk_items=items)


def streaming_topk(
    score_block: ScoreBlock,
    num_items: int,
    top_k: int,
    block_size: int = 8192,
    exclude_items: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``top_k`` best items per row (scores, item ids), best first, over item ids ``1..num_items``, keeping
    only a running top-k (never ``[B, num_items]``). Ties go to the lower item id; ``exclude_items`` [B, L]
    (0 = padding) are never returned; rows with fewer than ``top_k`` rankable items end in (-inf, 0)."""
    _check_sizes(num_items, block_size, top_k, 1)
    exclude = None if exclude_items is None else _check_exclude(exclude_items, None, num_items)
    _, topk = _stream(score_block, num_items, block_size, None, exclude, top_k)
    return topk.result()
