"""The item catalogue the recommender owns (`model.catalog`): its raw ids travel with the model through
`save_pretrained`, `from_pretrained` and `push_to_hub`; older saves (catalogue buffers at the top level) still
load; growing it is all or nothing; the one missing-modality rule."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hub import add_to_cache, hub_cache  # noqa: F401  (the fixture)
from test_modeling import histories, tiny_config, tiny_model

from modeling_missrec import MissrecForSequentialRecommendation
from modeling_missrec.item_catalog import (
    ITEM_IDS_FILE,
    apply_missing_rule,
    read_raw_item_ids,
    rows_present,
    write_raw_item_ids,
)
from modeling_missrec.recommend import MissrecRecommender


def with_raw_ids(model: MissrecForSequentialRecommendation) -> MissrecForSequentialRecommendation:
    model.catalog.raw_item_ids = [f"asin{i}" for i in range(model.config.num_items)]
    return model


def test_save_pretrained_writes_the_raw_ids_and_from_pretrained_reads_them(tmp_path):
    model = with_raw_ids(tiny_model()).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ITEM_IDS_FILE).read_text())["raw_item_ids"] == model.catalog.raw_item_ids
    loaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path).eval()
    assert loaded.catalog.raw_item_ids == model.catalog.raw_item_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(histories()).logits, model(histories()).logits, rtol=0, atol=0)
    recommender = MissrecRecommender.from_pretrained(tmp_path)
    top = recommender.recommend([["asin2", "asin6"]], k=3)[0]
    assert all(r.raw_item_id == f"asin{r.item_id - 1}" for r in top)


def test_a_model_without_raw_ids_saves_no_map(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert not (tmp_path / ITEM_IDS_FILE).exists()
    assert MissrecForSequentialRecommendation.from_pretrained(tmp_path).catalog.raw_item_ids is None


def test_push_to_hub_ships_the_raw_ids(tmp_path):
    model = with_raw_ids(tiny_model())
    shipped = {}

    def upload(folder, repo_id, **_):
        shipped.update({name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)})

    api = mock.MagicMock()
    api.create_repo.return_value.repo_id = "someone/toy"
    with (
        mock.patch("transformers.utils.hub.hf_api", return_value=api),
        mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=mock.MagicMock()),
        mock.patch.object(type(model), "_upload_modified_files", side_effect=upload, autospec=False),
    ):
        model.push_to_hub("someone/toy")
    assert json.loads(shipped[ITEM_IDS_FILE])["raw_item_ids"] == model.catalog.raw_item_ids
    assert "model.safetensors" in shipped and "item_catalog.py" in shipped


def test_a_hub_id_brings_its_raw_ids(hub_cache, tmp_path):  # noqa: F811
    model = with_raw_ids(tiny_model())
    model.save_pretrained(tmp_path / "saved")
    add_to_cache(hub_cache, "someone/toy", tmp_path / "saved", "c" * 40)
    loaded = MissrecForSequentialRecommendation.from_pretrained("someone/toy")
    assert loaded.catalog.raw_item_ids == model.catalog.raw_item_ids


def test_a_save_from_before_the_catalogue_module_loads_and_resaves_in_todays_layout(tmp_path):
    model = with_raw_ids(tiny_model()).eval()
    model.save_pretrained(tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    state = load_file(str(weights))
    renamed = {("item_modality_present" if n == "catalog.modality_present" else n.removeprefix("catalog.")): t
               for n, t in state.items()}  # fmt: skip
    assert "text_features" in renamed and "item_modality_present" in renamed
    save_file(renamed, str(weights), metadata={"format": "pt"})
    loaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path / "old").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(histories()).logits, model(histories()).logits, rtol=0, atol=0)
    assert loaded.catalog.raw_item_ids == model.catalog.raw_item_ids
    loaded.save_pretrained(tmp_path / "new")
    assert set(load_file(str(tmp_path / "new" / "model.safetensors"))) == set(state)


def test_append_checks_everything_before_it_grows_anything():
    model = with_raw_ids(tiny_model())
    before = {name: tensor.clone() for name, tensor in model.catalog.state_dict().items()}
    rows = {m: torch.randn(2, model.config.feature_size(m)) for m in model.config.modalities}
    for raw_ids, fragment in ((["asin3", "new"], "already in the catalogue"), (["new", "new"], "already")):
        with pytest.raises(ValueError, match=fragment):
            model.catalog.append(rows, raw_ids)
    with pytest.raises(ValueError, match="exactly when"):
        model.catalog.append(rows)
    after = model.catalog.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert len(model.catalog.raw_item_ids) == model.config.num_items


def test_the_missing_modality_rule():
    features = {"text": torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "image": torch.tensor([[2.0, 0.0], [0.0, 0.0]])}
    has = rows_present(features, ["text", "image"])
    assert has.tolist() == [[False, True], [True, False]]
    assert torch.equal(apply_missing_rule(has, tiny_config()), has)
    assert apply_missing_rule(has, tiny_config(mask_missing_modalities=False)).all()
    model = tiny_model(mask_missing_modalities=False)
    assert model.catalog.present()[:, 1:].all() and not model.catalog.present()[:, 0].any()


def test_a_broken_id_map_is_a_clear_error(tmp_path):
    assert read_raw_item_ids(tmp_path) is None
    write_raw_item_ids(tmp_path, ["a", "b"])
    assert read_raw_item_ids(tmp_path) == ["a", "b"]
    (tmp_path / ITEM_IDS_FILE).write_text('{"ids": []}')
    with pytest.raises(ValueError, match="item_ids.json.*raw_item_ids"):
        read_raw_item_ids(tmp_path)
