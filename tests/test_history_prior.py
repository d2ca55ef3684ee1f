"""The history prior (`config.history_prior`): its score terms as documented, the same scores whether the
catalogue is scored whole, in blocks or on sampled candidates, saved with the model, learned by training."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainer import TINY

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec.data import load_atomic_dataset, load_item_catalog
from modeling_missrec.modeling_missrec import MissrecHistoryPrior, _in_history
from modeling_missrec.ranking import ids_in_block
from modeling_missrec.recommend import MissrecRecommender
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model

NUM_ITEMS = 30
HISTORY = torch.tensor([[3, 4, 5, 0], [7, 8, 9, 10], [12, 0, 0, 0], [3, 30, 0, 0]])


def tiny_model(use_item_ids: bool = True, prior: bool = True, **overrides) -> MissrecForSequentialRecommendation:
    torch.manual_seed(0)
    config = MissrecConfig(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, text_feature_size=8, image_feature_size=6,
        num_items=NUM_ITEMS, max_seq_length=10, use_item_ids=use_item_ids, hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0, fusion_factor_init=1.5, history_prior=prior, **overrides,
    )  # fmt: skip
    model = MissrecForSequentialRecommendation(config)
    image = torch.randn(NUM_ITEMS, 6)
    image[::4] = 0  # some items have no image: their image cosine is 0
    model.load_item_features({"text": torch.randn(NUM_ITEMS, 8), "image": image})
    model.refresh_interests(seed=0)
    return model.eval()


def set_weights(model, text=0.7, image=-0.3, history=-1.2, count=0.4) -> torch.Tensor:
    counts = torch.arange(NUM_ITEMS + 1) % 7
    model.set_item_popularity(counts)
    with torch.no_grad():
        model.history_prior.weight.copy_(torch.tensor([text, image, history, count]) / MissrecHistoryPrior.WEIGHT_SCALE)
    return counts


def reference_prior(model, history: torch.Tensor, counts: torch.Tensor, weights) -> torch.Tensor:
    """The documented terms, one user and one item at a time."""
    text, image, in_history, count = weights
    features = model.item_features
    rows = []
    for row in history.tolist():
        last = [i for i in row if i != 0][-1]
        scores = []
        for item in range(NUM_ITEMS + 1):
            cosines = [F.cosine_similarity(features[m][last], features[m][item], dim=0, eps=1e-12) for m in features]
            cosines = [0.0 if features[m][item].abs().sum() == 0 or features[m][last].abs().sum() == 0 else c
                       for m, c in zip(features, cosines)]  # fmt: skip
            value = text * cosines[0] + image * cosines[1] + in_history * (item in row and item != 0)
            scores.append(float(value + count * np.log1p(float(counts[item]))))
        rows.append(scores)
    return torch.tensor(rows)


@pytest.mark.parametrize("cosine_table", [True, False], ids=["cosine-table", "products"])
@pytest.mark.parametrize("use_item_ids", [True, False])
def test_the_prior_adds_exactly_its_documented_terms_to_the_logits(use_item_ids, cosine_table, monkeypatch):
    if not cosine_table:  # the path of catalogues whose item x item table is too large to keep
        monkeypatch.setattr(MissrecHistoryPrior, "cosine_table_max_bytes", 0)
    plain = tiny_model(use_item_ids, prior=False)
    model = tiny_model(use_item_ids)
    model.load_state_dict(plain.state_dict(), strict=False)
    weights = (0.7, -0.3, -1.2, 0.4)
    counts = set_weights(model, *weights)
    with torch.no_grad():
        added = (model(HISTORY).logits - plain(HISTORY).logits)[:, 1:] * model.config.temperature
    torch.testing.assert_close(added, reference_prior(model, HISTORY, counts, weights)[:, 1:], rtol=1e-4, atol=1e-4)


def test_a_new_prior_scores_as_the_model_without_it():
    plain = tiny_model(prior=False)
    model = tiny_model()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["history_prior.item_log_count", "history_prior.weight"] and not unexpected
    model.set_item_popularity(torch.arange(NUM_ITEMS + 1))  # counts alone change nothing while the weights are 0
    with torch.no_grad():
        torch.testing.assert_close(model(HISTORY).logits, plain(HISTORY).logits)


@settings(max_examples=25, deadline=None)
@given(block=st.integers(1, NUM_ITEMS + 3))
def test_blocks_of_the_evaluator_score_as_the_whole_catalogue(block):
    model = tiny_model()
    set_weights(model)
    with torch.no_grad():
        full = model(HISTORY).logits[:, 1:] * model.config.temperature
        sequence = model.encode(HISTORY).sequence_embedding
        items = model.item_tokens()
        edges = list(range(1, NUM_ITEMS + 1, block)) + [NUM_ITEMS + 1]
        parts = [model.score_items(sequence, items, s, e, HISTORY) for s, e in zip(edges, edges[1:])]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="history prior"):
        model.score_items(sequence, items, 1, 5)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_history_membership_matches_a_brute_force_check(data):
    batch, length = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    history = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 12), min_size=length, max_size=length),
                                               min_size=batch, max_size=batch)))  # fmt: skip
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=15)))
    expected = torch.tensor([[int(i) in row.tolist() for i in ids] for row in history])
    assert torch.equal(_in_history(history, ids, 13), expected)
    start, width = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 14))
    block = torch.tensor([[i in row.tolist() for i in range(start, start + width)] for row in history])
    assert torch.equal(ids_in_block(history, start, width), block.reshape(batch, width))


def test_the_sampled_loss_sees_the_same_prior_on_its_candidates():
    model = tiny_model(loss_type="sampled", num_negatives=9).train()
    set_weights(model)
    counts = torch.ones(NUM_ITEMS + 1)
    model.set_target_frequencies(counts)
    labels = torch.tensor([6, 11, 13, 2])
    torch.manual_seed(3)
    sampled = model(HISTORY, labels=labels).logits
    torch.manual_seed(3)
    negatives, drawn = model.sample_negatives(9, HISTORY.device)
    model.config.loss_type = "full"
    full = model(HISTORY, labels=labels).logits
    candidates = torch.cat([labels, negatives])
    expected = len(labels) * model.target_probability[candidates] + len(negatives) * drawn
    reference = full[:, candidates] - expected.log()
    finite = torch.isfinite(sampled)
    torch.testing.assert_close(sampled[finite], reference[finite], rtol=1e-5, atol=1e-5)


def test_saved_and_loaded_with_the_model_and_served_by_the_exact_recommender(tmp_path):
    model = tiny_model(use_item_ids=False)
    set_weights(model, history=-5.0)  # below any fused score + cosine: history items rank last
    model.save_pretrained(tmp_path / "m")
    loaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path / "m").eval()
    assert loaded.history_prior.weights() == pytest.approx(model.history_prior.weights())
    with torch.no_grad():
        torch.testing.assert_close(loaded(HISTORY).logits, model(HISTORY).logits)
    recommender = MissrecRecommender(loaded)
    top = recommender.recommend([[3, 4, 5]], k=NUM_ITEMS)[0]
    scores = recommender.scores([[3, 4, 5]])[0]
    assert [r.item_id for r in top][:5] == scores[1:].argsort(descending=True)[:5].add(1).tolist()
    assert {r.item_id for r in top[-3:]} == {3, 4, 5}
    new = recommender.add_items({"text": torch.randn(2, 8).numpy(), "image": torch.zeros(2, 6).numpy()})
    assert new == [NUM_ITEMS + 1, NUM_ITEMS + 2]
    assert loaded.history_prior.item_log_count[-2:].tolist() == [0.0, 0.0]  # never a training target
    assert recommender.scores([[3, NUM_ITEMS + 1]]).shape == (1, NUM_ITEMS + 3)


def write_twin_dataset(folder, num_pairs=20, num_users=200, seed=0, text_width=12):
    """Items come in pairs with nearly equal text rows; each history's next item is its last item's twin."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    rows = {"train": [], "valid": [], "test": []}
    for user in range(num_users):
        walk = [int(i) for i in rng.choice(2 * num_pairs, size=int(rng.integers(4, 7)))]
        for t in range(1, len(walk) - 1):
            rows["train"].append(f"{user}\t{' '.join(map(str, walk[:t]))}\t{walk[t - 1] ^ 1}\n")
        for split, t in (("valid", len(walk) - 1), ("test", len(walk))):
            rows[split].append(f"{user}\t{' '.join(map(str, walk[:t]))}\t{walk[t - 1] ^ 1}\n")
    for split, lines in rows.items():
        (folder / f"Twin.{split}.inter").write_text(header + "".join(lines))
    (folder / "Twin.item2index").write_text("".join(f"item{i}\t{i}\n" for i in range(2 * num_pairs)))
    (folder / "Twin.user2index").write_text("".join(f"user{u}\t{u}\n" for u in range(num_users)))
    base = rng.normal(size=(num_pairs, text_width))
    text = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(2 * num_pairs, text_width))
    np.save(folder / "Twin.text.npy", text.astype(np.float32))
    return folder


