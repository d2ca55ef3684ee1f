"""`MissrecForSequentialRecommendation.from_backbone`: a new catalogue on a saved MISSRec's backbone, with the
rules of `weight_transfer` (the core carried or refused, catalogue state rebuilt, the ID table kept only for the
same catalogue) and the frozen recipe's one list of modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_hub import add_to_cache, hub_cache  # noqa: F401  (the fixture)
from test_modeling import tiny_config, tiny_features

from modeling_missrec import MissrecForSequentialRecommendation
from modeling_missrec.weight_transfer import BACKBONE_CORE, FROZEN_IN_TRANSFER

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "missrec-amazon5-minilm"


def new_domain(num_items: int = 40, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(num_items, 12)).astype(np.float32)
    image[:4] = 0  # four items without an image
    return {"text": rng.normal(size=(num_items, 384)).astype(np.float32), "image": image}


def test_the_shipped_backbone_on_a_new_catalogue_with_a_new_modality():
    torch.manual_seed(0)
    features = new_domain()
    raw = [f"item{i}" for i in range(40)]
    model = MissrecForSequentialRecommendation.from_backbone(SHIPPED, features, raw_item_ids=raw, history_prior=True)
    saved = load_file(str(SHIPPED / "model.safetensors"))
    own = model.state_dict()
    carried = [name for name in own if name.startswith(BACKBONE_CORE) or name.startswith("missrec.adaptors.text.")]
    assert carried and all(torch.equal(own[name], saved[name]) for name in carried)
    assert model.config.modalities == ["text", "image"] and model.config.num_items == 40
    assert model.config.image_feature_size == 12 and model.config.history_prior
    assert model.catalog.raw_item_ids == raw
    assert model.item_modality_present[1, 1:5].sum() == 0 and model.item_modality_present[1, 5:].all()
    assert model.refresh_interests(seed=0) > 0
    scores = model.eval().recommend(torch.tensor([[3, 9, 0], [12, 0, 0]]), k=5).scores
    assert torch.isfinite(scores).all()


def test_a_hub_id_gives_the_same_model_as_its_folder(hub_cache):  # noqa: F811
    add_to_cache(hub_cache, "missrec/amazon5-minilm", SHIPPED, "d" * 40)
    features = {"text": new_domain()["text"]}
    torch.manual_seed(0)
    from_folder = MissrecForSequentialRecommendation.from_backbone(SHIPPED, features).state_dict()
    torch.manual_seed(0)
    from_id = MissrecForSequentialRecommendation.from_backbone("missrec/amazon5-minilm", features).state_dict()
    assert from_folder.keys() == from_id.keys()
    assert all(torch.equal(from_folder[name], from_id[name]) for name in from_folder)


def test_the_id_table_is_kept_only_for_the_same_catalogue(tmp_path):
    torch.manual_seed(0)
    source = MissrecForSequentialRecommendation(tiny_config(use_item_ids=True))
    raw = [f"item{i}" for i in range(source.config.num_items)]
    source.load_item_features(tiny_features(), raw_item_ids=raw)
    source.save_pretrained(tmp_path)
    table = source.missrec.item_embeddings.weight
    same = MissrecForSequentialRecommendation.from_backbone(tmp_path, tiny_features(), None, raw, use_item_ids=True)
    assert torch.equal(same.missrec.item_embeddings.weight, table)
    other = [f"other{i}" for i in range(source.config.num_items)]
    fresh = MissrecForSequentialRecommendation.from_backbone(tmp_path, tiny_features(), None, other, use_item_ids=True)
    assert not torch.equal(fresh.missrec.item_embeddings.weight, table)
    assert torch.equal(fresh.missrec.encoder.layers[0].self_attn.q_proj.weight,
                       source.missrec.encoder.layers[0].self_attn.q_proj.weight)  # fmt: skip


def test_a_backbone_of_another_shape_is_refused_not_half_loaded():
    with pytest.raises(ValueError, match="transformer does not match"):
        MissrecForSequentialRecommendation.from_backbone(SHIPPED, {"text": new_domain()["text"]}, hidden_size=64)
    with pytest.raises(ValueError, match="one \\[num_items, F\\] table per modality"):
        MissrecForSequentialRecommendation.from_backbone(
            SHIPPED, {"text": np.zeros((5, 384)), "image": np.zeros((6, 4))}
        )


def test_the_frozen_recipe_freezes_exactly_its_list():
    model = MissrecForSequentialRecommendation.from_backbone(SHIPPED, new_domain())
    model.freeze_backbone_for_transfer()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    listed = {name for name, _ in model.named_parameters() if name.startswith(tuple(f"missrec.{m}." for m in
                                                                                      FROZEN_IN_TRANSFER))}  # fmt: skip
    assert frozen == listed and listed
    assert model.missrec.input_layer_norm.weight.requires_grad and model.fusion.fusion_factor.requires_grad
