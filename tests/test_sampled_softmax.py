"""The sampled-softmax loss (`loss_type="sampled"`): the same logits as the full model on its candidates, the
logQ correction and accidental-hit mask as documented, both modes, both samplers, and a real training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_trainer import TINY, write_planted_dataset

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec.data import load_atomic_dataset, load_item_catalog
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model

NUM_ITEMS = 60


def tiny_model(use_item_ids: bool, sampling: str, modalities=("text", "image")) -> MissrecForSequentialRecommendation:
    torch.manual_seed(0)
    config = MissrecConfig(
        hidden_size=16, num_attention_heads=2, intermediate_size=32, text_feature_size=8, image_feature_size=6,
        num_items=NUM_ITEMS, max_seq_length=10, use_item_ids=use_item_ids, modalities=list(modalities),
        hidden_dropout_prob=0.0, attention_dropout_prob=0.0, loss_type="sampled", num_negatives=25,
        negative_sampling=sampling, fusion_factor_init=1.5,
    )  # fmt: skip
    model = MissrecForSequentialRecommendation(config)
    image = torch.randn(NUM_ITEMS, 6)
    image[::5] = 0  # some items have no image
    features = {"text": torch.randn(NUM_ITEMS, 8), "image": image}
    model.load_item_features({m: features[m] for m in modalities})
    model.refresh_interests(seed=0)
    counts = torch.randint(0, 20, (NUM_ITEMS + 1,)).float()
    counts[1] = 0  # never a target: its correction must stay finite
    model.set_target_frequencies(counts)
    model.counts = counts  # for the tests' own reference
    return model.train()


@pytest.mark.parametrize("use_item_ids", [True, False])
@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
@pytest.mark.parametrize("modalities", [("text", "image"), ("text",)])
def test_the_sampled_loss_is_the_full_models_logits_on_its_candidates(use_item_ids, sampling, modalities):
    model = tiny_model(use_item_ids, sampling, modalities)
    history = torch.tensor([[3, 4, 5, 0], [7, 8, 9, 10], [12, 0, 0, 0], [3, 9, 0, 0], [20, 21, 22, 0]])
    labels = torch.tensor([6, 11, 13, 6, 23])  # a repeated target: an accidental hit in the other row
    torch.manual_seed(42)
    sampled = model(history, labels=labels)

    # the reference: the whole catalogue's logits, the same negatives, the documented correction and mask
    torch.manual_seed(42)
    negatives, negative_probability = model.sample_negatives(25, history.device)
    model.config.loss_type = "full"
    full = model(history, labels=labels)
    model.config.loss_type = "sampled"
    candidates = torch.cat([labels, negatives])
    # the documented correction from the raw counts: add-one smoothed target shares, the sampler's draw shares
    smoothed = model.counts + 1
    smoothed[0] = 0
    target_share = smoothed / smoothed.sum()
    draw_share = target_share if sampling == "popularity" else torch.full_like(target_share, 1 / NUM_ITEMS)
    expected = len(labels) * target_share + len(negatives) * draw_share
    logits = full.logits[:, candidates] - expected[candidates].log()
    assert torch.isfinite(expected[1].log())
    hit = (candidates.unsqueeze(0) == labels.unsqueeze(1)) & ~torch.eye(len(labels), len(candidates), dtype=torch.bool)
    logits = logits.masked_fill(hit, float("-inf"))
    assert hit[0, 3] and hit[3, 0]  # rows 0 and 3 share their target
    torch.testing.assert_close(sampled.logits, logits, rtol=1e-5, atol=1e-5)
    cross_entropy = F.cross_entropy(logits, torch.arange(len(labels)))
    regulariser = full.loss - F.cross_entropy(full.logits, labels)
    torch.testing.assert_close(sampled.loss, cross_entropy + regulariser, rtol=1e-5, atol=1e-5)


def test_gradients_reach_exactly_the_items_of_the_step():
    model = tiny_model(True, "uniform")
    history = torch.tensor([[3, 4, 5], [7, 8, 9]])
    torch.manual_seed(7)
    model(history, labels=torch.tensor([6, 11])).loss.backward()
    torch.manual_seed(7)
    negatives, _ = model.sample_negatives(25, history.device)
    grad = model.missrec.item_embeddings.weight.grad
    touched = set(grad.abs().sum(1).nonzero().squeeze(1).tolist())
    assert touched == {3, 4, 5, 6, 7, 8, 9, 11} | set(negatives.tolist())
    assert model.missrec.adaptors["text"].weight.grad.abs().sum() > 0


def test_popularity_sampling_needs_the_target_frequencies():
    model = tiny_model(False, "popularity")
    del model.target_probability
    with pytest.raises(ValueError, match="set_target_frequencies"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="loss_type='bogus' is invalid"):
        MissrecConfig(loss_type="bogus")


def test_fine_tuning_with_the_sampled_loss_learns_and_ranks_the_whole_catalogue(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    dataset = load_atomic_dataset(folder, cache_dir=tmp_path / "cache")
    catalog = load_item_catalog(folder, feature_files={"text": "Toy.text.npy", "image": "Toy.image.npy"})
    overrides = TINY + ",loss_type=sampled,num_negatives=16,negative_sampling=popularity"
    model = build_model(ModelArguments(config_overrides=overrides), catalog)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=4, train_batch_size=32, eval_batch_size=16,
        report_to="none", disable_tqdm=True, learning_rate=0.005,
    )  # fmt: skip
    metrics = MissrecTrainer(model, dataset, catalog, args).train()
    losses = [epoch["loss"] for epoch in metrics["history"]]
    assert losses[-1] < losses[0]
    reloaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path / "out")
    assert reloaded.config.loss_type == "sampled"
    assert reloaded(torch.tensor([[1, 2]])).logits.shape == (1, catalog.num_items + 1)  # inference: every item