def test_training_learns_to_use_the_twin_of_the_last_item(tmp_path):
    folder = write_twin_dataset(tmp_path / "data")
    dataset = load_atomic_dataset(folder, cache_dir=tmp_path / "cache")
    catalog = load_item_catalog(folder, feature_files={"text": "Twin.text.npy"})
    torch.manual_seed(0)
    model = build_model(ModelArguments(mode="inductive", config_overrides=TINY + ",history_prior=true"), catalog)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=6, train_batch_size=64, eval_batch_size=50,
        learning_rate=5e-3, seed=7, report_to="none", disable_tqdm=True,
    )  # fmt: skip
    metrics = MissrecTrainer(model, dataset, catalog, args).train()
    weights = model.history_prior.weights()
    assert weights["text_cosine"] > 0.5 and weights["in_history"] < -0.5, weights
    assert metrics["history_prior_weights"] == pytest.approx(weights)  # in metrics.json for the user to read
    assert metrics["test"]["hr@10"] > 0.9, metrics["test"]
    assert float(model.history_prior.item_log_count.max()) > 0  # the trainer gave it the target counts


def test_starting_weights_come_from_the_config_and_loading_keeps_the_learned_ones(tmp_path):
    model = tiny_model(history_prior_init={"text_cosine": 2.0, "log_count": 0.5})
    assert model.history_prior.weights() == pytest.approx(
        {"text_cosine": 2.0, "image_cosine": 0.0, "in_history": 0.0, "log_count": 0.5}
    )
    set_weights(model, text=0.1, image=0.2, history=-0.3, count=0.4)
    model.save_pretrained(tmp_path / "m")
    loaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path / "m")
    assert loaded.history_prior.weights() == pytest.approx(
        {"text_cosine": 0.1, "image_cosine": 0.2, "in_history": -0.3, "log_count": 0.4}
    )  # the learned weights, not the configured start
    with pytest.raises(ValueError, match="history_prior_init"):
        MissrecConfig(history_prior=True, history_prior_init={"audio_cosine": 1.0})


