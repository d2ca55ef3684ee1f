"""The pre-trained backbone that ships in the repository (`pretrained/missrec-amazon5-minilm`, written by
`bench/pretrain_amazon5.py`): it loads on a fresh clone, transfers to a new domain with any mix of modalities,
and ranks a new domain zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pretraining import write_domain

import run_finetune
from modeling_missrec import MissrecForPreTraining
from modeling_missrec.data import load_atomic_dataset, load_item_catalog
from modeling_missrec.trainer import MissrecTrainer
from modeling_missrec.training_args import ModelArguments, TrainingArguments
from modeling_missrec.transfer import build_model

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "missrec-amazon5-minilm"


def test_the_shipped_backbone_loads_with_its_card():
    model = MissrecForPreTraining.from_pretrained(SHIPPED)
    config = model.config
    assert config.modalities == ["text"] and config.text_feature_size == 384 and not config.use_item_ids
    assert all(torch.isfinite(p).all() for p in model.parameters())
    card = (SHIPPED / "README.md").read_text(encoding="utf-8")
    assert "license: apache-2.0" in card and "Amazon Review Data" in card and "--model_name_or_path" in card


@pytest.mark.parametrize(
    ("mode", "files"),
    [
        ("transductive", {"text": "C.text.npy", "image": "C.image.npy"}),
        ("inductive", {"text": "C.text.npy"}),
    ],
)
def test_fine_tuning_from_the_shipped_backbone_with_any_modalities(tmp_path, mode, files):
    folder = write_domain(tmp_path / "C", "C", 18, 40, text_width=384, image_width=10, seed=9)
    catalog = load_item_catalog(folder, feature_files=files)
    torch.manual_seed(0)
    model = build_model(ModelArguments(model_name_or_path=str(SHIPPED), finetune_method="full", mode=mode), catalog)
    shipped = load_file(str(SHIPPED / "model.safetensors"))
    # the text adaptor and the transformer come from the shipped weights; an image adaptor starts fresh
    assert torch.equal(model.missrec.adaptors["text"].weight, shipped["missrec.adaptors.text.weight"])
    assert torch.equal(
        model.missrec.encoder.layers[0].mlp.fc1.weight, shipped["missrec.encoder.layers.0.mlp.fc1.weight"]
    )
    assert ("image" in model.missrec.adaptors) == ("image" in files)
    assert not any("adaptors.image" in name for name in shipped)
    args = TrainingArguments(
        output_dir=str(tmp_path / "ft"), num_train_epochs=1, train_batch_size=32, eval_batch_size=16,
        report_to="none", disable_tqdm=True,
    )  # fmt: skip
    metrics = MissrecTrainer(model, load_atomic_dataset(folder, cache_dir=tmp_path / "cache"), catalog, args).train()
    assert 0.0 <= metrics["test"]["ndcg@10"] <= 1.0 and metrics["epochs_run"] == 1


def test_the_shipped_backbone_ranks_a_new_domain_zero_shot(tmp_path):
    folder = write_domain(tmp_path / "C", "C", 18, 40, text_width=384, seed=9)
    flags = ["--data_dir", str(folder), "--text_features", "C.text.npy", "--image_features", "", "--mode", "inductive"]
    flags += ["--model_name_or_path", str(SHIPPED), "--do_train", "false", "--output_dir", str(tmp_path / "zero")]
    metrics = run_finetune.main([*flags, "--report_to", "none", "--disable_tqdm", "true"])
    assert metrics["epochs_run"] == 0 and 0.0 < metrics["test"]["hr@50"] <= 1.0
