"""Shapes that repeat, for torch.compile and GPUs: interest sets of a static width, histories padded to a multiple
of a length, and a compiled training step. Each gives the values of the reference path (up to float rounding)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_trainer import write_planted_dataset

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec.data import load_atomic_dataset, load_item_catalog, pad_histories
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import DataArguments, ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model

NO_DROPOUT = (
    "hidden_size=32,num_attention_heads=2,intermediate_size=64,hidden_dropout_prob=0.0,attention_dropout_prob=0.0"
)


def twin_models(
    changed: dict, **config
) -> tuple[MissrecForSequentialRecommendation, MissrecForSequentialRecommendation]:
    """Two tiny models with the same weights, catalogue and interests, the second with the `changed` config
    fields (a way of computing that must not change the values), both in eval mode (no dropout)."""
    base = {**dict(hidden_size=32, num_attention_heads=2, intermediate_size=48, num_items=30, text_feature_size=6,
                   image_feature_size=5, max_seq_length=12), **config}  # fmt: skip
    torch.manual_seed(0)
    reference = MissrecForSequentialRecommendation(MissrecConfig(**base))
    features = {"text": torch.randn(30, 6), "image": torch.randn(30, 5)}
    features["image"][::4] = 0  # some items lack their image
    reference.load_item_features(features)
    reference.refresh_interests(seed=0)
    other = MissrecForSequentialRecommendation(MissrecConfig(**{**base, **changed}))
    other.load_item_features(features)
    other.missrec.interest_tokenizer.resize(reference.config.num_interests)
    other.config.num_interests = reference.config.num_interests
    other.load_state_dict(reference.state_dict())
    return reference.eval(), other.eval()


@pytest.mark.parametrize("pooling", ["mean", "original", "batch_share"])
def test_static_interest_sets_and_padded_histories_give_the_same_scores(pooling):
    longest, static = twin_models({"interest_set_width": "static"}, interest_reg_pooling=pooling)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 3, 7, 5])
    input_ids = torch.randint(1, 31, (4, 7), generator=generator)
    input_ids[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    labels = torch.tensor([2, 9, 30, 11])
    padded = torch.nn.functional.pad(input_ids, (0, 5))  # to max_seq_length, as pad_to_multiple_of may
    with torch.no_grad():
        reference = longest(input_ids, labels=labels)
        for model, ids in ((static, input_ids), (longest, padded), (static, padded)):
            sets = model.missrec.interest_tokenizer(ids)[0]
            assert sets.shape[1] == (2 * ids.shape[1] if model is static else reference_width(longest, input_ids))
            out = model(ids, labels=labels)
            torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.loss, reference.loss, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                model.missrec(
                    ids, item_features={m: f[ids] for m, f in model.item_features.items()}
                ).interest_regularization,
                longest.missrec(
                    input_ids, item_features={m: f[input_ids] for m, f in longest.item_features.items()}
                ).interest_regularization,
            )


def test_histories_are_padded_to_a_multiple_but_never_past_max_seq_length():
    items = np.arange(1, 21, dtype=np.int64)
    offsets = np.array([0, 3, 8, 20])
    padded, lengths = pad_histories(items, offsets, np.array([0, 1]), 12, pad_to_multiple_of=8)
    assert padded.shape == (2, 8) and lengths.tolist() == [3, 5]
    assert padded[0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    padded, lengths = pad_histories(items, offsets, np.array([2]), 10, pad_to_multiple_of=8)
    assert padded.shape == (1, 10) and padded[0].tolist() == list(range(11, 21))  # 16 would pass the limit
    exact, _ = pad_histories(items, offsets, np.array([0, 1]), 12)
    assert exact.shape == (2, 5)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        TrainingArguments(output_dir="unused", pad_to_multiple_of=0)


def reference_width(model, input_ids) -> int:
    """The largest interest set of the batch: the width of the "longest" sets."""
    ids = model.missrec.interest_tokenizer.item_interest_ids[:, input_ids]  # [M, B, L]
    return max(len(set(ids[:, row].flatten().tolist()) - {0}) for row in range(input_ids.shape[0]))


def _trainer(folder, output_dir, **training) -> MissrecTrainer:
    data_args = DataArguments(data_dir=str(folder), text_features="Toy.text.npy", image_features="Toy.image.npy")
    catalog = load_item_catalog(folder, feature_files=data_args.feature_files())
    torch.manual_seed(0)
    overrides = f"{NO_DROPOUT},interest_set_width=static"
    model = build_model(ModelArguments(mode="transductive", config_overrides=overrides), catalog)
    settings = dict(output_dir=str(output_dir), train_batch_size=64, eval_batch_size=50, learning_rate=5e-3, seed=7,
                    report_to="none", disable_tqdm=True, num_train_epochs=1, max_steps_per_epoch=3,
                    pad_to_multiple_of=8, **training)  # fmt: skip
    return MissrecTrainer(model, load_atomic_dataset(folder, cache_dir=folder / "cache"), catalog,
                          TrainingArguments(**settings))  # fmt: skip


def test_a_compiled_training_step_follows_the_eager_one(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    runs = {}
    for compiled in (False, True):
        trainer = _trainer(folder, tmp_path / f"compiled-{compiled}", torch_compile=compiled)
        trainer.train()
        assert (trainer._compiled is not None) == compiled  # built by the training step itself
        metrics = json.loads((tmp_path / f"compiled-{compiled}" / "metrics.json").read_text())
        runs[compiled] = ([h["loss"] for h in metrics["history"]], trainer.unwrapped.state_dict())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    compiled_weights, eager_weights = runs[True][1], runs[False][1]
    worst = max((compiled_weights[n].float() - eager_weights[n].float()).abs().max().item() for n in eager_weights)
    # Adam moves a weight by up to lr (5e-3) per step whatever its gradient's size, so rounding differences of
    # near-zero gradients show as up to ~1e-3 after 3 steps (7e-4 measured); a wrong step moves 1e-2.
    assert worst < 2e-3