def test_calibrating_only_the_prior_of_the_shipped_backbone(tmp_path):
    from test_shipped_model import SHIPPED

    folder = write_twin_dataset(tmp_path / "data", text_width=384)
    dataset = load_atomic_dataset(folder, cache_dir=tmp_path / "cache")
    catalog = load_item_catalog(folder, feature_files={"text": "Twin.text.npy"})
    prior = "history_prior=true"
    arguments = ModelArguments(str(SHIPPED), mode="inductive", finetune_method="prior", config_overrides=prior)
    model = build_model(arguments, catalog)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["history_prior.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=3, train_batch_size=64, eval_batch_size=50,
        learning_rate=5e-3, seed=7, report_to="none", disable_tqdm=True,
    )  # fmt: skip
    MissrecTrainer(model, dataset, catalog, args).train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed == ["history_prior.weight"]
    weights = model.history_prior.weights()
    assert weights["text_cosine"] > 0.1 and weights["in_history"] < -0.1, weights
    with pytest.raises(ValueError, match="--mode inductive"):
        ModelArguments(model_name_or_path=str(SHIPPED), finetune_method="prior", mode="transductive")


def certified_model(use_item_ids: bool, weights, num_items: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    config = MissrecConfig(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, text_feature_size=8, image_feature_size=6,
        num_items=num_items, max_seq_length=10, use_item_ids=use_item_ids, history_prior=True,
    )  # fmt: skip
    model = MissrecForSequentialRecommendation(config).eval()
    image = torch.randn(num_items, 6)
    image[::3] = 0  # a third of the items have no image: no row in the image prior list
    text = torch.randn(num_items, 8)
    text[5::7] = text[4::7][: len(text[5::7])] + 0.01  # near twins, as the catalogues the prior is for
    model.load_item_features({"text": text, "image": image})
    model.refresh_interests(seed=0)
    model.set_item_popularity(torch.randint(0, 40, (num_items + 1,)))
    with torch.no_grad():
        model.history_prior.weight.copy_(torch.tensor(weights) / MissrecHistoryPrior.WEIGHT_SCALE)
    return model


@settings(max_examples=20, deadline=None)
@given(
    use_item_ids=st.booleans(),
    weights=st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.3, 1.0, 3.0]), min_size=4, max_size=4),
    exclude=st.booleans(),
    initial=st.sampled_from([1, 4, 16]),
    kind=st.sampled_from(["torch", "faiss-flat"]),
)
def test_exact_lists_certify_the_prior_and_answer_as_the_full_scan(use_item_ids, weights, exclude, initial, kind):
    model = certified_model(use_item_ids, weights)
    histories = [[int(i) for i in torch.randint(1, 301, (int(n),))] for n in torch.randint(1, 8, (12,))]
    exact = MissrecRecommender(model).recommend(histories, k=6, exclude_history=exclude)
    recommender = MissrecRecommender(model, index=kind, initial_candidates=initial)
    listed = recommender.recommend(histories, k=6, exclude_history=exclude)
    for left, right in zip(listed, exact):
        assert [r.item_id for r in left] == [r.item_id for r in right]
        assert [r.score for r in left] == pytest.approx([r.score for r in right], abs=1e-5)
    input_ids = recommender.pad(histories)
    sequence = model.encode(input_ids).sequence_embedding
    found = recommender.retriever.search(sequence, 6, input_ids if exclude else None, input_ids=input_ids)
    assert found.certified.all()
    with pytest.raises(ValueError, match="input_ids"):
        recommender.retriever.search(sequence, 6)


