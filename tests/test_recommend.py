"""Recommendation API, new items from features alone, the model card and the Hub upload (mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from test_trainer import make_trainer, write_planted_dataset

from modeling_missrec.recommend import MissrecRecommender, model_card, push_to_hub


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recommend")
    folder = write_planted_dataset(root / "data")
    # The paper's scoring: a new item's twin then scores exactly as the original (with the history prior a
    # new item has no training count; tests/test_history_prior.py covers new items there).
    make_trainer(folder, root / "out", mode="inductive", history_prior=False, num_train_epochs=8).train()
    return root / "out"


def test_top1_for_a_training_history_is_the_argmax_of_its_scores(trained):
    recommender = MissrecRecommender.from_pretrained(trained)
    histories = [["item3", "item4", "item5"], [10, 11], ["item39"]]
    top = recommender.recommend(histories, k=5)
    scores = recommender.scores(histories)
    for row, recommendations in enumerate(top):
        assert len(recommendations) == 5
        assert recommendations[0].item_id == int(scores[row].argmax())
        expected = scores[row].topk(5)
        assert [r.item_id for r in recommendations] == expected.indices.tolist()
        assert [r.score for r in recommendations] == pytest.approx(expected.values.tolist(), abs=1e-6)
        assert recommendations[0].raw_item_id == f"item{recommendations[0].item_id - 1}"
    # the planted rule (next = last + 1) was learnt
    assert top[0][0].raw_item_id == "item6" and top[1][0].item_id == 12


def test_exclude_history_and_batching(trained):
    recommender = MissrecRecommender.from_pretrained(trained)
    histories = [["item3", "item4", "item5"], ["item20"]] * 3
    full = recommender.recommend(histories, k=40, batch_size=4)
    excluded = recommender.recommend(histories, k=40, exclude_history=True, batch_size=1)
    assert [r.item_id for r in full[0]] == [r.item_id for r in full[2]]
    assert {r.raw_item_id for r in excluded[0]}.isdisjoint({"item3", "item4", "item5"})
    assert len(excluded[0]) == 37 and len(full[0]) == 40


def test_unknown_items_and_empty_histories_are_clear_errors(trained):
    recommender = MissrecRecommender.from_pretrained(trained)
    with pytest.raises(KeyError, match="position 1: unknown item 'nope'"):
        recommender.recommend([["item1", "nope"]])
    with pytest.raises(ValueError, match="item id 41 outside 1..40"):
        recommender.recommend([[41]])
    with pytest.raises(ValueError, match="empty history"):
        recommender.recommend([[]])


def test_new_items_are_scored_from_their_features_alone(trained, tmp_path):
    recommender = MissrecRecommender.from_pretrained(trained)
    model = recommender.model
    twin = {m: model.item_features[m][7:8].clone() for m in model.config.modalities}  # a copy of item id 7
    new_ids = recommender.add_items(twin, raw_item_ids=["twin-of-item6"])
    assert new_ids == [41] and model.config.num_items == 41
    scores = recommender.scores([["item3", "item4", "item5"]])
    torch.testing.assert_close(scores[0, 41], scores[0, 7])
    ids = model.missrec.interest_tokenizer.item_interest_ids
    assert torch.equal(ids[:, 41], ids[:, 7])
    top = recommender.recommend([["item3", "item4", "item5"]], k=2)[0]
    assert {r.raw_item_id for r in top} == {"item6", "twin-of-item6"}
    recommender.save_pretrained(tmp_path / "grown")
    again = MissrecRecommender.from_pretrained(tmp_path / "grown")
    assert again.recommend([[41]], k=1)[0][0].item_id == recommender.recommend([[41]], k=1)[0][0].item_id


def test_the_model_itself_grows_its_catalogue(trained, tmp_path):
    """`model.add_items` (no recommender: what a `trust_remote_code` user has) grows every per-item state."""
    from modeling_missrec import MissrecForSequentialRecommendation

    model = MissrecForSequentialRecommendation.from_pretrained(trained).eval()
    twin = {m: model.item_features[m][[7, 12]].clone() for m in model.config.modalities}
    twin["image"][1] = 0  # the second new item lacks its image
    assert model.add_items(twin, raw_item_ids=["a", "b"]) == [41, 42]
    ids = model.missrec.interest_tokenizer.item_interest_ids
    assert ids.shape[1] == 43 and torch.equal(ids[:, 41], ids[:, 7])
    image = model.config.modalities.index("image")
    assert ids[image, 42] == 0 and ids[1 - image, 42] == ids[1 - image, 12]
    assert model.catalog.raw_item_ids[-2:] == ["a", "b"] and model.catalog.num_items == 42
    top = model.recommend(torch.tensor([[4, 5, 6]]), k=3)
    assert 41 in top.item_ids[0].tolist()
    with pytest.raises(ValueError, match="raw_item_ids has 2 entries"):
        model.set_raw_item_ids(["x", "y"])
    model.save_pretrained(tmp_path / "grown")
    again = MissrecForSequentialRecommendation.from_pretrained(tmp_path / "grown")
    assert again.config.num_items == 42 and again.catalog.raw_item_ids == model.catalog.raw_item_ids


def test_items_added_before_the_first_refresh_have_no_interest_yet():
    from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation

    config = MissrecConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_items=5,
                           text_feature_size=4, image_feature_size=3, use_item_ids=False)  # fmt: skip
    model = MissrecForSequentialRecommendation(config).eval()
    model.load_item_features({"text": torch.randn(5, 4), "image": torch.randn(5, 3)})
    assert model.add_items({"text": torch.randn(2, 4), "image": torch.randn(2, 3)}) == [6, 7]
    ids = model.missrec.interest_tokenizer.item_interest_ids
    assert ids.shape == (2, 8) and not ids.any()
    assert model.refresh_interests(seed=0) >= 1 and model.missrec.interest_tokenizer.item_interest_ids[:, 6:].all()


def test_transductive_models_refuse_new_items(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    trainer = make_trainer(folder, tmp_path / "out", mode="transductive", num_train_epochs=1)
    trainer.train()
    recommender = MissrecRecommender.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="inductive"):
        recommender.add_items({m: torch.zeros(1, 4) for m in ("text", "image")})


def test_push_to_hub_uploads_weights_code_id_map_and_card(trained, tmp_path):
    api = mock.MagicMock()
    repo = push_to_hub(trained, "someone/missrec-toy", api=api, dataset="planted toy")
    assert repo == "someone/missrec-toy"
    api.create_repo.assert_called_once()
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "someone/missrec-toy"
    folder = upload["folder_path"]
    for name in (
        "model.safetensors",
        "config.json",
        "modeling_missrec.py",
        "configuration_missrec.py",
        "interests.py",
        "item_ids.json",
        "README.md",
    ):
        assert os.path.exists(os.path.join(folder, name)), name
    assert "checkpoint/*" in upload["ignore_patterns"]
    card = open(os.path.join(folder, "README.md")).read()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert f"{metrics['test']['ndcg@10']:.4f}" in card and "planted toy" in card and "inductive" in card
    config = json.loads((trained / "config.json").read_text())
    assert "AutoModel" in config["auto_map"]

    # What would be uploaded loads in a fresh interpreter where the package cannot be imported.
    script = f"""
import sys
sys.modules["modeling_missrec"] = None
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({str(trained)!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "MissrecForSequentialRecommendation"
with torch.no_grad():
    print(int(model(torch.tensor([[4, 5, 6]])).logits.argmax()))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    recommender = MissrecRecommender.from_pretrained(trained)
    assert int(result.stdout.strip().splitlines()[-1]) == recommender.recommend([[4, 5, 6]], k=1)[0][0].item_id


def test_model_card_without_metrics_still_explains_usage():
    card = model_card(None, "my data", "transductive", "me/model")
    assert "trust_remote_code=True" in card and "item IDs + content" in card
