"""Pre-training: the corpus, aligned augmentation, duplicate masking, real two-process data parallelism,
pre-train -> save -> transfer (frozen, LoRA), resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_step import losses_and_gradients, tiny_pretraining_setup
from safetensors.torch import load_file
from test_modeling import record_last_layer_widths

from modeling_missrec import MissrecForPreTraining, MissrecForSequentialRecommendation
from modeling_missrec.data import (
    HistoryDataset,
    PretrainingCollator,
    build_loader,
    item_drop,
    load_atomic_dataset,
    load_item_catalog,
    load_pretraining_corpus,
)
from modeling_missrec.evaluation import evaluate_ranking
from modeling_missrec.trainer import MissrecPretrainer, MissrecTrainer
from modeling_missrec.training_args import (
    ModelArguments,
    PretrainingArguments,
    PretrainModelArguments,
    TrainingArguments,
)
from modeling_missrec.transfer import build_model, build_pretraining_model

TINY = "hidden_size=16,num_attention_heads=2,intermediate_size=32,hidden_dropout_prob=0.0,attention_dropout_prob=0.0"


def write_domain(folder, name, num_items, num_users, text_width=12, image_width=10, seed=0, missing_images=3):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    rows = {"train": [], "valid": [], "test": []}
    for user in range(num_users):
        length = int(rng.integers(5, 9))
        walk = [(int(rng.integers(num_items)) + step) % num_items for step in range(length)]
        for t in range(1, length - 2):
            rows["train"].append(f"{user}\t{' '.join(map(str, walk[:t]))}\t{walk[t]}\n")
        rows["valid"].append(f"{user}\t{' '.join(map(str, walk[: length - 2]))}\t{walk[length - 2]}\n")
        rows["test"].append(f"{user}\t{' '.join(map(str, walk[: length - 1]))}\t{walk[length - 1]}\n")
    for split, lines in rows.items():
        (folder / f"{name}.{split}.inter").write_text(header + "".join(lines))
    (folder / f"{name}.item2index").write_text("".join(f"{name}-{i}\t{i}\n" for i in range(num_items)))
    image = rng.normal(size=(num_items, image_width)).astype(np.float32)
    image[:missing_images] = 0
    np.save(folder / f"{name}.text.npy", rng.normal(size=(num_items, text_width)).astype(np.float32))
    np.save(folder / f"{name}.image.npy", image)
    np.save(folder / f"{name}.textaug.npy", rng.normal(size=(num_items, text_width)).astype(np.float32))
    return folder


FILES = {"text": "{name}.text.npy", "image": "{name}.image.npy"}


@pytest.fixture()
def corpus(tmp_path):
    domains = [write_domain(tmp_path / "A", "A", 20, 30, seed=1), write_domain(tmp_path / "B", "B", 25, 30, seed=2)]
    return load_pretraining_corpus(domains, FILES, augmented_text_file="{name}.textaug.npy")


# ------------------------------------------------------------------------------------------------ corpus
def test_domains_are_merged_with_offset_item_ids(corpus, tmp_path):
    assert corpus.num_items == 45 and corpus.domain_names == ["A", "B"]
    assert list(corpus.item_offsets) == [0, 20, 45]
    b_text = np.load(tmp_path / "B" / "B.text.npy")
    np.testing.assert_array_equal(corpus.features["text"].gather(np.array([21, 45])), b_text[[0, 24]])
    assert not corpus.present["image"][[0, 1, 2, 3, 21, 22, 23]].any() and corpus.present["image"][[4, 24]].all()
    rows = corpus.train["target"]
    assert rows.min() >= 1 and rows.max() <= 45 and (rows > 20).any()


def test_item_drop_keeps_order_and_first_item():
    ids = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 0, 0, 0, 0]])
    for seed in range(20):
        dropped = item_drop(ids, 0.5, np.random.default_rng(seed))
        for row, original in zip(dropped, ids):
            kept = row[row != 0].tolist()
            assert kept[0] == original[0]
            positions = [original.tolist().index(i) for i in kept]
            assert positions == sorted(positions), "order preserved"


def test_augmented_view_keeps_text_and_image_aligned(corpus):
    collator = PretrainingCollator(corpus, item_drop_prob=1.0, item_drop_ratio=0.5, seed=3)
    batch = HistoryDataset(corpus.train, 50).__getitems__(list(range(16)))
    out = collator(batch)
    ids = out["augmented_input_ids"].numpy()
    assert (ids != batch["input_ids"].numpy()[:, : ids.shape[1]]).any(), "something was dropped"
    for modality in ("text", "image"):
        expected = corpus.features[modality].gather(ids)
        np.testing.assert_array_equal(out["augmented_item_features"][modality].numpy(), expected)
    np.testing.assert_array_equal(out["augmented_modality_mask"][1].numpy(), corpus.present["image"][ids])


def test_word_drop_swaps_only_text_features(corpus):
    collator = PretrainingCollator(corpus, item_drop_prob=0.0, word_drop_ratio=1.0, seed=3)
    batch = HistoryDataset(corpus.train, 50).__getitems__(list(range(8)))
    out = collator(batch)
    ids = batch["input_ids"].numpy()
    assert torch.equal(out["augmented_input_ids"], batch["input_ids"])
    np.testing.assert_array_equal(out["augmented_item_features"]["text"].numpy(), corpus.augmented_text.gather(ids))
    assert torch.equal(out["augmented_item_features"]["image"], out["item_features"]["image"])


# ------------------------------------------------------------------------------------------- the objective
def test_duplicate_targets_are_not_negatives():
    model, batch = tiny_pretraining_setup()
    masked = model(**batch).sequence_item_loss
    model.config.mask_duplicate_targets = False
    unmasked = model(**batch).sequence_item_loss
    assert masked < unmasked
    # by hand: row 1's logit for row 5's (identical) target is removed
    sequence = model.missrec(batch["input_ids"], item_features=batch["item_features"]).sequence_embedding
    from modeling_missrec.modeling_missrec import ItemTokens

    tokens = torch.nn.functional.normalize(model.missrec.adapt(batch["target_features"]), dim=-1)
    present = torch.stack([batch["target_features"][m].ne(0).any(-1) for m in ("text", "image")])
    logits = model.fusion(sequence, ItemTokens(tokens, present, None)) / model.config.temperature
    logits[1, 5] = logits[5, 1] = float("-inf")
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(8))
    torch.testing.assert_close(masked, expected)


def test_pretraining_losses_and_gradients_match_the_every_position_reference():
    model, batch = tiny_pretraining_setup()
    widths = record_last_layer_widths(model.missrec.decoder)
    results = []
    for last_position_only in (True, False):
        model.config.last_position_only = last_position_only
        results.append(losses_and_gradients(model, batch))
    assert widths == [1, 1, 6, 6]  # history and augmented view: one row each, then every position
    (item, seq, fast), (item_ref, seq_ref, reference) = results
    torch.testing.assert_close(item, item_ref)
    torch.testing.assert_close(seq, seq_ref)
    assert fast.keys() == reference.keys()
    for name, gradient in fast.items():
        torch.testing.assert_close(gradient, reference[name], msg=name)


@pytest.mark.parametrize("first_share", [4, 5], ids=["even", "uneven"])
def test_two_processes_take_the_same_step_as_one_process_on_the_global_batch(tmp_path, first_share):
    # A real two-rank gloo group in fresh processes (forking this already-threaded test process can deadlock).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(Path(__file__).with_name("distributed_step.py")),
        str(tmp_path),
        str(first_share),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "two.pt", weights_only=True)
    assert result["world"] == 2, "a real two-process group"
    model, batch = tiny_pretraining_setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    output = model(**batch)
    output.loss.backward()
    optimizer.step()
    # the per-process losses (negatives gathered from both) average to the single-process loss
    torch.testing.assert_close(result["losses"][:, 0].mean(), output.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["losses"][:, 1].mean(), output.sequence_item_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, value in model.state_dict().items():
        # SGD: the step is the gradient itself (Adam would blow the ~1e-9 noise of zero gradients up to lr)
        torch.testing.assert_close(result["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(
        model.missrec.adaptors["text"].weight, tiny_pretraining_setup()[0].missrec.adaptors["text"].weight
    )


# -------------------------------------------------------------------------- pre-train, save, transfer, resume
def pretrain(corpus, out, epochs=2, **extra):
    torch.manual_seed(0)
    model = build_pretraining_model(PretrainModelArguments(interest_ratio=0.2, config_overrides=TINY), corpus)
    args = PretrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        train_batch_size=32,
        save_every_epochs=1,
        report_to="none",
        disable_tqdm=True,
        seed=5,
        **extra,
    )
    return MissrecPretrainer(model, corpus, args).train()


def test_pretraining_writes_loadable_checkpoints_and_resumes_to_the_same_weights(corpus, tmp_path):
    summary = pretrain(corpus, tmp_path / "straight", epochs=2)
    assert summary["epochs_run"] == 2 and summary["history"][1]["loss"] < summary["history"][0]["loss"] + 1.0
    for folder in ("straight/checkpoint-epoch-1", "straight/checkpoint-epoch-2", "straight"):
        model = MissrecForPreTraining.from_pretrained(tmp_path / folder)
        assert model.config.num_items == 45 and model.config.num_interests > 0
    pretrain(corpus, tmp_path / "resumed", epochs=1)
    pretrain(corpus, tmp_path / "resumed", epochs=2, resume_from_checkpoint="latest")
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def finetune_on_new_domain(tmp_path, pretrained, method, text_width=14):
    folder = write_domain(tmp_path / "C", "C", 18, 40, text_width=text_width, seed=9)
    dataset = load_atomic_dataset(folder, cache_dir=tmp_path / "cache")
    catalog = load_item_catalog(folder, feature_files={m: f.format(name="C") for m, f in FILES.items()})
    torch.manual_seed(0)
    model = build_model(
        ModelArguments(model_name_or_path=str(pretrained), finetune_method=method, mode="transductive"), catalog
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ft-{method}"),
        num_train_epochs=2,
        train_batch_size=32,
        eval_batch_size=16,
        report_to="none",
        disable_tqdm=True,
    )
    return model, MissrecTrainer(model, dataset, catalog, args)


def test_frozen_transfer_keeps_the_pretrained_backbone(corpus, tmp_path):
    pretrain(corpus, tmp_path / "pre", epochs=1)
    pretrained = load_file(str(tmp_path / "pre" / "model.safetensors"))
    model, trainer = finetune_on_new_domain(tmp_path, tmp_path / "pre", "frozen")
    hidden = model.config.hidden_size
    # new text width 14: fresh text adaptor; image adaptor (width 10) transferred
    assert torch.equal(model.missrec.adaptors["image"].weight.cpu(), pretrained["missrec.adaptors.image.weight"])
    assert model.missrec.adaptors["text"].in_features == 14
    expected = (14 + 1) * hidden + (10 + 1) * hidden + 2 * hidden + 1 + (18 + 1) * hidden
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    metrics = trainer.train()
    final = load_file(str(tmp_path / "ft-frozen" / "model.safetensors"))
    for name, value in pretrained.items():
        if any(part in name for part in ("encoder", "decoder", "position_embeddings")):
            assert torch.equal(final[name], value), name
    assert not torch.equal(final["missrec.adaptors.image.weight"], pretrained["missrec.adaptors.image.weight"])
    assert metrics["trainable_parameters"] == expected


def test_lora_transfer_saves_an_adapter_and_a_merged_model(corpus, tmp_path):
    from peft import PeftModel

    pretrain(corpus, tmp_path / "pre", epochs=1)
    model, trainer = finetune_on_new_domain(tmp_path, tmp_path / "pre", "lora", text_width=12)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert not any("encoder.layers.0.mlp" in n for n in trainable), "only LoRA inside the transformer"
    trainer.train()
    out = tmp_path / "ft-lora"
    merged = MissrecForSequentialRecommendation.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())
    history = torch.tensor([[1, 2, 3], [4, 5, 0]])
    live = trainer.unwrapped.eval().cpu()  # the trainer put it on the accelerator
    with torch.no_grad():
        torch.testing.assert_close(merged(history).logits, live(input_ids=history).logits, rtol=1e-4, atol=1e-4)
    # the adapter alone, on a freshly built base model, gives the same recommender
    base, _ = finetune_on_new_domain(tmp_path / "again", tmp_path / "pre", "full", text_width=12)
    base.cpu()
    base.missrec.interest_tokenizer.set_state(
        merged.missrec.interest_tokenizer.centroids[1:], merged.missrec.interest_tokenizer.item_interest_ids
    )
    reloaded = PeftModel.from_pretrained(base, out / "lora_adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=history).logits, merged(history).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "metrics.json").read_text())["trainable_parameters"] < 3 * 16 * 19 + 10_000


def test_a_pretraining_checkpoint_is_not_loaded_as_a_recommender(corpus, tmp_path):
    pretrain(corpus, tmp_path / "pre", epochs=1)
    with pytest.raises(ValueError, match="MissrecForPreTraining checkpoint"):
        MissrecForSequentialRecommendation.from_pretrained(tmp_path / "pre")


def test_transfer_refuses_a_transformer_of_another_shape(corpus, tmp_path):
    pretrain(corpus, tmp_path / "pre", epochs=1)
    folder = write_domain(tmp_path / "C", "C", 18, 40, seed=9)
    catalog = load_item_catalog(folder, feature_files={m: f.format(name="C") for m, f in FILES.items()})
    arguments = ModelArguments(
        model_name_or_path=str(tmp_path / "pre"), finetune_method="frozen", config_overrides="intermediate_size=48"
    )
    with pytest.raises(ValueError, match="transformer does not match"):
        build_model(arguments, catalog)


def test_zero_shot_ranks_a_new_domain_with_the_pretrained_model_untouched(corpus, tmp_path):
    import run_finetune

    pretrain(corpus, tmp_path / "pre", epochs=1)
    folder = write_domain(tmp_path / "C", "C", 18, 40, text_width=12, seed=9)
    out = tmp_path / "zero"
    flags = ["--data_dir", str(folder), "--text_features", "C.text.npy", "--image_features", "", "--mode", "inductive"]
    flags += ["--eval_batch_size", "16", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3"]
    flags += ["--output_dir", str(out), "--model_name_or_path", str(tmp_path / "pre")]
    metrics = run_finetune.main([*flags, "--do_train", "false"])
    assert metrics["epochs_run"] == 0 and metrics["history"] == [] and metrics["num_interests"] > 0

    # nothing was trained: every transferred tensor is the pre-trained one
    pretrained = load_file(str(tmp_path / "pre" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    shared = [n for n in pretrained if "missrec." in n and "interest_tokenizer" not in n and "image" not in n]
    assert shared and all(torch.equal(final[n], pretrained[n]) for n in shared)

    # and the figures are those of the loaded model ranked over the new catalogue
    catalog = load_item_catalog(folder, feature_files={"text": "C.text.npy"})
    model = build_model(ModelArguments(model_name_or_path=str(tmp_path / "pre"), mode="inductive"), catalog)
    model.refresh_interests(seed=3)
    split = load_atomic_dataset(folder, cache_dir=tmp_path / "cache")["test"]
    loader = build_loader(split, model.config.max_seq_length, 16, False, 0, 1, 0)
    standard, _, _ = evaluate_ranking(model, loader)
    assert standard == metrics["test"]


def test_zero_shot_needs_a_pretrained_model(tmp_path):
    import run_finetune

    with pytest.raises(ValueError, match="--do_train false evaluates the model as loaded: give --model_name_or_path"):
        run_finetune.main(["--do_train", "false", "--output_dir", str(tmp_path / "out")])


def test_pretraining_logs_the_zero_shot_signal_of_held_out_users(corpus, tmp_path):
    import run_finetune
    from modeling_missrec.training_args import PretrainDataArguments

    held_out = write_domain(tmp_path / "H", "H", 22, 30, seed=4)
    data_args = PretrainDataArguments(
        domain_dirs=[], text_features="{name}.text.npy", image_features="{name}.image.npy",
        validation_dirs=[str(held_out)],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_pretraining_model(PretrainModelArguments(interest_ratio=0.2, config_overrides=TINY), corpus)
    args = PretrainingArguments(
        output_dir=str(tmp_path / "pre"), num_train_epochs=2, train_batch_size=32, save_every_epochs=1,
        report_to="none", disable_tqdm=True, seed=5, eval_batch_size=8,
    )  # fmt: skip
    summary = MissrecPretrainer(model, corpus, args, data_args.load_validation_domains()).train()
    signal = [epoch["zero_shot_valid_ndcg@10"] for epoch in summary["history"]]
    assert [sorted(s) for s in signal] == [["H", "mean"], ["H", "mean"]]
    assert all(0.0 < s["H"] <= 1.0 for s in signal)

    # the figure is what a user gets from the saved epoch with run_finetune.py --do_train false
    flags = ["--data_dir", str(held_out), "--text_features", "H.text.npy", "--image_features", "H.image.npy"]
    flags += ["--mode", "inductive", "--report_to", "none", "--disable_tqdm", "true", "--seed", "6"]
    flags += ["--model_name_or_path", str(tmp_path / "pre" / "checkpoint-epoch-2"), "--do_train", "false"]
    metrics = run_finetune.main([*flags, "--output_dir", str(tmp_path / "zero")])
    assert metrics["valid"]["ndcg@10"] == pytest.approx(signal[1]["H"], abs=1e-12)


def test_domain_batches_draw_each_batch_from_one_domain(corpus, tmp_path):
    domains = corpus.row_domains()
    assert set(domains.tolist()) == {0, 1}
    assert ((corpus.train["target"] > 20) == (domains == 1)).all()  # B's items follow A's 20
    torch.manual_seed(0)
    model = build_pretraining_model(PretrainModelArguments(interest_ratio=0.2, config_overrides=TINY), corpus)
    args = PretrainingArguments(
        output_dir=str(tmp_path / "by-domain"), num_train_epochs=1, train_batch_size=16, report_to="none",
        disable_tqdm=True, seed=5, domain_batches=True,
    )  # fmt: skip
    trainer = MissrecPretrainer(model, corpus, args)
    batches = list(trainer.train_loader.batch_sampler)
    full = [batch for batch in batches if len(batch) == 16]
    mixed = [batch for batch in full if len(set(domains[batch])) > 1]
    assert len(full) >= 4 and len(mixed) <= 1  # only the two domains' pooled leftovers may share a full batch
    assert sorted(i for batch in batches for i in batch) == list(range(len(domains)))
    summary = trainer.train()
    assert summary["epochs_run"] == 1 and np.isfinite(summary["history"][0]["loss"])
