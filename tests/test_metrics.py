"""Tests for modeling_missrec.metrics and the missrec_ranking evaluate module."""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_missrec.metrics import (
    EVALUATE_MODULE_PATH,
    RankingMetrics,
    RankingResult,
    metrics_from_ranks,
    reference_ranks,
    streaming_ranks,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------------
# helpers: an independent, loop-based oracle for the top-k, and a recording score_block
# ------------------------------------------------------------------------------------------------------


def brute_topk(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None, k: int
) -> tuple[list[list[float]], list[list[int]]]:
    """Per-row Python sort by (score desc, id asc); excluded (non-target) and -inf items never appear."""
    all_scores, all_items = [], []
    for row in range(scores.shape[0]):
        target = int(targets[row])
        excluded = set() if exclude is None else {int(i) for i in exclude[row]} - {0, target}
        candidates = [
            (float(scores[row, item]), item)
            for item in range(1, scores.shape[1])
            if item not in excluded and float(scores[row, item]) != -math.inf
        ]
        candidates.sort(key=lambda pair: (-pair[0], pair[1]))
        best = candidates[:k] + [(-math.inf, 0)] * max(0, k - len(candidates))
        all_scores.append([s for s, _ in best])
        all_items.append([i for _, i in best])
    return all_scores, all_items


class Recorder:
    """score_block over a precomputed matrix that records every (start, end) it is asked for."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.calls.append((start, end))
        return self.scores[:, start:end]


def run_streaming(scores, targets, exclude=None, block_size=8192, top_k=0) -> tuple[RankingResult, Recorder]:
    recorder = Recorder(scores)
    result = streaming_ranks(
        recorder,
        targets,
        num_items=scores.shape[1] - 1,
        block_size=block_size,
        exclude_items=exclude,
        top_k=top_k,
    )
    return result, recorder


@st.composite
def ranking_problems(draw, tied: bool):
    """Random (scores, targets, exclude, block_size, top_k); ``tied`` draws scores from {0, 1, 2, 3}."""
    batch = draw(st.integers(1, 6))
    num_items = draw(st.integers(1, 30))
    if tied:
        values = st.integers(0, 3).map(float)
    else:
        values = st.floats(-100, 100, allow_nan=False, width=32)
    flat = draw(st.lists(values, min_size=batch * (num_items + 1), max_size=batch * (num_items + 1)))
    scores = torch.tensor(flat, dtype=torch.float32).view(batch, num_items + 1)
    if draw(st.booleans()):
        scores[:, 0] = 1e6  # padding column with a huge score must never count
    targets = torch.tensor(draw(st.lists(st.integers(1, num_items), min_size=batch, max_size=batch)))
    exclude = None
    if draw(st.booleans()):
        length = draw(st.integers(1, 6))
        ids = draw(st.lists(st.integers(0, num_items), min_size=batch * length, max_size=batch * length))
        exclude = torch.tensor(ids).view(batch, length)
        if draw(st.booleans()):
            exclude[:, 0] = 0  # explicit padding
        if draw(st.booleans()):
            exclude[:, -1] = targets  # the target inside the excluded list must stay rankable
    block_size = draw(st.one_of(st.integers(1, num_items + 3), st.just(1), st.just(num_items + 100)))
    top_k = draw(st.integers(0, num_items + 3))
    return scores, targets, exclude, block_size, top_k


# ------------------------------------------------------------------------------------------------------
# streaming == reference
# ------------------------------------------------------------------------------------------------------


@FAST
@given(problem=ranking_problems(tied=True))
def test_streaming_matches_reference_with_ties(problem):
    scores, targets, exclude, block_size, top_k = problem
    result, recorder = run_streaming(scores, targets, exclude, block_size, top_k)
    assert torch.equal(result.ranks, reference_ranks(scores, targets, exclude))
    # the first pass: contiguous blocks covering 1..num_items exactly, never wider than block_size; then the
    # second pass: the blocks before the last target's block, again in order
    num_items = scores.shape[1] - 1
    first = len(range(1, num_items + 1, block_size))
    first_pass, second_pass = recorder.calls[:first], recorder.calls[first:]
    assert first_pass[0][0] == 1 and first_pass[-1][1] == num_items + 1
    assert all(a[1] == b[0] for a, b in zip(first_pass, first_pass[1:], strict=False))
    assert second_pass == first_pass[: int((targets.max() - 1) // block_size)]
    assert all(0 < end - start <= block_size for start, end in recorder.calls)

    if top_k == 0:
        assert result.topk_scores is None and result.topk_items is None
        return
    expected_scores, expected_items = brute_topk(scores, targets, exclude, top_k)
    assert result.topk_scores.shape == result.topk_items.shape == (scores.shape[0], top_k)
    # sorted score values agree (the required check) ...
    got_sorted = torch.sort(result.topk_scores, dim=1, descending=True).values
    assert torch.equal(got_sorted, torch.tensor(expected_scores, dtype=torch.float32))
    # ... and, because ties are broken towards the lower id, so do the exact item lists
    assert result.topk_items.tolist() == expected_items
    if exclude is not None:
        for row in range(scores.shape[0]):
            banned = {int(i) for i in exclude[row]} - {0, int(targets[row])}
            assert banned.isdisjoint(result.topk_items[row].tolist())


@FAST
@given(problem=ranking_problems(tied=False))
def test_streaming_matches_reference_continuous_scores(problem):
    scores, targets, exclude, block_size, top_k = problem
    result, _ = run_streaming(scores, targets, exclude, block_size, top_k)
    assert torch.equal(result.ranks, reference_ranks(scores, targets, exclude))
    if top_k:
        expected_scores, expected_items = brute_topk(scores, targets, exclude, top_k)
        assert torch.equal(result.topk_scores, torch.tensor(expected_scores, dtype=torch.float32))
        for row in range(scores.shape[0]):
            real = scores[row, 1:]
            if real.unique().numel() == real.numel():  # no ties: the item sets must match exactly
                assert set(result.topk_items[row].tolist()) == set(expected_items[row])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_streaming_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (8, 41), generator=gen).to(dtype)
    targets = torch.randint(1, 41, (8,), generator=gen)
    result, _ = run_streaming(scores, targets, block_size=7, top_k=5)
    assert torch.equal(result.ranks, reference_ranks(scores, targets))
    assert result.topk_scores.dtype == dtype
    _, expected_items = brute_topk(scores.float(), targets, None, 5)
    assert result.topk_items.tolist() == expected_items


def test_streaming_large_block_count_matches_reference():
    gen = torch.Generator().manual_seed(1)
    users, items = torch.randn(33, 16, generator=gen), torch.randn(2001, 16, generator=gen)
    scores = users @ items.T
    targets = torch.randint(1, 2001, (33,), generator=gen)
    exclude = torch.randint(0, 2001, (33, 50), generator=gen)
    result, recorder = run_streaming(scores, targets, exclude, block_size=128, top_k=20)
    blocks = math.ceil(2000 / 128)
    assert len(recorder.calls) == blocks + int((targets.max() - 1) // 128)  # the late rows' second pass
    assert torch.equal(result.ranks, reference_ranks(scores, targets, exclude))
    _, expected_items = brute_topk(scores, targets, exclude, 20)
    assert result.topk_items.tolist() == expected_items


def test_streaming_runs_without_grad_and_detaches():
    weights = torch.randn(4, 11, requires_grad=True)
    targets = torch.tensor([1, 5, 10, 3])

    def score_block(start: int, end: int) -> torch.Tensor:
        block = weights[:, start:end] * 2
        assert not block.requires_grad  # called under torch.no_grad()
        return block

    result = streaming_ranks(score_block, targets, num_items=10, block_size=3, top_k=2)
    assert torch.equal(result.ranks, reference_ranks(weights.detach() * 2, targets))
    assert not result.topk_scores.requires_grad


def test_streaming_nan_competitor_counts_against_target_and_is_never_recommended():
    scores = torch.tensor([[0.0, 1.0, float("nan"), 0.5, 2.0]])
    targets = torch.tensor([1])
    result, _ = run_streaming(scores, targets, block_size=2, top_k=4)
    assert result.ranks.tolist() == [3]  # item 4 (2.0) and item 2 (NaN) count against the target
    assert result.topk_items.tolist() == [[4, 1, 3, 0]]
    assert result.topk_scores[0, -1] == -math.inf


def test_streaming_empty_batch():
    result = streaming_ranks(
        lambda s, e: pytest.fail("score_block must not be called"),
        torch.zeros(0, dtype=torch.long),
        num_items=5,
        top_k=3,
    )
    assert result.ranks.shape == (0,) and result.topk_items.shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streaming_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (16, 301), generator=gen).float()
    targets = torch.randint(1, 301, (16,), generator=gen)
    exclude = torch.randint(0, 301, (16, 9), generator=gen)
    cpu, _ = run_streaming(scores, targets, exclude, block_size=64, top_k=10)
    gpu, _ = run_streaming(scores.cuda(), targets, exclude, block_size=64, top_k=10)
    assert gpu.ranks.is_cuda
    assert torch.equal(gpu.ranks.cpu(), cpu.ranks)
    assert torch.equal(gpu.topk_items.cpu(), cpu.topk_items)
    assert torch.equal(gpu.topk_scores.cpu(), cpu.topk_scores)


# ------------------------------------------------------------------------------------------------------
# hand-computed ranks and metrics
# ------------------------------------------------------------------------------------------------------


def test_hand_computed_ranks():
    #                    pad   1    2    3    4    5
    scores = torch.tensor(
        [
            [9.0, 0.9, 0.1, 0.2, 0.3, 0.4],  # target 1 is best (padding's 9.0 ignored) -> 1
            [0.0, 0.5, 0.7, 0.7, 0.1, 0.2],  # target 2 tied with item 3 -> pessimistic 2
            [0.0, 0.5, 0.6, 0.7, 0.8, 0.1],  # target 5 is worst -> 5
            [0.0, 0.5, 0.6, 0.7, 0.8, 0.1],  # target 1 behind 2, 3, 4 -> 4; excluding 3, 4 -> 2
        ]
    )
    targets = torch.tensor([1, 2, 5, 1])
    assert reference_ranks(scores, targets).tolist() == [1, 2, 5, 4]
    exclude = torch.tensor([[0, 0], [1, 2], [5, 1], [3, 4]])  # rows 1 and 2 exclude their own target
    assert reference_ranks(scores, targets, exclude).tolist() == [1, 2, 4, 2]
    for block_size in (1, 2, 5, 100):
        result, _ = run_streaming(scores, targets, exclude, block_size=block_size, top_k=2)
        assert result.ranks.tolist() == [1, 2, 4, 2]
        assert result.topk_items.tolist() == [[1, 5], [2, 3], [4, 3], [2, 1]]


def test_hand_computed_metrics():
    ranks = torch.tensor([1, 2, 11, 100])
    got = metrics_from_ranks(ranks, ks=(1, 10))
    assert got["hr@1"] == pytest.approx(1 / 4)
    assert got["hr@10"] == pytest.approx(2 / 4)
    assert got["recall@10"] == got["hr@10"]
    assert got["ndcg@1"] == pytest.approx(1 / 4)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 100) / 4)
    assert got["num_users"] == 4
    assert set(got) == {"hr@1", "recall@1", "ndcg@1", "hr@10", "recall@10", "ndcg@10", "mrr", "num_users"}


def test_cutoff_offset_turns_rank_11_into_an_at_10_hit():
    ranks = torch.tensor([11])
    assert metrics_from_ranks(ranks, ks=(10,))["hr@10"] == 0.0
    shifted = metrics_from_ranks(ranks, ks=(10,), metric_cutoff_offset=1)
    assert shifted["hr@10"] == 1.0
    assert shifted["ndcg@10"] == pytest.approx(1 / math.log2(12))
    assert shifted["mrr"] == pytest.approx(1 / 11)  # MRR has no cut-off
    assert metrics_from_ranks(torch.tensor([12]), ks=(10,), metric_cutoff_offset=1)["hr@10"] == 0.0


@FAST
@given(
    batches=st.lists(st.lists(st.integers(1, 300), min_size=0, max_size=40), min_size=1, max_size=6),
    ks=st.lists(st.integers(1, 60), min_size=1, max_size=4, unique=True),
    offset=st.integers(0, 2),
)
def test_accumulator_equals_one_shot_exactly(batches, ks, offset):
    everything = [r for batch in batches for r in batch]
    acc = RankingMetrics(ks=ks, metric_cutoff_offset=offset)
    for batch in batches:
        acc.update(torch.tensor(batch, dtype=torch.long))
    if not everything:
        with pytest.raises(ValueError, match="before any ranks"):
            acc.compute()
        return
    one_shot = metrics_from_ranks(torch.tensor(everything), ks=ks, metric_cutoff_offset=offset)
    assert acc.compute() == one_shot  # bit-for-bit, not approx
    naive_mrr = sum(1 / r for r in everything) / len(everything)
    assert one_shot["mrr"] == pytest.approx(naive_mrr, rel=1e-12)
    for k in ks:
        cutoff = k + offset
        expected_ndcg = sum(1 / math.log2(r + 1) for r in everything if r <= cutoff) / len(everything)
        assert one_shot[f"ndcg@{k}"] == pytest.approx(expected_ndcg, rel=1e-12, abs=1e-15)
        assert one_shot[f"hr@{k}"] == sum(r <= cutoff for r in everything) / len(everything)
    acc.reset()
    assert acc.num_users == 0


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ks", "offset", "match"),
    [
        ((0, 10), 0, "positive ints"),
        ((10, -5), 0, "positive ints"),
        ((10.0,), 0, "positive ints"),
        ((True,), 0, "positive ints"),
        ((), 0, "non-empty"),
        (10, 0, "non-empty sequence"),
        ((10, 10), 0, "duplicates"),
        ((10,), -1, "metric_cutoff_offset"),
    ],
)
def test_bad_ks_and_offset(ks, offset, match):
    with pytest.raises(ValueError, match=match):
        metrics_from_ranks(torch.tensor([1]), ks=ks, metric_cutoff_offset=offset)
    with pytest.raises(ValueError, match=match):
        RankingMetrics(ks=ks, metric_cutoff_offset=offset)


def test_bad_ranks():
    with pytest.raises(ValueError, match="no users"):
        metrics_from_ranks(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ranks must be >= 1.*got minimum 0"):
        metrics_from_ranks(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        metrics_from_ranks(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        RankingMetrics().update(torch.ones(2, 2, dtype=torch.long))


def test_bad_targets_and_exclusions():
    scores = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"targets must hold item ids in 1\.\.5; got values in 0\.\.3"):
        reference_ranks(scores, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"targets must hold item ids in 1\.\.5; got values in 2\.\.6"):
        reference_ranks(scores, torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"targets must have shape \[2\]"):
        reference_ranks(scores, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        reference_ranks(scores, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"exclude_items must hold item ids .* in 0\.\.5; got values in 0\.\.9"):
        reference_ranks(scores, torch.tensor([1, 2]), torch.tensor([[0, 9], [1, 2]]))
    with pytest.raises(ValueError, match=r"exclude_items must have shape \[B, L\] with B=2"):
        reference_ranks(scores, torch.tensor([1, 2]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        reference_ranks(torch.tensor([[0.0, float("nan")]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_items >= 1"):
        reference_ranks(torch.zeros(2, 1), torch.tensor([1, 1]))


def test_bad_streaming_arguments():
    scores = torch.zeros(2, 6)
    targets = torch.tensor([1, 2])

    def block(start: int, end: int) -> torch.Tensor:
        return scores[:, start:end]

    with pytest.raises(ValueError, match=r"targets must hold item ids in 1\.\.5; got values in 1\.\.7"):
        streaming_ranks(block, torch.tensor([1, 7]), num_items=5)
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        streaming_ranks(block, targets, num_items=5, block_size=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 0, got -1"):
        streaming_ranks(block, targets, num_items=5, top_k=-1)
    with pytest.raises(ValueError, match="num_items must be an int >= 1"):
        streaming_ranks(block, targets, num_items=0)
    with pytest.raises(ValueError, match=r"exclude_items must have shape \[B, L\] with B=2"):
        streaming_ranks(block, targets, num_items=5, exclude_items=torch.zeros(3, 2, dtype=torch.long))
    nan_target = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"NaN as the score of row 1's target \(item 1\)"):
        streaming_ranks(lambda s, e: nan_target[:, s:e], targets.new_tensor([2, 1]), num_items=2)
    with pytest.raises(ValueError, match=r"score_block\(1, 4\) must return a tensor of shape \[2, 3\], got \(2, 2\)"):
        streaming_ranks(lambda s, e: scores[:, s : e - 1], targets, num_items=5, block_size=3)


# ------------------------------------------------------------------------------------------------------
# the evaluate module
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_evaluate(tmp_path, monkeypatch):
    """Import evaluate with every cache under tmp_path and the Hub switched off; undo module side effects."""
    for name, value in {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    evaluate = importlib.import_module("evaluate")
    # evaluate reads its config at import time; if it was already imported, point it at tmp_path too
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "hf" / "modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", tmp_path / "hf" / "metrics")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield evaluate
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "evaluate_modules":
            del sys.modules[name]


def test_evaluate_module_loads_offline_and_matches(offline_evaluate, tmp_path):
    metric = offline_evaluate.load(EVALUATE_MODULE_PATH, cache_dir=str(tmp_path / "cache"))
    assert metric.name == "missrec_ranking"
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (25, 61), generator=gen).float()  # ties included
    targets = torch.randint(1, 61, (25,), generator=gen)
    expected = metrics_from_ranks(reference_ranks(scores, targets), ks=(5, 20), metric_cutoff_offset=1)
    got = metric.compute(predictions=scores.tolist(), references=targets.tolist(), ks=(5, 20), metric_cutoff_offset=1)
    assert got == expected
    # batches added incrementally give the same answer; default ks are (10, 50)
    for lo in range(0, 25, 10):
        metric.add_batch(predictions=scores[lo : lo + 10].tolist(), references=targets[lo : lo + 10].tolist())
    assert metric.compute() == metrics_from_ranks(reference_ranks(scores, targets))


def test_an_infinite_target_score_ranks_as_brute_force_does():
    scores = torch.tensor([[0.0, math.inf, 1.0, math.inf, -math.inf], [0.0, -math.inf, 2.0, 1.0, -math.inf]])
    targets = torch.tensor([1, 4])
    expected = reference_ranks(scores, targets)
    assert expected.tolist() == [2, 4]  # the other +inf ties; -inf ties with the other -inf
    result, _ = run_streaming(scores, targets, block_size=2)
    assert torch.equal(result.ranks, expected)
