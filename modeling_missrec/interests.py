"""Interest vocabulary for MISSRec: k-means over item tokens and per-history interest sets.

MISSRec clusters every item "token" (the adapted text vector and the adapted image vector of each item) before
each epoch. The centroids form an *interest vocabulary*; each item then carries one interest id per modality
(1..K, with 0 reserved for padding or a missing modality), and a user's history is summarised by the *set* of
interest ids its items touch.

The original implementation ran a single Lloyd step from a random start, zeroed empty clusters and had an
in-place ``abs()`` bug, so its "interests" were close to random partitions. This module implements proper
k-means (k-means++ seeding, Lloyd iterations to convergence, deterministic re-seeding of empty clusters) whose
memory stays bounded for millions of points and tens of thousands of centroids, plus short reference versions
that the tests compare against.

This file sits at the bottom of the package's import graph: it imports only ``torch``, ``math`` and the
standard library.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

__all__ = [
    "KMeansResult",
    "assign_to_centroids",
    "interest_sets",
    "kmeans",
    "kmeans_init",
    "num_interests",
    "reference_interest_sets",
    "reference_kmeans",
]

_INITS = ("k-means++", "batched-k-means++", "random")
# Rounds of the batched seeding: K / rounds seeds are drawn per round, so the work is one Lloyd pass in
# `rounds` compute-bound GEMMs instead of K memory-bound matrix-vector products.
_DEFAULT_BATCHED_INIT_ROUNDS = 16
_DEFAULT_CHUNK_ELEMENTS = 2**24
# k-means++ is sequential in K and each step reads the whole (sub)sample once (a memory-bound matrix-vector
# product), so it costs K * m * d reads for a sample of m rows. Capping m at about 32 points per cluster keeps
# dozens of candidates per seed while bounding that cost when n >> K; Lloyd then runs on all points.
_DEFAULT_INIT_POINTS_PER_CLUSTER = 32


@dataclass
class KMeansResult:
    """Outcome of a k-means run.

    Attributes:
        centroids: ``[K, d]`` cluster centres (float32, or float64 when the input was float64).
        labels: ``[n]`` 0-based index of each point's nearest centroid in ``centroids``; always the result of
            an assignment *after* the last centroid update, so labels and centroids are mutually consistent.
        inertia: sum over points of the squared Euclidean distance to their assigned centroid.
        num_iterations: number of Lloyd updates performed (0 when ``max_iterations`` is 0 or K == n).
    """

    centroids: Tensor
    labels: Tensor
    inertia: float
    num_iterations: int


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (tests rely on it to avoid ties); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_points(x: Tensor, name: str = "x") -> None:
    """Reject inputs that would make k-means silently wrong (wrong rank, empty, integer dtype)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)} ({x.dim()}-D)")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_finite(x: Tensor, chunk_elements: int, name: str = "x") -> None:
    """Check finiteness chunk by chunk so that a 1M x 300 input does not need a full boolean copy."""
    ok = torch.ones((), dtype=torch.bool, device=x.device)
    for start, stop in _row_chunks(x.shape[0], x.shape[1], chunk_elements):
        ok &= torch.isfinite(x[start:stop]).all()
    if not bool(ok):
        raise ValueError(f"{name} must contain only finite values, but it contains NaN or +/-inf")


def _check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_num_clusters(num_clusters: int, n: int) -> None:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise ValueError(
            f"num_clusters must be an integer in [1, n] where n = {n} is the number of points, got {num_clusters!r}"
        )


