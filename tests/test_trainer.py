"""The fine-tuning loop: it learns, it resumes to the same result, it writes what a user expects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_missrec import MissrecForSequentialRecommendation
from modeling_missrec.data import HistoryDataset, identity_collate, load_atomic_dataset, load_item_catalog
from modeling_missrec.evaluation import evaluate_ranking
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import DataArguments, ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model

TINY = "hidden_size=32,num_attention_heads=2,intermediate_size=64,hidden_dropout_prob=0.1,attention_dropout_prob=0.1"


def write_planted_dataset(folder, num_items=40, num_users=160, seed=0):
    """Histories walk the catalogue one step at a time: the next item is always (last % N) + 1."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    rows = {"train": [], "valid": [], "test": []}
    for user in range(num_users):
        start, length = int(rng.integers(num_items)), int(rng.integers(5, 9))
        walk = [(start + step) % num_items for step in range(length)]  # 0-based indices
        for t in range(1, length - 2):
            rows["train"].append(f"{user}\t{' '.join(map(str, walk[:t]))}\t{walk[t]}\n")
        rows["valid"].append(f"{user}\t{' '.join(map(str, walk[: length - 2]))}\t{walk[length - 2]}\n")
        rows["test"].append(f"{user}\t{' '.join(map(str, walk[: length - 1]))}\t{walk[length - 1]}\n")
    for split, lines in rows.items():
        (folder / f"Toy.{split}.inter").write_text(header + "".join(lines))
    (folder / "Toy.item2index").write_text("".join(f"item{i}\t{i}\n" for i in range(num_items)))
    (folder / "Toy.user2index").write_text("".join(f"user{u}\t{u}\n" for u in range(num_users)))
    np.save(folder / "Toy.text.npy", rng.normal(size=(num_items, 12)).astype(np.float32))
    np.save(folder / "Toy.image.npy", rng.normal(size=(num_items, 10)).astype(np.float32))
    return folder


def make_trainer(folder, output_dir, mode="transductive", history_prior=None, **training):
    data_args = DataArguments(data_dir=str(folder), text_features="Toy.text.npy", image_features="Toy.image.npy")
    dataset = load_atomic_dataset(folder, cache_dir=folder / "cache")
    catalog = load_item_catalog(folder, feature_files=data_args.feature_files())
    torch.manual_seed(0)
    model = build_model(ModelArguments(mode=mode, history_prior=history_prior, config_overrides=TINY), catalog)
    settings = dict(
        output_dir=str(output_dir),
        train_batch_size=64,
        eval_batch_size=50,
        learning_rate=5e-3,
        seed=7,
        report_to="none",
        disable_tqdm=True,
    )
    settings.update(training)
    return MissrecTrainer(model, dataset, catalog, TrainingArguments(**settings))


@pytest.mark.parametrize("mode", ["transductive", "inductive"])
def test_learns_a_planted_next_item_rule(tmp_path, mode):
    folder = write_planted_dataset(tmp_path / "data")
    metrics = make_trainer(folder, tmp_path / "out", mode=mode, num_train_epochs=12).train()
    assert metrics["test"]["hr@10"] > 0.9, metrics["test"]
    assert metrics["test"]["ndcg@10"] > 0.6, metrics["test"]