def test_the_certificate_stops_early_with_the_prior_and_new_items_join_its_lists():
    model = certified_model(False, [1.0, 0.3, -2.0, 0.2], num_items=3000)
    histories = [[int(i) for i in torch.randint(1, 3001, (4,))] for _ in range(8)]
    recommender = MissrecRecommender(model, index="torch", initial_candidates=32)
    input_ids = recommender.pad(histories)
    found = recommender.retriever.search(model.encode(input_ids).sequence_embedding, 10, input_ids=input_ids)
    assert found.certified.all() and int(found.candidates.max()) < 3000  # not a scan of everything
    new = recommender.add_items({"text": torch.randn(5, 8).numpy(), "image": torch.randn(5, 6).numpy()})
    assert (
        len(recommender.retriever.lists["prior_count"]) == 3005
        and len(recommender.retriever.lists["prior_text"]) == 3005
    )
    twin_history = [[new[0]]]
    assert recommender.recommend(twin_history, k=5) == MissrecRecommender(model).recommend(twin_history, k=5)


def test_the_flag_switches_the_prior_and_a_calibrated_backbone_hands_on_its_weights(tmp_path):
    import json
    import shutil

    from test_shipped_model import SHIPPED

    folder = write_twin_dataset(tmp_path / "data", text_width=384)
    catalog = load_item_catalog(folder, feature_files={"text": "Twin.text.npy"})
    # From scratch the prior is on unless asked off (it measured better; the paper's scoring is `false`).
    assert build_model(ModelArguments(mode="inductive"), catalog).history_prior is not None
    assert build_model(ModelArguments(mode="inductive", history_prior=False), catalog).history_prior is None
    calibrated = tmp_path / "calibrated"
    shutil.copytree(SHIPPED, calibrated)
    config = json.loads((calibrated / "config.json").read_text())
    start = {"text_cosine": 1.5, "in_history": -2.0, "log_count": 0.25}
    config.update(history_prior=True, history_prior_init=start)
    (calibrated / "config.json").write_text(json.dumps(config))
    model = build_model(ModelArguments(str(calibrated), mode="inductive"), catalog)
    assert model.history_prior.weights() == pytest.approx(start)
    off = build_model(ModelArguments(str(calibrated), mode="inductive", history_prior=False), catalog)
    assert off.history_prior is None
    # A pre-trained model without the prior brings its own setting: off, unless asked.
    config.update(history_prior=False)
    (calibrated / "config.json").write_text(json.dumps(config))
    assert build_model(ModelArguments(str(calibrated), mode="inductive"), catalog).history_prior is None


