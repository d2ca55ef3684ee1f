"""Ranking evaluation over a split (`modeling_missrec.evaluation`): the streamed ranks are the brute-force
ranks of the model's logits, and a multi-process gather refuses batches it would cut."""

from __future__ import annotations

import pytest
import torch
from test_trainer import TINY, make_trainer, write_planted_dataset

from modeling_missrec.data import HistoryDataset, build_loader, identity_collate, load_atomic_dataset, load_item_catalog
from modeling_missrec.evaluation import evaluate_ranking
from modeling_missrec.metrics import reference_ranks
from modeling_missrec.training_args import DataArguments, ModelArguments
from modeling_missrec.transfer import build_model


def test_streaming_evaluation_equals_brute_force_ranking_of_the_logits(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    trainer = make_trainer(folder, tmp_path / "out", num_train_epochs=1)
    trainer.train()
    model = trainer.unwrapped.eval().cpu()  # the trainer put it on the accelerator
    dataset = HistoryDataset(load_atomic_dataset(folder, cache_dir=folder / "cache")["valid"], 50)
    batch = dataset.__getitems__(list(range(len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=17, collate_fn=identity_collate)
    for exclude in (False, True):
        _, _, ranks = evaluate_ranking(model, loader, exclude_history=exclude, block_size=7)
        with torch.no_grad():
            logits = model(batch["input_ids"]).logits
        expected = reference_ranks(logits, batch["labels"], batch["input_ids"] if exclude else None)
        assert torch.equal(ranks, expected)


def test_multi_process_evaluation_refuses_batches_of_unequal_size(tmp_path):
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard

    folder = write_planted_dataset(tmp_path / "data")
    split = load_atomic_dataset(folder, cache_dir=folder / "cache")["valid"]
    data_args = DataArguments(data_dir=str(folder), text_features="Toy.text.npy", image_features="Toy.image.npy")
    model = build_model(
        ModelArguments(config_overrides=TINY), load_item_catalog(folder, feature_files=data_args.feature_files())
    )
    two_processes = SimpleNamespace(num_processes=2)
    for min_fill, fails in ((0.9, True), (0.0, False)):
        loader = build_loader(split, 50, 40, False, 0, True, 0, min_fill)
        shard = BatchSamplerShard(loader.batch_sampler, num_processes=2, process_index=0)  # as prepare() wraps it
        sharded = torch.utils.data.DataLoader(loader.dataset, batch_sampler=shard, collate_fn=identity_collate)
        if fails:
            with pytest.raises(ValueError, match="equal size"):
                evaluate_ranking(model, sharded, two_processes)
        else:  # gets past the check, to the gather a real process group would do
            with pytest.raises(AttributeError, match="gather_for_metrics"):
                evaluate_ranking(model, sharded, two_processes)