def _row_chunks(num_rows: int, row_width: int, chunk_elements: int) -> Iterator[tuple[int, int]]:
    """Yield ``[start, stop)`` row ranges whose ``rows x row_width`` block holds at most ``chunk_elements``.

    At least one row is always yielded per chunk, so a single row wider than ``chunk_elements`` still works.
    """
    rows = max(1, chunk_elements // max(1, row_width))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


# ----------------------------------------------------------------------------------------------------------
# assignment
# ----------------------------------------------------------------------------------------------------------


def _assign(x: Tensor, centroids: Tensor, chunk_elements: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every row of ``x`` and the squared distance to it.

    The argmin uses the expansion ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per row and cannot change
    the argmin), which turns the heavy part into one GEMM per chunk. The returned distance, however, is
    recomputed exactly as ``||x - c_label||^2``: the expansion suffers from cancellation in float32 and the
    inertia drives both the stopping rule and the empty-cluster re-seeding, so it should be accurate (and
    exactly 0 for a point sitting on its centroid).
    """
    n = x.shape[0]
    num_clusters, dim = centroids.shape
    centroid_sq = centroids.pow(2).sum(dim=1)
    labels = torch.empty(n, dtype=torch.long, device=x.device)
    min_sq = torch.empty(n, dtype=x.dtype, device=x.device)
    # A chunk holds a [rows, K] distance block and a [rows, d] difference block; bound the larger one.
    for start, stop in _row_chunks(n, max(num_clusters, dim), chunk_elements):
        block = x[start:stop]
        scores = torch.addmm(centroid_sq, block, centroids.T, beta=1.0, alpha=-2.0)
        chunk_labels = scores.argmin(dim=1)
        labels[start:stop] = chunk_labels
        min_sq[start:stop] = (block - centroids.index_select(0, chunk_labels)).pow(2).sum(dim=1)
    return labels, min_sq


def assign_to_centroids(x: Tensor, centroids: Tensor, chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Index (0-based) of the nearest centroid for each row of ``x``, computed in bounded memory.

    Used by :func:`kmeans` internally and to give items added after clustering an interest id without
    re-clustering. Each chunk's ``[rows, K]`` distance block holds at most ``chunk_elements`` floats.
    """
    _check_points(x, "x")
    _check_points(centroids, "centroids")
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"centroids must have the same dimension as x ({x.shape[1]}), got shape {tuple(centroids.shape)}"
        )
    _check_positive_int(chunk_elements, "chunk_elements")
    dtype = _compute_dtype(torch.promote_types(x.dtype, centroids.dtype))
    with torch.no_grad():
        labels, _ = _assign(x.to(dtype), centroids.to(device=x.device, dtype=dtype), chunk_elements)
    return labels


# ----------------------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------------------