def test_an_untrained_model_does_not_pass_the_learning_bar(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    trainer = make_trainer(folder, tmp_path / "out", num_train_epochs=1, max_steps_per_epoch=0)
    metrics = trainer.train()
    assert metrics["test"]["hr@10"] < 0.6


def test_outputs_are_a_loadable_model_and_metrics(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    out = tmp_path / "out"
    metrics = make_trainer(folder, out, num_train_epochs=2).train()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_epoch"] in (0, 1) and saved["epochs_run"] == 2
    for split in ("valid", "test", "test_at_k_plus_1"):
        assert set(saved[split]) >= {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"}
    assert saved["test_at_k_plus_1"]["hr@10"] >= saved["test"]["hr@10"]
    assert "| test |" in (out / "results.md").read_text()
    assert json.loads((out / "item_ids.json").read_text())["raw_item_ids"][:2] == ["item0", "item1"]
    model = MissrecForSequentialRecommendation.from_pretrained(out)
    assert model.config.num_items == 40 and model.config.num_interests > 0
    assert metrics["test"] == saved["test"]
    # the final model is the best one: re-evaluating it gives the reported test numbers
    dataset = load_atomic_dataset(folder, cache_dir=folder / "cache")
    loader = torch.utils.data.DataLoader(
        HistoryDataset(dataset["test"], 12), batch_size=33, collate_fn=identity_collate
    )
    again, _, _ = evaluate_ranking(model, loader)
    assert again == pytest.approx(saved["test"])


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    straight = tmp_path / "straight"
    make_trainer(folder, straight, num_train_epochs=4).train()
    resumed = tmp_path / "resumed"
    make_trainer(folder, resumed, num_train_epochs=2).train()  # "killed" after epoch 2 (index 1)
    make_trainer(folder, resumed, num_train_epochs=4, resume_from_checkpoint="latest").train()
    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    history_a = json.loads((straight / "metrics.json").read_text())["history"]
    history_b = json.loads((resumed / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]


def test_resume_needs_a_finished_epoch(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    trainer = make_trainer(folder, tmp_path / "out", num_train_epochs=1, resume_from_checkpoint="latest")
    with pytest.raises(FileNotFoundError, match="trainer_state.json not found"):
        trainer.train()


def test_evaluation_batches_cut_by_length_rank_like_fixed_size_batches(tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    # 160 users with histories of 3 to 6 items: the fixed batches are 150 + 10 users, the filled ones one per
    # length, so the last is longer than 10 (what Accelerate's gather_for_metrics would cut it to)
    filled = make_trainer(folder, tmp_path / "filled", eval_batch_size=150, eval_min_fill=0.9)
    fixed = make_trainer(folder, tmp_path / "fixed", eval_batch_size=150, eval_min_fill=0.0)
    assert len(filled.valid_loader) > len(fixed.valid_loader) == 2
    assert len(list(filled.valid_loader)[-1]["labels"]) > 10
    fills = [int(batch["attention_mask"].sum(1).min()) / batch["input_ids"].shape[1] for batch in filled.valid_loader]
    assert min(fills) >= 0.9
    for model in (filled.unwrapped, fixed.unwrapped):
        model.refresh_interests(seed=0)
    _, _, filled_ranks = filled._evaluate(filled.valid_loader, "valid")
    _, _, fixed_ranks = fixed._evaluate(fixed.valid_loader, "valid")
    assert filled_ranks.numel() == 160
    assert torch.equal(filled_ranks, fixed_ranks)  # same users in the same (longest-first) order
    with pytest.raises(ValueError, match="eval_min_fill"):
        TrainingArguments(output_dir=str(tmp_path), eval_min_fill=1.5)


def test_a_learning_rate_schedule_runs_over_the_epochs_and_resumes_exactly(tmp_path):
    from unittest import mock

    folder = write_planted_dataset(tmp_path / "data")
    schedule = dict(num_train_epochs=4, lr_scheduler_type="linear", warmup_ratio=0.25, optimizer="adamw")
    straight = make_trainer(folder, tmp_path / "straight", **schedule, weight_decay=0.01)
    per_epoch = len(straight.train_loader)
    seen = []
    scheduler_class = type(straight.scheduler)
    real_step = scheduler_class.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    with mock.patch.object(scheduler_class, "step", recording_step):
        straight.train()
    assert isinstance(straight.optimizer.optimizer, torch.optim.AdamW)
    total, warmup = 4 * per_epoch, per_epoch  # warmup_ratio 0.25 of 4 epochs
    assert len(seen) == total
    assert seen[0] == 0.0 and seen[warmup] == pytest.approx(5e-3)  # warms up from 0 to the learning rate ...
    assert seen[-1] == pytest.approx(5e-3 / (total - warmup))  # ... then decays linearly towards 0
    assert straight.optimizer.param_groups[0]["lr"] == 0.0

    resumed_dir = tmp_path / "resumed"
    killed = make_trainer(folder, resumed_dir, **schedule, weight_decay=0.01)
    real = killed.cluster_and_train

    def die_at_the_third_epoch(epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(epoch, *args)

    with mock.patch.object(killed, "cluster_and_train", side_effect=die_at_the_third_epoch):
        with pytest.raises(KeyboardInterrupt):
            killed.train()
    make_trainer(folder, resumed_dir, **schedule, weight_decay=0.01, resume_from_checkpoint="latest").train()
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "model.safetensors"))
    b = load_file(str(resumed_dir / "checkpoint" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_bad_optimiser_and_schedule_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"optimizer='sgd' is invalid; allowed: \['adam', 'adamw'\]"):
        TrainingArguments(output_dir=str(tmp_path), optimizer="sgd")
    with pytest.raises(ValueError, match="lr_scheduler_type='cosine_restarts' is invalid"):
        TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine_restarts")
    with pytest.raises(ValueError, match=r"warmup_ratio=1\.0 is invalid"):
        TrainingArguments(output_dir=str(tmp_path), warmup_ratio=1.0)