def test_the_temperature_is_0_1_from_scratch_transductive_with_the_prior_and_the_backbones_own_on_transfer(tmp_path):
    from test_shipped_model import SHIPPED

    folder = write_twin_dataset(tmp_path / "data", text_width=384)
    catalog = load_item_catalog(folder, feature_files={"text": "Twin.text.npy"})

    def temperature(mode: str = "transductive", **model_args) -> float:
        return build_model(ModelArguments(mode=mode, **model_args), catalog).config.temperature

    # From scratch, transductive: 0.1 with the prior (measured better on both sets), the paper's 0.07 without it;
    # inductive the paper's (better on one set only); a flag or override wins.
    assert temperature() == 0.1
    assert temperature("inductive") == 0.07
    assert temperature("inductive", temperature=0.1) == 0.1
    assert temperature(history_prior=False) == MissrecConfig().temperature == 0.07
    assert temperature(temperature=0.07) == 0.07
    assert temperature(config_overrides="temperature=0.2") == 0.2
    assert temperature(config_overrides="history_prior=false") == 0.07
    off = build_model(ModelArguments(mode="transductive", config_overrides="history_prior=False"), catalog)
    assert off.history_prior is None and off.config.temperature == 0.07  # Python's spelling is a boolean too
    # Transfer keeps the pre-trained model's own (the shipped one's is the paper's), unless asked.
    assert temperature(model_name_or_path=str(SHIPPED)) == 0.07
    assert temperature(model_name_or_path=str(SHIPPED), history_prior=True) == 0.07
    assert temperature(model_name_or_path=str(SHIPPED), temperature=0.1) == 0.1
    with pytest.raises(ValueError, match="temperature"):
        ModelArguments(temperature=0.0)
    with pytest.raises(ValueError, match="disagree"):  # which one would win is not for the user to guess
        ModelArguments(temperature=0.15, config_overrides="temperature=0.2")
    assert ModelArguments(temperature=0.2, config_overrides="temperature=0.2").temperature == 0.2


def prior_scores(model, item_ids) -> torch.Tensor:
    with torch.no_grad():
        return model.history_prior(HISTORY, None, model.item_features, item_ids)


def test_the_kept_cosine_table_answers_as_the_products_and_follows_the_features(monkeypatch):
    model = tiny_model(use_item_ids=False)  # inductive, so that items can be added
    set_weights(model)
    candidates = torch.tensor([5, 1, 30, 5, 17])
    prior_scores(model, candidates)
    assert not model.history_prior._cosine_tables  # a few candidates do not pay for a whole table...
    kept = [prior_scores(model, range(1, NUM_ITEMS + 1)), prior_scores(model, candidates)]
    assert set(model.history_prior._cosine_tables) == {"text", "image"}  # ... a catalogue block does
    with monkeypatch.context() as patch:
        patch.setattr(MissrecHistoryPrior, "cosine_table_max_bytes", 0)
        products = [prior_scores(model, range(1, NUM_ITEMS + 1)), prior_scores(model, candidates)]
    for table, product in zip(kept, products, strict=True):
        torch.testing.assert_close(table, product)
    # Features changed in place, or replaced by a grown catalogue: the table is rebuilt, never served stale.
    with torch.no_grad():
        model.item_features["text"][[3, 4, 30]] *= -1.0
    flipped = prior_scores(model, range(1, NUM_ITEMS + 1))
    assert not torch.allclose(flipped, kept[0])
    with monkeypatch.context() as patch:
        patch.setattr(MissrecHistoryPrior, "cosine_table_max_bytes", 0)
        torch.testing.assert_close(flipped, prior_scores(model, range(1, NUM_ITEMS + 1)))
    model.add_items({"text": torch.randn(2, 8), "image": torch.randn(2, 6)})
    grown = prior_scores(model, range(1, NUM_ITEMS + 3))
    assert grown.shape == (4, NUM_ITEMS + 2)
    with monkeypatch.context() as patch:
        patch.setattr(MissrecHistoryPrior, "cosine_table_max_bytes", 0)
        torch.testing.assert_close(grown, prior_scores(model, range(1, NUM_ITEMS + 3)))
    copy.deepcopy(model)  # the kept table (a weak reference) neither breaks copying nor pickling
    pickle.loads(pickle.dumps(model))


def test_the_cosine_table_is_built_once_in_float32_even_under_autocast(monkeypatch):
    model = tiny_model()
    set_weights(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(HISTORY)  # a bf16 training-style forward builds the tables first
    tables = {m: kept[2] for m, kept in model.history_prior._cosine_tables.items()}
    assert all(table.dtype == torch.float32 for table in tables.values())
    scores = prior_scores(model, range(1, NUM_ITEMS + 1))
    assert all(model.history_prior._cosine_tables[m][2] is table for m, table in tables.items())  # reused
    with monkeypatch.context() as patch:
        patch.setattr(MissrecHistoryPrior, "cosine_table_max_bytes", 0)
        torch.testing.assert_close(scores, prior_scores(model, range(1, NUM_ITEMS + 1)))
    assert not model.history_prior._cosine_tables  # over the budget: the kept tables are released
    prior_scores(model, range(1, NUM_ITEMS + 1))
    model.history_prior.release_cosine_tables()  # for writers behind torch's back (`.data`, numpy)
    assert not model.history_prior._cosine_tables