def _kmeans_plus_plus(x: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """Indices of D^2-sampled seeds (k-means++), without a host sync inside the loop.

    A running minimum squared distance to the chosen seeds is kept and updated with one matrix-vector product
    per new seed. Sampling inverts the float64 cumulative sum with ``searchsorted`` on pre-drawn uniforms, so
    the loop stays on the device; chosen points get distance exactly 0 and therefore are never drawn twice
    while any point with positive distance remains.
    """
    m = x.shape[0]
    device = x.device
    x_sq = torch.einsum("ij,ij->i", x, x)
    chosen = torch.empty(num_clusters, dtype=torch.long, device=device)
    idx = torch.randint(m, (1,), generator=generator, device=device)
    uniforms = torch.rand(max(num_clusters - 1, 0), generator=generator, device=device, dtype=torch.float64)
    chosen[0:1] = idx
    min_sq = torch.full((m,), math.inf, dtype=x.dtype, device=device)
    for k in range(1, num_clusters):
        centre = x.index_select(0, idx)[0]
        dist = torch.addmv(x_sq, x, centre, alpha=-2.0).add_(centre.pow(2).sum()).clamp_min_(0.0)
        torch.minimum(min_sq, dist, out=min_sq)
        min_sq.index_fill_(0, idx, 0.0)
        cumulative = torch.cumsum(min_sq, dim=0, dtype=torch.float64)
        target = (uniforms[k - 1] * cumulative[-1]).reshape(1)
        # First index whose cumulative mass exceeds the target: a point with zero distance can only be hit
        # when every distance is zero (fewer distinct points than clusters); clamp keeps the index valid then.
        idx = torch.searchsorted(cumulative, target, right=True).clamp_max_(m - 1)
        chosen[k : k + 1] = idx
    return chosen


def _batched_kmeans_plus_plus(x: Tensor, num_clusters: int, generator: torch.Generator, chunk_elements: int) -> Tensor:
    """Indices of seeds drawn in rounds: each round takes ~K / rounds distinct points with probability
    proportional to the squared distance to the seeds so far (as k-means|| does, without its reduction step).

    One round updates the running minimum distance with a chunked ``[rows, B]`` GEMM, so seeding costs about
    one Lloyd pass instead of K sequential passes over the sample; the first round is uniform. Seeds within a
    round do not repel each other, so the start is slightly worse than k-means++ and Lloyd corrects it.
    """
    m = x.shape[0]
    rounds = min(_DEFAULT_BATCHED_INIT_ROUNDS, num_clusters)
    per_round = math.ceil(num_clusters / rounds)
    x_sq = torch.einsum("ij,ij->i", x, x)
    min_sq = torch.full((m,), math.inf, dtype=x.dtype, device=x.device)
    chosen: list[Tensor] = []
    taken = 0
    while taken < num_clusters:
        weights = torch.ones_like(min_sq) if not chosen else min_sq  # the first round is uniform
        available = int(torch.count_nonzero(weights))  # one host sync per round, not per seed
        size = min(per_round, num_clusters - taken)
        if available >= size:
            picked = torch.multinomial(weights, size, replacement=False, generator=generator)
        else:  # fewer distinct points left than seeds: take every one of them, then unchosen duplicates
            free = torch.ones(m, dtype=torch.bool, device=x.device)
            free[torch.cat(chosen)] = False
            positive = torch.nonzero(weights > 0).squeeze(1)
            free[positive] = False
            picked = torch.cat([positive, torch.nonzero(free).squeeze(1)[: size - available]])
        chosen.append(picked)
        taken += size
        centres = x.index_select(0, picked)
        centre_sq = centres.pow(2).sum(dim=1)
        for start, stop in _row_chunks(m, size, chunk_elements):
            dist = torch.addmm(centre_sq, x[start:stop], centres.T, beta=1.0, alpha=-2.0)
            dist = dist.min(dim=1).values.add_(x_sq[start:stop]).clamp_min_(0.0)
            torch.minimum(min_sq[start:stop], dist, out=min_sq[start:stop])
        min_sq.index_fill_(0, picked, 0.0)
    return torch.cat(chosen)


def kmeans_init(
    x: Tensor,
    num_clusters: int,
    *,
    init: str = "k-means++",
    seed: int = 0,
    init_sample_size: int | None = None,
) -> Tensor:
    """Initial centroids ``[K, d]`` chosen among the rows of ``x``, deterministic for ``seed`` on a device.

    ``init="k-means++"`` draws seeds with probability proportional to the squared distance to the nearest
    seed so far; ``init="batched-k-means++"`` draws them the same way in 16 rounds of K / 16 seeds (about the
    cost of one Lloyd pass: the choice for a cold start on a million tokens); ``init="random"`` takes K
    distinct random rows. k-means++ is sequential in K and each step
    reads the whole sample, so it runs on a seeded random subsample of ``init_sample_size`` rows; the default
    ``min(n, 32 * K)`` keeps dozens of candidates per cluster. Its cost is K memory-bound passes over that
    sample, which usually exceeds one (compute-bound) Lloyd pass, so when re-clustering every epoch prefer
    warm-starting :func:`kmeans` with the previous centroids. Pass ``init_sample_size=n`` to seed from all
    points. Ignored by ``init="random"``.

    A local ``torch.Generator`` on ``x.device`` is used; the global RNG is never touched. Returned centroids
    are float32 (float64 for float64 input).
    """
    _check_points(x, "x")
    _check_num_clusters(num_clusters, x.shape[0])
    _check_init(init, init_sample_size, num_clusters)
    _check_finite(x, _DEFAULT_CHUNK_ELEMENTS, "x")
    return _kmeans_init(x, num_clusters, init=init, seed=seed, init_sample_size=init_sample_size)


def _check_init(init: str, init_sample_size: int | None, num_clusters: int) -> None:
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if init_sample_size is None:
        return
    if isinstance(init_sample_size, bool) or not isinstance(init_sample_size, int):
        raise TypeError(f"init_sample_size must be an integer or None, got {init_sample_size!r}")
    if init_sample_size < num_clusters:
        raise ValueError(f"init_sample_size must be >= num_clusters ({num_clusters}) or None, got {init_sample_size}")


def _kmeans_init(x: Tensor, num_clusters: int, *, init: str, seed: int, init_sample_size: int | None) -> Tensor:
    """:func:`kmeans_init` without validation (the caller has validated)."""
    n = x.shape[0]
    dtype = _compute_dtype(x.dtype)
    with torch.no_grad():
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
        if init == "random":
            indices = torch.randperm(n, generator=generator, device=x.device)[:num_clusters]
            return x.index_select(0, indices).to(dtype)
        if init_sample_size is None:
            init_sample_size = num_clusters * _DEFAULT_INIT_POINTS_PER_CLUSTER
        sample_size = min(n, init_sample_size)
        if sample_size < n:
            subset = torch.randperm(n, generator=generator, device=x.device)[:sample_size]
            sample = x.index_select(0, subset).to(dtype)
        else:
            sample = x.to(dtype)
        if init == "batched-k-means++":
            chosen = _batched_kmeans_plus_plus(sample, num_clusters, generator, _DEFAULT_CHUNK_ELEMENTS)
        else:
            chosen = _kmeans_plus_plus(sample, num_clusters, generator)
        return sample.index_select(0, chosen)


# ----------------------------------------------------------------------------------------------------------
# Lloyd iterations
# ----------------------------------------------------------------------------------------------------------


def _update_centroids(x: Tensor, labels: Tensor, min_sq: Tensor, centroids: Tensor) -> Tensor:
    """Means of the current clusters; empty clusters are re-seeded with the points farthest from a centroid.

    Sums use ``index_add_`` on CPU (sequential, deterministic) and ``index_put_(accumulate=True)`` elsewhere,
    because CUDA's ``index_add_`` accumulates with atomics in a run-dependent order while ``index_put_`` with
    accumulation sorts the indices first, so repeated runs give identical bits.

    Empty cluster j (in ascending order) receives the j-th farthest point (stable descending order of the
    squared distance to the current centroid, ties broken by lower row index), so the re-seeded points are
    distinct and the choice is deterministic.
    """
    num_clusters = centroids.shape[0]
    sums = torch.zeros_like(centroids)
    if x.device.type == "cpu":
        sums.index_add_(0, labels, x)
    else:
        sums.index_put_((labels,), x, accumulate=True)
    counts = torch.bincount(labels, minlength=num_clusters)
    nonempty = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    new_centroids = torch.where(nonempty.unsqueeze(1), means, centroids)
    empty = torch.nonzero(~nonempty).squeeze(1)
    if empty.numel() > 0:
        farthest = torch.sort(min_sq, descending=True, stable=True).indices[: empty.numel()]
        new_centroids[empty] = x.index_select(0, farthest)
    return new_centroids


def _converged(previous_inertia: float, inertia: float, tolerance: float) -> bool:
    """Relative decrease of inertia below ``tolerance`` (an inertia of 0 cannot decrease any further)."""
    return previous_inertia - inertia <= tolerance * previous_inertia


def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    max_iterations: int = 10,
    tolerance: float = 1e-4,
    init: str = "k-means++",
    seed: int = 0,
    chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS,
    init_sample_size: int | None = None,
    initial_centroids: Tensor | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``num_clusters`` groups with k-means (Lloyd's algorithm).

    Runs on ``x.device`` under ``torch.no_grad()``; half/bfloat16 inputs are computed in float32, float64
    stays float64. The result is deterministic for a given ``seed`` on a given device (a local generator is
    used).

    Args:
        x: ``[n, d]`` points (finite).
        num_clusters: K, in ``[1, n]``. With K == n (and no ``initial_centroids``) each point is its own
            cluster.
        max_iterations: maximum number of Lloyd updates (>= 0).
        tolerance: stop once the relative decrease of inertia after an update is at most ``tolerance``.
        init: ``"k-means++"``, ``"batched-k-means++"`` or ``"random"``, see :func:`kmeans_init`. Ignored with
            ``initial_centroids``.
        seed: seed of the local generator used by the initialisation.
        chunk_elements: upper bound on the floats held by one chunk's ``[rows, K]`` distance block, so memory
            stays bounded (1M points x 20k centroids uses ~64 MiB of scratch at the default).
        init_sample_size: rows used by the k-means++ seeding, see :func:`kmeans_init`.
        initial_centroids: ``[K, d]`` starting centroids (e.g. the previous epoch's vocabulary for a warm
            start, or the output of :func:`kmeans_init` to compare against :func:`reference_kmeans`).

    Each iteration assigns every point to its nearest centroid, recomputes the means and re-seeds empty
    clusters (see ``_update_centroids``); a final assignment after the last update gives labels consistent
    with the returned centroids.
    """
    _check_points(x, "x")
    n, dim = x.shape
    _check_num_clusters(num_clusters, n)
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be an integer >= 0, got {max_iterations!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    _check_init(init, init_sample_size, num_clusters)
    _check_positive_int(chunk_elements, "chunk_elements")
    _check_finite(x, chunk_elements, "x")
    if initial_centroids is not None:
        _check_points(initial_centroids, "initial_centroids")
        if tuple(initial_centroids.shape) != (num_clusters, dim):
            raise ValueError(
                f"initial_centroids must have shape [num_clusters, d] = [{num_clusters}, {dim}], "
                f"got {tuple(initial_centroids.shape)}"
            )
        _check_finite(initial_centroids, chunk_elements, "initial_centroids")

    dtype = _compute_dtype(x.dtype)
    with torch.no_grad():
        points = x.to(dtype)
        if initial_centroids is None and num_clusters == n:
            labels = torch.arange(n, device=x.device)
            return KMeansResult(centroids=points.clone(), labels=labels, inertia=0.0, num_iterations=0)
        if initial_centroids is None:
            centroids = _kmeans_init(points, num_clusters, init=init, seed=seed, init_sample_size=init_sample_size)
        else:
            centroids = initial_centroids.to(device=x.device, dtype=dtype).clone()

        labels, min_sq = _assign(points, centroids, chunk_elements)
        inertia = float(min_sq.sum(dtype=torch.float64))
        iterations = 0
        while iterations < max_iterations:
            centroids = _update_centroids(points, labels, min_sq, centroids)
            iterations += 1
            labels, min_sq = _assign(points, centroids, chunk_elements)
            new_inertia = float(min_sq.sum(dtype=torch.float64))
            done = _converged(inertia, new_inertia, tolerance)
            inertia = new_inertia
            if done:
                break
    return KMeansResult(centroids=centroids, labels=labels, inertia=inertia, num_iterations=iterations)


def reference_kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    max_iterations: int = 10,
    tolerance: float = 1e-4,
    initial_centroids: Tensor,
) -> KMeansResult:
    """Deliberately plain k-means used as a test oracle for :func:`kmeans`.

    Full ``[n, K, d]`` differences, a Python loop over iterations and clusters, and the same empty-cluster
    and stopping rules: empty cluster j (ascending) takes the j-th farthest point from its current centroid
    (Python's stable sort, ties to the lower index); stop when the relative inertia decrease is at most
    ``tolerance``.
    Only meant for small inputs.
    """
    with torch.no_grad():
        n = x.shape[0]
        centroids = initial_centroids.clone().to(x.dtype)

        def assign(c: Tensor) -> tuple[Tensor, Tensor]:
            squared = ((x[:, None, :] - c[None, :, :]) ** 2).sum(dim=-1)
            labels = squared.argmin(dim=1)
            return labels, squared[torch.arange(n), labels]

        labels, dist = assign(centroids)
        inertia = dist.sum().item()
        iterations = 0
        while iterations < max_iterations:
            new_centroids = centroids.clone()
            empty = []
            for k in range(num_clusters):
                members = x[labels == k]
                if members.shape[0] > 0:
                    new_centroids[k] = members.mean(dim=0)
                else:
                    empty.append(k)
            farthest_first = sorted(range(n), key=lambda i: -dist[i].item())
            for k, i in zip(empty, farthest_first):
                new_centroids[k] = x[i]
            centroids = new_centroids
            iterations += 1
            labels, dist = assign(centroids)
            new_inertia = dist.sum().item()
            done = inertia - new_inertia <= tolerance * inertia
            inertia = new_inertia
            if done:
                break
    return KMeansResult(centroids=centroids, labels=labels, inertia=inertia, num_iterations=iterations)


# ----------------------------------------------------------------------------------------------------------
# vocabulary size and interest sets
# ----------------------------------------------------------------------------------------------------------


def num_interests(num_tokens: int, interest_ratio: float) -> int:
    """Vocabulary size K = max(1, ceil(interest_ratio * num_tokens)), capped at ``num_tokens``.

    The product is computed with the ratio's shortest decimal form as an exact fraction, so that e.g.
    ``0.07 * 100`` gives 7 rather than ``ceil(7.000000000000001) = 8``.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    if isinstance(interest_ratio, bool) or not isinstance(interest_ratio, (int, float)):
        raise TypeError(f"interest_ratio must be a positive finite number, got {interest_ratio!r}")
    if not math.isfinite(interest_ratio) or interest_ratio <= 0:
        raise ValueError(f"interest_ratio must be a positive finite number, got {interest_ratio!r}")
    exact = Fraction(repr(float(interest_ratio))) * num_tokens
    return min(num_tokens, max(1, math.ceil(exact)))


def _gather_interests(item_ids: Tensor, interest_lookups: Sequence[Tensor]) -> Tensor:
    """Validate and look up every modality's interest id per position: ``[B, M * L]``."""
    if not isinstance(item_ids, Tensor) or item_ids.dim() != 2 or item_ids.dtype != torch.long:
        shape = tuple(item_ids.shape) if isinstance(item_ids, Tensor) else type(item_ids).__name__
        dtype = item_ids.dtype if isinstance(item_ids, Tensor) else None
        raise ValueError(f"item_ids must be a 2-D int64 tensor [B, L], got {shape} with dtype {dtype}")
    if len(interest_lookups) == 0:
        raise ValueError("interest_lookups must contain at least one modality lookup, got an empty sequence")
    for m, lookup in enumerate(interest_lookups):
        if not isinstance(lookup, Tensor) or lookup.dim() != 1 or lookup.dtype != torch.long:
            shape = tuple(lookup.shape) if isinstance(lookup, Tensor) else type(lookup).__name__
            raise ValueError(f"interest_lookups[{m}] must be a 1-D int64 tensor [N + 1], got {shape}")
    return torch.cat([lookup.to(item_ids.device)[item_ids] for lookup in interest_lookups], dim=1)


def interest_sets(item_ids: Tensor, interest_lookups: Sequence[Tensor], static_width: bool = False) -> Tensor:
    """Per history, the ascending set of non-zero interest ids its items touch, left-compacted: ``[B, Q]``.

    Args:
        item_ids: ``[B, L]`` item ids, 0 = padding.
        interest_lookups: one ``[N + 1]`` int64 tensor per modality mapping item id -> interest id (row 0 must
            be 0 so that padding contributes nothing; a 0 anywhere means "no interest", e.g. a missing image).

    Returns:
        ``[B, Q]`` int64, each row's unique non-zero ids ascending then 0-padded on the right, with Q the
        largest set size in the batch (Q >= 1 even when every set is empty, so downstream code never sees a
        0-width tensor); with `static_width`, Q = M x L (the most a row can hold), which needs no read-back of
        the set sizes from the device.

    Fully vectorised: sort each row, keep entries that are non-zero and differ from their left neighbour, and
    scatter them to their rank (cumsum of the keep mask); dropped entries go to a scratch column.
    """
    ids = _gather_interests(item_ids, interest_lookups)
    batch = ids.shape[0]
    if ids.shape[1] == 0:
        return torch.zeros(batch, 1, dtype=torch.long, device=ids.device)
    ordered = ids.sort(dim=1).values
    keep = ordered != 0
    keep[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    if static_width:
        width = ids.shape[1]
    else:
        width = max(1, int(keep.sum(dim=1).max())) if batch > 0 else 1
    rank = keep.cumsum(dim=1) - 1
    target = torch.where(keep, rank, torch.full_like(rank, width))
    out = torch.zeros(batch, width + 1, dtype=torch.long, device=ids.device)
    out.scatter_(1, target, torch.where(keep, ordered, torch.zeros_like(ordered)))
    return out[:, :width].contiguous()


def reference_interest_sets(item_ids: Tensor, interest_lookups: Sequence[Tensor]) -> Tensor:
    """Row-by-row Python version of :func:`interest_sets`, used as a test oracle."""
    ids = _gather_interests(item_ids, interest_lookups)
    rows = [sorted(set(row) - {0}) for row in ids.tolist()]
    width = max([1] + [len(r) for r in rows])
    padded = [r + [0] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=ids.device).reshape(len(rows), width)
