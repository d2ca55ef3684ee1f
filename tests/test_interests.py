"""Tests for the interest vocabulary: k-means, vocabulary size and per-history interest sets."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_missrec.interests import (
    KMeansResult,
    _row_chunks,
    assign_to_centroids,
    interest_sets,
    kmeans,
    kmeans_init,
    num_interests,
    reference_interest_sets,
    reference_kmeans,
)

# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _blobs(
    num_blobs: int, per_blob: int, dim: int, seed: int, spread: float = 10.0, noise: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs (shuffled) and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_blobs, dim, generator=g) * spread
    truth = torch.arange(num_blobs).repeat_interleave(per_blob)
    x = centres[truth] + noise * torch.randn(num_blobs * per_blob, dim, generator=g)
    perm = torch.randperm(x.shape[0], generator=g)
    return x[perm], truth[perm]


def _same_partition(labels: torch.Tensor, truth: torch.Tensor, k: int) -> bool:
    """True when ``labels`` equals ``truth`` up to a relabelling (a bijection between cluster ids)."""
    table = torch.zeros(k, k, dtype=torch.long)
    table.index_put_((labels, truth), torch.ones_like(labels), accumulate=True)
    nonzero = table > 0
    return bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all())


def _within_cluster_inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    total = 0.0
    for j in range(k):
        members = x[labels == j].double()
        if members.shape[0]:
            total += float(((members - members.mean(0)) ** 2).sum())
    return total


# ----------------------------------------------------------------------------------------------------------
# interest_sets
# ----------------------------------------------------------------------------------------------------------


@st.composite
def _histories(draw: st.DrawFn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    num_items = draw(st.integers(1, 12))
    num_modalities = draw(st.integers(1, 2))
    vocab = draw(st.integers(1, 6))
    lookups = []
    for _ in range(num_modalities):
        values = draw(st.lists(st.integers(0, vocab), min_size=num_items, max_size=num_items))
        lookups.append(torch.tensor([0, *values], dtype=torch.long))
    batch = draw(st.integers(0, 5))
    length = draw(st.integers(0, 7))
    flat = draw(st.lists(st.integers(0, num_items), min_size=batch * length, max_size=batch * length))
    item_ids = torch.tensor(flat, dtype=torch.long).reshape(batch, length)
    # Right-padding is the common layout; also exercise it explicitly on some rows.
    if batch and length and draw(st.booleans()):
        item_ids[0, draw(st.integers(0, length - 1)) :] = 0
    return item_ids, lookups


@settings(deadline=None, max_examples=150)
@given(_histories())
def test_interest_sets_matches_reference(case: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    item_ids, lookups = case
    fast = interest_sets(item_ids, lookups)
    slow = reference_interest_sets(item_ids, lookups)
    assert fast.dtype == torch.long
    assert fast.shape == slow.shape
    assert torch.equal(fast, slow)


@settings(deadline=None, max_examples=60)
@given(_histories(), st.randoms(use_true_random=False))
def test_interest_sets_order_invariant(case: tuple[torch.Tensor, list[torch.Tensor]], rnd) -> None:
    item_ids, lookups = case
    length = item_ids.shape[1]
    perm = list(range(length))
    rnd.shuffle(perm)
    assert torch.equal(interest_sets(item_ids[:, perm], lookups), interest_sets(item_ids, lookups))


@settings(deadline=None, max_examples=60)
@given(_histories())
def test_static_width_is_the_same_sets_padded_to_every_slot(case: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    item_ids, lookups = case
    exact = interest_sets(item_ids, lookups)
    static = interest_sets(item_ids, lookups, static_width=True)
    assert static.shape == (item_ids.shape[0], max(1, item_ids.shape[1] * len(lookups)))
    assert torch.equal(static[:, : exact.shape[1]], exact) and not static[:, exact.shape[1] :].any()


def test_interest_sets_shape_and_content() -> None:
    text = torch.tensor([0, 3, 1, 3, 0, 2])
    image = torch.tensor([0, 5, 0, 4, 4, 0])  # items 2 and 5 have no image interest
    item_ids = torch.tensor([[1, 2, 3, 0], [0, 0, 0, 0], [4, 5, 5, 0]])
    out = interest_sets(item_ids, [text, image])
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 3, 4, 5], [0, 0, 0, 0], [2, 4, 0, 0]]


def test_interest_sets_all_padding_has_width_one() -> None:
    lookups = [torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2])]
    out = interest_sets(torch.zeros(3, 4, dtype=torch.long), lookups)
    assert out.shape == (3, 1)
    assert out.dtype == torch.long
    assert not out.any()
    # Items whose every modality maps to 0 (missing) behave like padding.
    out = interest_sets(torch.tensor([[1, 2]]), [torch.tensor([0, 0, 0])])
    assert out.tolist() == [[0]]


def test_interest_sets_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="item_ids must be a 2-D int64"):
        interest_sets(torch.tensor([1, 2]), [torch.tensor([0, 1, 2])])
    with pytest.raises(ValueError, match="item_ids must be a 2-D int64"):
        interest_sets(torch.tensor([[1.0]]), [torch.tensor([0, 1])])
    with pytest.raises(ValueError, match="at least one modality"):
        interest_sets(torch.tensor([[1]]), [])
    with pytest.raises(ValueError, match=r"interest_lookups\[1\]"):
        interest_sets(torch.tensor([[1]]), [torch.tensor([0, 1]), torch.tensor([[0, 1]])])


# ----------------------------------------------------------------------------------------------------------
# kmeans vs reference
# ----------------------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 30),
    dim=st.integers(1, 4),
    k_fraction=st.floats(0.0, 1.0),
    max_iterations=st.integers(0, 8),
    tolerance=st.sampled_from([0.0, 1e-4, 1e-2]),
    init=st.sampled_from(["k-means++", "batched-k-means++", "random"]),
    far_centroids=st.integers(0, 2),
)
def test_kmeans_matches_reference(
    seed: int,
    n: int,
    dim: int,
    k_fraction: float,
    max_iterations: int,
    tolerance: float,
    init: str,
    far_centroids: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    k = max(1, min(n, round(k_fraction * n)))
    start = kmeans_init(x, k, init=init, seed=seed)
    assert start.shape == (k, dim) and start.dtype == torch.float64
    # Centroids far from every point start empty and exercise the re-seeding rule.
    for j in range(min(far_centroids, k)):
        start[j] = 1e3 * (j + 1)
    fast = kmeans(x, k, max_iterations=max_iterations, tolerance=tolerance, initial_centroids=start)
    slow = reference_kmeans(x, k, max_iterations=max_iterations, tolerance=tolerance, initial_centroids=start)
    assert fast.num_iterations == slow.num_iterations
    assert torch.equal(fast.labels, slow.labels)
    torch.testing.assert_close(fast.centroids, slow.centroids, rtol=1e-9, atol=1e-9)
    assert math.isclose(fast.inertia, slow.inertia, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunking_does_not_change_result(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    tiny = kmeans(x, 12, seed=seed, chunk_elements=1, tolerance=0.0, max_iterations=15)
    small = kmeans(x, 12, seed=seed, chunk_elements=100, tolerance=0.0, max_iterations=15)
    huge = kmeans(x, 12, seed=seed, chunk_elements=2**30, tolerance=0.0, max_iterations=15)
    for other in (small, huge):
        assert torch.equal(tiny.labels, other.labels)
        torch.testing.assert_close(tiny.centroids, other.centroids, rtol=1e-12, atol=1e-12)
        assert tiny.num_iterations == other.num_iterations


@settings(deadline=None, max_examples=100)
@given(st.integers(1, 500), st.integers(1, 300), st.integers(1, 5000))
def test_row_chunks_cover_rows_within_budget(num_rows: int, width: int, budget: int) -> None:
    chunks = list(_row_chunks(num_rows, width, budget))
    assert chunks[0][0] == 0 and chunks[-1][1] == num_rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    for start, stop in chunks:
        assert stop > start
        assert (stop - start) * width <= budget or stop - start == 1


def test_assign_to_centroids_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(257, 7, generator=g, dtype=torch.float64)
    c = torch.randn(19, 7, generator=g, dtype=torch.float64)
    expected = torch.cdist(x, c).argmin(dim=1)
    assert torch.equal(assign_to_centroids(x, c), expected)
    assert torch.equal(assign_to_centroids(x, c, chunk_elements=20), expected)
    # Half-precision inputs are computed in float32 and still agree on well-separated centroids.
    xb, truth = _blobs(4, 20, 8, seed=5)
    centres = torch.stack([xb[truth == j].mean(0) for j in range(4)])
    assert torch.equal(assign_to_centroids(xb.bfloat16(), centres.bfloat16()), truth)


# ----------------------------------------------------------------------------------------------------------
# kmeans behaviour
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["k-means++", "batched-k-means++"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_planted_clusters(seed: int, init: str) -> None:
    x, truth = _blobs(8, 40, 16, seed=seed)
    result = kmeans(x, 8, seed=seed, init=init)
    assert isinstance(result, KMeansResult)
    assert result.centroids.shape == (8, 16) and result.centroids.dtype == torch.float32
    assert result.labels.shape == (320,) and result.labels.dtype == torch.long
    assert _same_partition(result.labels, truth, 8)
    optimum = _within_cluster_inertia(x, truth, 8)
    assert math.isclose(result.inertia, optimum, rel_tol=1e-3)
    random_one_step = kmeans(x, 8, seed=seed, init="random", max_iterations=1)
    assert result.inertia < random_one_step.inertia


def test_kmeans_result_is_self_consistent() -> None:
    x, _ = _blobs(5, 30, 6, seed=11, spread=1.0, noise=1.0)  # overlapping blobs
    result = kmeans(x, 5, seed=0, max_iterations=3, tolerance=0.0)
    assert torch.equal(assign_to_centroids(x, result.centroids), result.labels)
    recomputed = float(((x - result.centroids[result.labels]) ** 2).sum())
    assert math.isclose(result.inertia, recomputed, rel_tol=1e-5)
    assert result.num_iterations == 3


def test_kmeans_converged_result_is_a_fixed_point() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    result = kmeans(x, 6, seed=0, max_iterations=200, tolerance=0.0)
    assert result.num_iterations < 200
    for j in range(6):
        torch.testing.assert_close(result.centroids[j], x[result.labels == j].mean(0))
    again = kmeans(x, 6, initial_centroids=result.centroids, max_iterations=5, tolerance=0.0)
    assert torch.equal(again.labels, result.labels)
    assert again.num_iterations == 1


def test_kmeans_inertia_does_not_increase_with_iterations() -> None:
    x, _ = _blobs(6, 50, 5, seed=7, spread=1.0, noise=1.0)
    inertias = [kmeans(x, 10, seed=1, max_iterations=i, tolerance=0.0).inertia for i in range(6)]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(inertias))


@pytest.mark.parametrize("init", ["k-means++", "batched-k-means++", "random"])
def test_kmeans_is_deterministic_and_leaves_global_rng_alone(init: str) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2000, 8, generator=g)
    rng_before = torch.get_rng_state()
    first = kmeans(x, 30, seed=123, init=init, init_sample_size=300, max_iterations=3)
    second = kmeans(x, 30, seed=123, init=init, init_sample_size=300, max_iterations=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(first.centroids, second.centroids)
    assert torch.equal(first.labels, second.labels)
    assert first.inertia == second.inertia and first.num_iterations == second.num_iterations
    # Different seeds are allowed to differ, and on this data the seeds themselves do.
    assert not torch.equal(kmeans_init(x, 30, init=init, seed=1), kmeans_init(x, 30, init=init, seed=2))


def test_kmeans_plus_plus_picks_distinct_points() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 3, generator=g)
    rows = {tuple(r) for r in x.tolist()}
    for seed, init in itertools.product(range(5), ["k-means++", "batched-k-means++"]):
        seeds = kmeans_init(x, 50, init=init, seed=seed)
        assert torch.unique(seeds, dim=0).shape[0] == 50  # every point exactly once when K == n
        assert all(tuple(r) in rows for r in seeds.tolist())
    assert kmeans_init(x, 50, init="random", seed=0).unique(dim=0).shape[0] == 50


def test_batched_seeding_with_fewer_distinct_points_than_clusters() -> None:
    # 3 distinct points, two of them in the last rows; 40 seeds are drawn 3 per round, so after the first
    # round fewer distinct points are left than a round takes: every one of them must still become a seed.
    x = torch.tensor([[0.0, 0.0]] * 58 + [[1.0, 1.0], [5.0, 5.0]])
    for seed in range(5):
        seeds = kmeans_init(x, 40, init="batched-k-means++", seed=seed)
        assert seeds.shape == (40, 2)
        assert torch.unique(seeds, dim=0).shape[0] == 3


def test_batched_seeding_spreads_over_clusters() -> None:
    # D^2 sampling after the uniform first round: 40 seeds over 40 tight, far-apart blobs leave few blobs
    # without a seed, far fewer than uniform sampling would (about 40/e ~ 15 of them).
    x, truth = _blobs(40, 25, 8, seed=3)
    seeds = kmeans_init(x, 40, init="batched-k-means++", seed=0)
    hit = torch.unique(truth[assign_to_centroids(seeds, x)]).numel()
    assert hit >= 34


def test_empty_clusters_are_reseeded_with_farthest_points() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(100, 4, generator=g, dtype=torch.float64)
    start = torch.cat([x[:3], torch.full((2, 4), 1e3, dtype=torch.float64)])
    one = kmeans(x, 5, initial_centroids=start, max_iterations=1, tolerance=0.0)
    # Both far centroids were empty; they become the two points farthest from their initial centroid.
    initial_dist = torch.cdist(x, start[:3]).min(dim=1).values
    farthest = initial_dist.argsort(descending=True)[:2]
    torch.testing.assert_close(one.centroids[3:], x[farthest])
    counts = torch.bincount(one.labels, minlength=5)
    assert (counts[3:] >= 1).all()
    full = kmeans(x, 5, initial_centroids=start, max_iterations=50)
    assert (torch.bincount(full.labels, minlength=5) >= 1).all()


def test_kmeans_edge_cluster_counts() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 3, generator=g)
    own = kmeans(x, 20)
    assert own.inertia == 0.0 and torch.equal(own.labels, torch.arange(20))
    torch.testing.assert_close(own.centroids, x)
    single = kmeans(x, 1)
    torch.testing.assert_close(single.centroids[0], x.mean(0))
    assert not single.labels.any()
    zero_steps = kmeans(x, 4, max_iterations=0, seed=0)
    assert zero_steps.num_iterations == 0
    torch.testing.assert_close(zero_steps.centroids, kmeans_init(x, 4, seed=0))


def test_kmeans_half_precision_input() -> None:
    x, truth = _blobs(4, 25, 8, seed=12)
    result = kmeans(x.to(torch.bfloat16), 4, seed=0)
    assert result.centroids.dtype == torch.float32
    assert _same_partition(result.labels, truth, 4)


def test_kmeans_errors_are_informative() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"num_clusters.*\[1, n\].*n = 10.*got 0"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match=r"num_clusters.*got 11"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match=r"x must be 2-D.*\(10,\)"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match=r"x must be a floating-point"):
        kmeans(torch.ones(10, 3, dtype=torch.long), 2)
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        kmeans(bad, 2)
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        kmeans(bad, 2, chunk_elements=3)
    with pytest.raises(ValueError, match=r"init must be one of.*k-means\+\+.*got 'kmeans'"):
        kmeans(x, 2, init="kmeans")
    with pytest.raises(ValueError, match="max_iterations"):
        kmeans(x, 2, max_iterations=-1)
    with pytest.raises(ValueError, match="tolerance"):
        kmeans(x, 2, tolerance=-0.1)
    with pytest.raises(ValueError, match="chunk_elements"):
        kmeans(x, 2, chunk_elements=0)
    with pytest.raises(ValueError, match=r"init_sample_size.*>= num_clusters \(4\).*got 2"):
        kmeans(x, 4, init_sample_size=2)
    with pytest.raises(ValueError, match=r"initial_centroids must have shape.*\[2, 3\]"):
        kmeans(x, 2, initial_centroids=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="centroids must have the same dimension"):
        assign_to_centroids(x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kmeans([[1.0, 2.0]], 1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# num_interests
# ----------------------------------------------------------------------------------------------------------


def test_num_interests_examples() -> None:
    assert num_interests(8770, 0.5) == 4385
    assert num_interests(10, 0.02) == 1
    assert num_interests(100, 0.07) == 7  # 0.07 * 100 == 7.000000000000001 in floating point
    assert num_interests(5, 3.0) == 5
    assert num_interests(1, 1e-9) == 1


@settings(deadline=None, max_examples=200)
@given(st.integers(1, 10**6), st.floats(1e-6, 2.0))
def test_num_interests_bounds(num_tokens: int, ratio: float) -> None:
    k = num_interests(num_tokens, ratio)
    assert 1 <= k <= num_tokens
    exact = Fraction(repr(ratio)) * num_tokens
    if 1 < k < num_tokens:
        assert k - 1 < exact <= k


def test_num_interests_errors() -> None:
    with pytest.raises(ValueError, match=r"num_tokens.*got 0"):
        num_interests(0, 0.5)
    with pytest.raises(ValueError, match=r"interest_ratio.*got 0"):
        num_interests(10, 0.0)
    with pytest.raises(ValueError, match="interest_ratio"):
        num_interests(10, float("nan"))
