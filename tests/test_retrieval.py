"""Certified top-k (modeling_missrec.retrieval): with exact lists the answer is the full scan's, for every
fusion mode, with and without IDs, with items missing modalities, excluded histories, and a catalogue that
grows; approximate lists are checked for recall only."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec.modeling_missrec import ItemTokens, MissrecFusionHead
from modeling_missrec.ranking import streaming_topk
from modeling_missrec.retrieval import FusedScoreRetriever, InnerProductList

faiss = pytest.importorskip("faiss")


def catalogue(num_items: int, hidden: int, use_ids: bool, fusion: str, seed: int, missing: float, modalities=2):
    """Random normalised tokens for ids 0..num_items (0 = padding), some modalities missing, and a fusion head."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(modalities, num_items + 1, hidden, generator=generator), dim=-1)
    present = torch.rand(modalities, num_items + 1, generator=generator) >= missing
    present[:, 0] = False
    ids = torch.nn.functional.normalize(torch.randn(num_items + 1, hidden, generator=generator), dim=-1)
    config = MissrecConfig(num_items=num_items, item_fusion=fusion, fusion_factor_init=0.0)
    head = MissrecFusionHead(config)
    with torch.no_grad():
        if fusion == "dynamic_instance":
            head.fusion_factor.copy_(torch.randn(num_items + 1, generator=generator) * 5)
        elif fusion == "dynamic_shared":
            head.fusion_factor.fill_(3.0)
    return ItemTokens(tokens, present, ids if use_ids else None, 0), head


def full_scan(items: ItemTokens, head, queries, k, exclude=None):
    num_items = items.modality_tokens.shape[1] - 1
    with torch.no_grad():
        return streaming_topk(lambda s, e: head(queries, items.slice(s, e)), num_items, k, 16, exclude)


def assert_same_top_k(result, scan_scores, items, head, queries, scan_ids=None):
    """Same k-th scores as the full scan, every returned item scores what the scan gives it, and where no
    two scores are within rounding of each other, the same items."""
    torch.testing.assert_close(result.scores, scan_scores, rtol=0, atol=1e-5)
    if scan_ids is not None:
        inf = torch.full_like(scan_scores[:, :1], float("inf"))
        above = torch.cat([inf, scan_scores[:, :-1]], dim=1)
        below = torch.cat([scan_scores[:, 1:], -inf], dim=1)
        distinct = (above - scan_scores > 1e-4) & (scan_scores - below > 1e-4) & torch.isfinite(scan_scores)
        distinct[:, -1] = False  # the k-th may tie with an item outside the answer
        assert torch.equal(result.item_ids[distinct], scan_ids[distinct])
    with torch.no_grad():
        every = head(queries, items.slice(0, items.modality_tokens.shape[1]))
    returned = result.item_ids.clamp_min(0)
    finite = result.scores > float("-inf")
    torch.testing.assert_close(every.gather(1, returned)[finite], result.scores[finite], rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_items=st.integers(5, 300),
    use_ids=st.booleans(),
    fusion=st.sampled_from(["dynamic_shared", "dynamic_instance", "static"]),
    kind=st.sampled_from(["torch", "faiss-flat"]),
    k=st.integers(1, 12),
    initial=st.integers(1, 40),
    missing=st.sampled_from([0.0, 0.3, 0.9]),
    exclude=st.booleans(),
    modalities=st.sampled_from([1, 2]),
    seed=st.integers(0, 10_000),
)
def test_exact_lists_give_the_full_scan_and_a_certificate(
    num_items, use_ids, fusion, kind, k, initial, missing, exclude, modalities, seed
):
    items, head = catalogue(num_items, 8, use_ids, fusion, seed, missing, modalities)
    generator = torch.Generator().manual_seed(seed + 1)
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=generator), dim=-1)
    history = torch.randint(0, num_items + 1, (7, 4), generator=generator) if exclude else None
    retriever = FusedScoreRetriever(items, head, kind, initial_candidates=initial)
    result = retriever.search(queries, k, history, query_batch=3)
    scan_scores, scan_ids = full_scan(items, head, queries, k, history)
    assert result.certified.all()
    assert_same_top_k(result, scan_scores, items, head, queries, scan_ids)


