"""The evaluator and the recommender rank with the one streaming kernel, exactly as brute force would.

A catalogue with duplicated items (identical features and, in the transductive mode, identical ID rows) makes
exact ties; the evaluator must count them against the target however the catalogue is cut into blocks.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec.evaluation import evaluate_ranking
from modeling_missrec.ranking import reference_ranks
from modeling_missrec.recommend import MissrecRecommender

NUM_ITEMS = 40
DUPLICATES = {2: 1, 7: 5, 8: 5, 21: 20, 33: 30}  # item id -> the item id it copies


def tied_model(use_item_ids: bool, seed: int = 0, duplicates: dict[int, int] | None = None):
    """A tiny model whose catalogue repeats some items exactly, so that their scores tie bit for bit."""
    duplicates = DUPLICATES if duplicates is None else duplicates
    torch.manual_seed(seed)
    config = MissrecConfig(
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        text_feature_size=8,
        image_feature_size=6,
        num_items=NUM_ITEMS,
        max_seq_length=10,
        use_item_ids=use_item_ids,
    )
    model = MissrecForSequentialRecommendation(config)
    generator = torch.Generator().manual_seed(seed)
    features = {
        "text": torch.randn(NUM_ITEMS, 8, generator=generator),
        "image": torch.randn(NUM_ITEMS, 6, generator=generator),
    }
    features["image"][30:] = 0  # some items have no image
    for copy, original in duplicates.items():
        for table in features.values():
            table[copy - 1] = table[original - 1]
    model.load_item_features(features)
    if use_item_ids:
        with torch.no_grad():
            for copy, original in duplicates.items():
                model.missrec.item_embeddings.weight[copy] = model.missrec.item_embeddings.weight[original]
    model.refresh_interests(seed=seed)
    return model.eval()


def brute_force_scores(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The `[B, N + 1]` score matrix in one piece (column 0 = padding)."""
    with torch.no_grad():
        sequence = model.encode(input_ids).sequence_embedding
        scores = model.score_items(sequence, model.item_tokens(), 0, NUM_ITEMS + 1)
    return scores


def batches(input_ids: torch.Tensor, labels: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": ids, "attention_mask": ids != 0, "labels": target}
        for ids, target in zip(input_ids.split(size), labels.split(size), strict=True)
    ]


@st.composite
def ranking_cases(draw):
    batch = draw(st.integers(1, 12))
    width = draw(st.integers(1, 10))
    lengths = draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch))
    ids = draw(st.lists(st.integers(1, NUM_ITEMS), min_size=batch * width, max_size=batch * width))
    input_ids = torch.tensor(ids).view(batch, width)
    input_ids[torch.arange(width).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)] = 0
    # Targets favour the duplicated items and their originals, where the ties are.
    tied = sorted(set(DUPLICATES) | set(DUPLICATES.values()))
    targets = draw(
        st.lists(st.one_of(st.sampled_from(tied), st.integers(1, NUM_ITEMS)), min_size=batch, max_size=batch)
    )
    return (
        input_ids,
        torch.tensor(targets),
        draw(st.booleans()),  # use_item_ids
        draw(st.booleans()),  # exclude_history
        draw(st.integers(1, NUM_ITEMS + 5)),  # block_size
        draw(st.integers(1, batch)),  # users per evaluation batch
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ranking_cases())
def test_evaluator_ranks_equal_brute_force_ranks_with_ties(case):
    input_ids, targets, use_item_ids, exclude_history, block_size, batch_size = case
    model = tied_model(use_item_ids)
    expected = reference_ranks(brute_force_scores(model, input_ids), targets, input_ids if exclude_history else None)
    _, _, ranks = evaluate_ranking(
        model, batches(input_ids, targets, batch_size), exclude_history=exclude_history, block_size=block_size
    )
    assert torch.equal(ranks, expected)


def test_duplicated_items_tie_exactly_and_count_against_the_target():
    """Item 7 copies item 5 exactly: as the target, 5 must rank behind its twin (and behind 8, another twin)."""
    for use_item_ids in (False, True):
        model = tied_model(use_item_ids)
        input_ids = torch.tensor([[3, 9, 12], [11, 0, 0]])
        scores = brute_force_scores(model, input_ids)
        assert torch.equal(scores[:, 5], scores[:, 7]) and torch.equal(scores[:, 5], scores[:, 8])
        targets = torch.tensor([5, 5])
        better = (scores[:, 1:] > scores[:, 5:6]).sum(1)
        _, _, ranks = evaluate_ranking(model, batches(input_ids, targets, 2), block_size=6)
        assert torch.equal(ranks, better + 3)  # the two twins count against the target


def test_recommended_top_k_is_the_evaluators_ranking():
    """Without ties, the i-th recommended item of a history has evaluation rank i (with and without history)."""
    model = tied_model(use_item_ids=True, seed=3, duplicates={})
    recommender = MissrecRecommender(model, block_size=7)
    histories = [[3, 9, 12], [11], [1, 2, 3, 4, 5, 6], [40, 39]]
    k = 12
    for exclude_history in (False, True):
        recommended = recommender.recommend(histories, k=k, exclude_history=exclude_history)
        input_ids = recommender.pad(histories).repeat_interleave(k, dim=0)
        targets = torch.tensor([item.item_id for row in recommended for item in row])
        _, _, ranks = evaluate_ranking(
            model, batches(input_ids, targets, 16), exclude_history=exclude_history, block_size=9
        )
        assert ranks.tolist() == list(range(1, k + 1)) * len(histories)
        if exclude_history:
            for history, row in zip(histories, recommended, strict=True):
                assert not set(history) & {item.item_id for item in row}
