"""Hub ids wherever a saved model is taken: transfer (`model_name_or_path`), the recommender, the feature
extractors. No network: a local folder laid out as the Hub cache (`models--user--repo/snapshots/<commit>`,
`refs/<branch or tag>`) under HF_HUB_OFFLINE=1, which is what a user offline with a filled cache has."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from test_trainer import TINY, write_planted_dataset

from modeling_missrec.data import load_item_catalog
from modeling_missrec.hub import resolve_model_folder
from modeling_missrec.recommend import MissrecRecommender
from modeling_missrec.training_args import ModelArguments
from modeling_missrec.transfer import build_model

SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / "missrec-amazon5-minilm"
FILES = {"text": "Toy.text.npy", "image": "Toy.image.npy"}


def add_to_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Copy `source` into the cache as the snapshot `commit` of `repo_id`, with `refs` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    assert constants.is_offline_mode()  # conftest: nothing may reach the network
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_folder_is_itself_and_a_hub_id_is_its_cached_snapshot(hub_cache, tmp_path):
    assert resolve_model_folder(SHIPPED) == SHIPPED
    snapshot = add_to_cache(hub_cache, "missrec/amazon5-minilm", SHIPPED, "a" * 40)
    assert resolve_model_folder("missrec/amazon5-minilm").resolve() == snapshot.resolve()


def test_revisions_select_their_snapshot(hub_cache, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "marker").write_text(text)
    add_to_cache(hub_cache, "user/model", old, "1" * 40, refs=("v1",))
    add_to_cache(hub_cache, "user/model", new, "2" * 40, refs=("main",))
    assert (resolve_model_folder("user/model") / "marker").read_text() == "new"
    assert (resolve_model_folder("user/model", revision="v1") / "marker").read_text() == "old"
    assert (resolve_model_folder("user/model", revision="1" * 40) / "marker").read_text() == "old"
    with pytest.raises(FileNotFoundError, match="at revision 'v2' in the local Hub cache"):
        resolve_model_folder("user/model", revision="v2")


def test_unknown_names_are_clear_errors(hub_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path='nobody/nothing'.*local Hub cache"):
        resolve_model_folder("nobody/nothing")
    with pytest.raises(FileNotFoundError, match="does not exist, and it is no Hub id"):
        resolve_model_folder(tmp_path / "missing" / "folder")


def test_transfer_from_a_hub_id_equals_transfer_from_the_folder(hub_cache, tmp_path):
    add_to_cache(hub_cache, "missrec/amazon5-minilm", SHIPPED, "b" * 40)
    folder = write_planted_dataset(tmp_path / "data")
    catalog = load_item_catalog(folder, feature_files={"text": "Toy.text.npy"})
    models = []
    for name in (str(SHIPPED), "missrec/amazon5-minilm"):
        torch.manual_seed(0)
        arguments = ModelArguments(model_name_or_path=name, mode="inductive")
        models.append(build_model(arguments, catalog))
    local, hub = (m.state_dict() for m in models)
    assert local.keys() == hub.keys()
    assert all(torch.equal(local[name], hub[name]) for name in local)


def test_the_recommender_loads_from_a_hub_id_with_its_raw_ids(hub_cache, tmp_path):
    folder = write_planted_dataset(tmp_path / "data")
    catalog = load_item_catalog(folder, feature_files=FILES)
    torch.manual_seed(0)
    model = build_model(ModelArguments(mode="inductive", config_overrides=TINY), catalog)
    model.refresh_interests(seed=0)
    saved = MissrecRecommender(model.eval(), catalog.raw_item_ids)
    saved.save_pretrained(tmp_path / "saved")
    add_to_cache(hub_cache, "user/toy-recommender", tmp_path / "saved", "c" * 40)
    loaded = MissrecRecommender.from_pretrained("user/toy-recommender", revision="main")
    assert loaded.raw_item_ids == catalog.raw_item_ids
    history = [["item3", "item4", "item5"]]
    expected = [(r.raw_item_id, r.score) for r in saved.recommend(history, k=5)[0]]
    assert [(r.raw_item_id, pytest.approx(r.score, abs=1e-6)) for r in loaded.recommend(history, k=5)[0]] == expected


def test_feature_extractors_take_a_hub_id_and_its_revision(hub_cache, tmp_path):
    pytest.importorskip("sentence_transformers")
    from test_features import TEXTS, _write_sentence_model

    from modeling_missrec.features import extract_text_features, extract_to_file, main

    raw, _ = _write_sentence_model(tmp_path / "raw", normalize=False)
    normalised, _ = _write_sentence_model(tmp_path / "normalised", normalize=True)
    add_to_cache(hub_cache, "user/tiny-st", raw, "3" * 40, refs=("v1",))
    add_to_cache(hub_cache, "user/tiny-st", normalised, "4" * 40, refs=("main",))
    expected = {
        name: extract_text_features(TEXTS, folder, show_progress=False)
        for name, folder in (("v1", raw), ("main", normalised))
    }
    assert not torch.allclose(torch.from_numpy(expected["v1"]), torch.from_numpy(expected["main"]))
    latest = extract_text_features(TEXTS, "user/tiny-st", show_progress=False)
    pinned = extract_text_features(TEXTS, "user/tiny-st", revision="v1", token=False, show_progress=False)
    assert (latest == expected["main"]).all() and (pinned == expected["v1"]).all()
    result = extract_to_file(TEXTS, tmp_path / "out.npy", modality="text", model_path="user/tiny-st", revision="v1")
    assert (np.load(result.output_path) == expected["v1"]).all()
    with pytest.raises(FileNotFoundError, match="at revision 'v9'"):
        extract_text_features(TEXTS, "user/tiny-st", revision="v9", show_progress=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "X.item2index").write_text("".join(f"i{n}\t{n}\n" for n in range(len(TEXTS))))
    (data / "X.text").write_text(
        "item_id:token\ttext:token_seq\n" + "".join(f"i{n}\t{t}\n" for n, t in enumerate(TEXTS))
    )
    output = tmp_path / "cli.npy"
    argv = ["text", "--data_dir", str(data), "--dataset_name", "X", "--model_path", "user/tiny-st", "--revision", "v1"]
    assert main([*argv, "--output", str(output), "--no_progress"]) == 0
    assert (np.load(output) == expected["v1"]).all()