def test_items_with_no_modality_fill_the_top_k_after_the_history_is_excluded():
    # inductive; items 1-3 have no modality (score exactly 0), every other item scores below 0
    items, head = catalogue(30, 4, False, "static", 0, 0.0)
    query = torch.nn.functional.normalize(torch.ones(1, 4), dim=-1)
    items.modality_tokens[:, 4:] = -query
    items.present[:, 1:4] = False
    result = FusedScoreRetriever(items, head, "torch", initial_candidates=2).search(query, 2, torch.tensor([[1, 2]]))
    scan_scores, scan_ids = full_scan(items, head, query, 2, torch.tensor([[1, 2]]))
    assert result.item_ids[0, 0] == 3 == scan_ids[0, 0] and result.certified.all()
    assert_same_top_k(result, scan_scores, items, head, query)


def test_the_certificate_stops_early_on_a_real_model_catalogue():
    torch.manual_seed(0)
    config = MissrecConfig(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, text_feature_size=8, image_feature_size=6,
        num_items=3000, max_seq_length=10,
    )  # fmt: skip
    model = MissrecForSequentialRecommendation(config).eval()
    image = torch.randn(3000, 6)
    image[::3] = 0  # a third of the items have no image
    model.load_item_features({"text": torch.randn(3000, 8), "image": image})
    model.refresh_interests(seed=0)
    history = torch.randint(1, 3001, (64, 5))
    with torch.no_grad():
        queries = model.encode(history).sequence_embedding
        items = model.item_tokens()
    retriever = FusedScoreRetriever(items, model.fusion, "faiss-flat", initial_candidates=64)
    result = retriever.search(queries, 10, history)
    scan_scores, _ = full_scan(items, model.fusion, queries, 10, history)
    assert result.certified.all()
    assert_same_top_k(result, scan_scores, items, model.fusion, queries)
    # most rows are certified without reading the lists to their end
    assert (result.candidates < 3000).float().mean() > 0.5


def test_added_items_are_found_and_saved_lists_are_reused(tmp_path):
    items, head = catalogue(200, 8, True, "dynamic_shared", 3, 0.3)
    first = ItemTokens(items.modality_tokens[:, :151], items.present[:, :151], items.id_tokens[:151], 0)
    retriever = FusedScoreRetriever(first, head, "faiss-flat", initial_candidates=8)
    retriever.add_items(items, first_new_id=151)
    queries = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    result = retriever.search(queries, 6)
    scan_scores, _ = full_scan(items, head, queries, 6)
    assert result.certified.all()
    assert_same_top_k(result, scan_scores, items, head, queries)

    retriever.save(tmp_path / "index", fingerprint="abc")
    lists = FusedScoreRetriever.load_lists(tmp_path / "index", "faiss-flat", "abc")
    again = FusedScoreRetriever(items, head, "faiss-flat", initial_candidates=8, lists=lists)
    reloaded = again.search(queries, 6)
    assert torch.equal(reloaded.item_ids, result.item_ids) and torch.equal(reloaded.scores, result.scores)
    assert FusedScoreRetriever.load_lists(tmp_path / "index", "faiss-flat", "other catalogue") is None
    assert FusedScoreRetriever.load_lists(tmp_path / "index", "faiss-hnsw", "abc") is None


@pytest.mark.parametrize("kind", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_lists_recall_the_exact_top_k(kind):
    items, head = catalogue(2000, 16, True, "dynamic_shared", 5, 0.3)
    queries = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    options = {"nlist": 16, "nprobe": 8} if kind == "faiss-ivf" else {}
    result = FusedScoreRetriever(items, head, kind, initial_candidates=64, **options).search(queries, 10)
    _, scan_ids = full_scan(items, head, queries, 10)
    recall = sum(len(set(a) & set(b)) for a, b in zip(result.item_ids.tolist(), scan_ids.tolist())) / scan_ids.numel()
    assert recall >= 0.9


def test_a_list_returns_its_best_inner_products_in_order():
    vectors = torch.nn.functional.normalize(torch.randn(100, 4), dim=-1)
    ids = torch.arange(101, 201)
    query = torch.randn(3, 4)
    for kind in ("torch", "faiss-flat"):
        scores, found = InnerProductList(vectors, ids, kind).search(query, 120)
        expected = (query @ vectors.T).sort(dim=1, descending=True)
        torch.testing.assert_close(scores[:, :100], expected.values, rtol=0, atol=1e-6)
        assert torch.equal(found[:, :100].sort(1).values, ids.expand(3, -1))
        assert (scores[:, 100:] == float("-inf")).all() and (found[:, 100:] == 0).all()


def test_the_recommender_with_a_list_index_answers_as_the_full_scan(tmp_path):
    from modeling_missrec.recommend import INDEX_DIR, MissrecRecommender

    torch.manual_seed(1)
    config = MissrecConfig(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, text_feature_size=8, image_feature_size=6,
        num_items=500, max_seq_length=10, use_item_ids=False,
    )  # fmt: skip
    model = MissrecForSequentialRecommendation(config).eval()
    image = torch.randn(500, 6)
    image[::4] = 0
    model.load_item_features({"text": torch.randn(500, 8), "image": image})
    model.refresh_interests(seed=0)
    raw = [f"item-{i}" for i in range(500)]
    histories = [[int(i) for i in torch.randint(1, 501, (5,))] for _ in range(20)]

    def same(a, b):
        assert len(a) == len(b)
        for left, right in zip(a, b):
            assert [r.score for r in left] == pytest.approx([r.score for r in right], abs=1e-5)
            assert [r.item_id for r in left] == [r.item_id for r in right]

    exact = MissrecRecommender(model, raw)
    listed = MissrecRecommender(model, list(raw), index="faiss-flat", initial_candidates=4)
    same(listed.recommend(histories, k=8, exclude_history=True), exact.recommend(histories, k=8, exclude_history=True))

    # new items enter the lists at once
    new = listed.add_items(
        {"text": torch.randn(30, 8) * 3, "image": torch.randn(30, 6)}, [f"new-{i}" for i in range(30)]
    )
    rebuilt = MissrecRecommender(listed.model, listed.raw_item_ids)
    same(listed.recommend(histories, k=8), rebuilt.recommend(histories, k=8))
    assert any(r.item_id in new for row in listed.recommend(histories, k=8) for r in row)

    # saved beside the model, reused when it matches, rebuilt when it is gone
    listed.save_pretrained(tmp_path / "rec")
    assert (tmp_path / "rec" / INDEX_DIR / "index.json").exists()
    with mock.patch.object(FusedScoreRetriever, "_build_lists", side_effect=AssertionError("rebuilt")):
        reloaded = MissrecRecommender.from_pretrained(tmp_path / "rec", index="faiss-flat")
    assert reloaded.retriever.lists["modality_0"].index.ntotal == len(listed.retriever.lists["modality_0"])
    same(reloaded.recommend(histories, k=8), listed.recommend(histories, k=8))
    import shutil

    shutil.rmtree(tmp_path / "rec" / INDEX_DIR)
    same(MissrecRecommender.from_pretrained(tmp_path / "rec", index="faiss-flat").recommend(histories, k=8),
         listed.recommend(histories, k=8))  # fmt: skip
    with pytest.raises(ValueError, match="index must be one of"):
        MissrecRecommender(model, raw, index="annoy")
