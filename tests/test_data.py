"""Tests for modeling_missrec.data: atomic-file readers and their errors, the item catalogue, the Arrow cache,
vectorised padding, the collator and the length-grouped batch sampler."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_missrec import data as data_module
from modeling_missrec.data import (
    AtomicFileError,
    HistoryDataset,
    LengthGroupedBatchSampler,
    SequenceCollator,
    find_dataset_name,
    identity_collate,
    load_atomic_dataset,
    load_item_catalog,
    pad_histories,
    read_feature_file,
    read_image_file,
    read_index_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCIENTIFIC_MM = REPO_ROOT / "data" / "scientific_mm"
HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def write_atomic(
    folder: Path,
    name: str = "X",
    num_items: int = 5,
    train: str | None = None,
    valid: str | None = None,
    test: str | None = None,
    item2index: str | None = None,
) -> Path:
    """A tiny, valid atomic dataset in `folder`; any file's content can be replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        f"{name}.train.inter": train if train is not None else HEADER + "0\t0 1\t2\n0\t0\t1\n1\t3\t4\n",
        f"{name}.valid.inter": valid if valid is not None else HEADER + "0\t0 1 2\t3\n1\t3 4\t0\n",
        f"{name}.test.inter": test if test is not None else HEADER + "0\t0 1 2 3\t4\n1\t3 4 0\t1\n",
        f"{name}.item2index": item2index
        if item2index is not None
        else "".join(f"I{i}\t{i}\n" for i in range(num_items)),
    }
    for file_name, text in contents.items():
        (folder / file_name).write_text(text, encoding="utf-8")
    return folder


def location(path: Path, line: int | None = None) -> str:
    """Regex for the `file:line:` prefix that the loader's messages start with."""
    return re.escape(f"{path}:{line}:" if line is not None else f"{path}:")


def reference_pad(histories: list[list[int]], rows: list[int], max_seq_length: int) -> list[list[int]]:
    """Per-row Python: the last `max_seq_length` items of each row, right-padded with 0 to the batch's longest."""
    kept = [histories[r][-max_seq_length:] if max_seq_length > 0 else [] for r in rows]
    width = max([len(k) for k in kept] + [1])
    return [k + [0] * (width - len(k)) for k in kept]


def to_csr(histories: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    items = np.asarray([i for h in histories for i in h], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    return items, offsets


def save_table(path: Path, table: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, table)
    else:
        table.tofile(path)


def padding_fraction(batches: list[list[int]], lengths: np.ndarray) -> float:
    """Padding positions / all positions when each batch is padded to its own longest row."""
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - float(lengths.sum()) / padded


# ------------------------------------------------------------------------------------------------------
# the shipped scientific_mm set
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scientific_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scientific_cache")


@pytest.fixture(scope="module")
def scientific(scientific_cache):
    return load_atomic_dataset(SCIENTIFIC_MM, cache_dir=scientific_cache)


def test_scientific_split_sizes_and_columns(scientific):
    assert {split: len(scientific[split]) for split in scientific} == {"train": 10928, "valid": 2928, "test": 2928}
    for split in scientific.values():
        assert split.column_names == ["user", "history", "target"]


def test_scientific_item_ids_are_one_based(scientific):
    for split in scientific.values():
        columns = split.with_format("numpy")[:]
        histories = np.concatenate(list(columns["history"]))
        targets = columns["target"]
        assert histories.min() >= 1 and targets.min() >= 1
        assert histories.max() <= 1585 and targets.max() <= 1585
    train = scientific["train"].with_format("numpy")[:]
    all_ids = np.concatenate([*train["history"], train["target"]])
    assert all_ids.min() == 1 and all_ids.max() == 1585  # index 0 -> id 1, index 1584 -> id 1585


def test_scientific_first_train_row(scientific):
    # the file's first row is `0\t0 1\t2`: indices are shifted by one, oldest first
    assert scientific["train"][0] == {"user": 0, "history": [1, 2], "target": 3}
    assert scientific["train"][1] == {"user": 0, "history": [1], "target": 2}  # `0\t0\t1`


def test_scientific_rows_match_the_file(scientific):
    lines = (SCIENTIFIC_MM / "Scientific.test.inter").read_text().splitlines()[1:]
    for row_index in (0, 1, 1000, len(lines) - 1):
        user, history, target = lines[row_index].split("\t")
        row = scientific["test"][row_index]
        assert row["user"] == int(user)
        assert row["history"] == [int(i) + 1 for i in history.split()]
        assert row["target"] == int(target) + 1


@pytest.fixture(scope="module")
def catalog():
    return load_item_catalog(
        SCIENTIFIC_MM,
        feature_files={
            "text": "Scientific.feat1CLS",
            "image": "Scientific.feat3CLS",
            "minilm": "Scientific.text_minilm.npy",
        },
        feature_sizes={"text": 512, "image": 512},
    )


def test_catalog_shapes_and_masks(catalog):
    assert catalog.num_items == 1585
    assert catalog.features["text"].shape == (1585, 512)
    assert catalog.features["image"].shape == (1585, 512)
    assert catalog.features["minilm"].shape == (1585, 384)  # the .npy's own width, no size given
    for modality in ("text", "image", "minilm"):
        assert catalog.features[modality].dtype == np.float32
        assert catalog.features[modality].flags["C_CONTIGUOUS"]
        assert catalog.present[modality].shape == (1585,)
        assert catalog.present[modality].dtype == bool
        assert catalog.present[modality].all()  # scientific_mm keeps only items that have both modalities
    assert catalog.feature_size("text") == 512 and catalog.feature_size("minilm") == 384


def test_catalog_rows_are_the_raw_file(catalog):
    raw = np.fromfile(SCIENTIFIC_MM / "Scientific.feat3CLS", dtype=np.float32).reshape(1585, 512)
    np.testing.assert_array_equal(catalog.features["image"], raw)
    np.testing.assert_array_equal(catalog.features["minilm"], np.load(SCIENTIFIC_MM / "Scientific.text_minilm.npy"))
    assert not np.array_equal(catalog.features["text"], catalog.features["image"])


def test_catalog_item_ids_and_text(catalog):
    lines = (SCIENTIFIC_MM / "Scientific.item2index").read_text().splitlines()
    assert lines[2] == "B00CJ5EO2E\t2"
    assert catalog.item_id("B00O47ILVA") == 1
    assert catalog.item_id("B00CJ5EO2E") == 3
    last_raw, last_index = lines[-1].split("\t")
    assert catalog.item_id(last_raw) == int(last_index) + 1 == 1585
    with pytest.raises(KeyError, match="NOT-AN-ASIN"):
        catalog.item_id("NOT-AN-ASIN")
    # texts follow the .item2index order, not the .text file's order
    assert len(catalog.text) == 1585
    assert catalog.text[2].startswith("Gorilla Super Glue Gel")
    assert "1585 items" in catalog.summary()


# ------------------------------------------------------------------------------------------------------
# the Arrow cache
# ------------------------------------------------------------------------------------------------------


def test_cache_is_written_and_reused(scientific, scientific_cache, monkeypatch):
    entries = [p for p in scientific_cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith("Scientific-")
    assert (entries[0] / "dataset_dict.json").exists()

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(data_module, "read_inter_file", no_parsing)
    again = load_atomic_dataset(SCIENTIFIC_MM, cache_dir=scientific_cache)
    for split in ("train", "valid", "test"):
        assert again[split][:] == scientific[split][:]


def test_cache_is_invalidated_by_a_changed_file(tmp_path):
    folder = write_atomic(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_atomic_dataset(folder, cache_dir=cache)
    assert first["train"][0] == {"user": 0, "history": [1, 2], "target": 3}

    train = folder / "X.train.inter"
    before = train.stat()
    train.write_text(HEADER + "0\t4 3\t1\n", encoding="utf-8")
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    second = load_atomic_dataset(folder, cache_dir=cache)
    assert len(second["train"]) == 1
    assert second["train"][0] == {"user": 0, "history": [5, 4], "target": 2}
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2

    # a touch alone (same content, new time) also re-parses rather than trusting a stale copy
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns + 4_000_000_000))
    assert load_atomic_dataset(folder, cache_dir=cache)["train"][:] == second["train"][:]


def test_default_cache_dir_is_inside_the_data_folder(tmp_path):
    folder = write_atomic(tmp_path / "data")
    load_atomic_dataset(folder)
    assert list((folder / ".missrec_cache").glob("X-*/dataset_dict.json"))


def test_unwritable_cache_still_loads(tmp_path, caplog):
    folder = write_atomic(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    dataset = load_atomic_dataset(folder, cache_dir=blocker / "cache")
    assert len(dataset["train"]) == 3
    assert "could not cache" in caplog.text


def test_small_dataset_values(tmp_path):
    dataset = load_atomic_dataset(write_atomic(tmp_path / "data"), cache_dir=tmp_path / "cache")
    assert dataset["valid"][:] == {"user": [0, 1], "history": [[1, 2, 3], [4, 5]], "target": [4, 1]}


# ------------------------------------------------------------------------------------------------------
# loader errors: the message names the file and the line / row
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "line", "message"),
    [
        ("user\titems\ttarget\n0\t0\t1\n", 1, "expected header"),
        (HEADER + "0\t0 1\t2\n0\t1 x\t2\n", 3, "expected integer"),
        (HEADER + "0\t0 1\t2\n0\t1 2\tz\n", 3, "expected integer"),
        (HEADER + "0\t0 1\t2\n\n0\t1 5\t2\n", 4, "item index 5 out of range 0..4"),  # blank line still counted
        (HEADER + "0\t0 1\t2\n0\t1 2\t7\n", 3, "item index 7 out of range"),
        (HEADER + "0\t-1 2\t3\n", 2, "item index -1 out of range"),
        (HEADER + "0\t0 1\t2\n0\t\t2\n", 3, "empty history"),
        (HEADER + "0\t0 1\t2\n0\t1 2\n", 3, "expected 3 tab-separated fields, got 2"),
        (HEADER + "0\t0 1\t2\t9\n", 2, "expected 3 tab-separated fields, got 4"),
    ],
)
def test_inter_file_errors(tmp_path, train, line, message):
    folder = write_atomic(tmp_path / "data", train=train)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=location(folder / "X.train.inter", line) + ".*" + re.escape(message)):
        load_atomic_dataset(folder, cache_dir=cache)
    assert not cache.exists()  # nothing is cached from a failed parse


def test_inter_error_in_test_split_names_that_file(tmp_path):
    folder = write_atomic(tmp_path / "data", test=HEADER + "0\t0 1\t2\n1\t3\t99\n")
    with pytest.raises(AtomicFileError, match=location(folder / "X.test.inter", 3) + ".*99"):
        load_atomic_dataset(folder, cache_dir=tmp_path / "cache")


def test_inter_file_without_rows(tmp_path):
    folder = write_atomic(tmp_path / "data", valid=HEADER)
    with pytest.raises(ValueError, match=location(folder / "X.valid.inter") + ".*no interaction rows"):
        load_atomic_dataset(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("item2index", "pattern"),
    [
        ("A\t0\nB\t1\nD\t3\n", r": indices must be 0\.\.2 without gaps; missing \[2\]"),
        ("A\t0\nB\t1\nC\t1\n", r":3: index 1 is assigned twice"),
        ("A\t0\nB 1\n", r":2: expected 'raw id<TAB>integer index'"),
        ("A\t0\nB\tone\n", r":2: expected 'raw id<TAB>integer index'"),
    ],
)
def test_item2index_errors(tmp_path, item2index, pattern):
    folder = write_atomic(tmp_path / "data", item2index=item2index)
    path = folder / "X.item2index"
    with pytest.raises(ValueError, match=re.escape(str(path)) + pattern):
        read_index_file(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + pattern):
        load_atomic_dataset(folder, cache_dir=tmp_path / "cache")


def test_read_index_file_orders_by_index(tmp_path):
    path = tmp_path / "Y.item2index"
    path.write_text("C\t2\nA\t0\n\nB\t1\n")
    assert read_index_file(path) == ["A", "B", "C"]


def test_text_file_errors_and_missing_texts(tmp_path, caplog):
    folder = write_atomic(tmp_path / "data", num_items=3)
    text = folder / "X.text"
    text.write_text("item_id:token\ttext:token_seq\nI2\tthird\nI0\tfirst\n", encoding="utf-8")
    catalog = load_item_catalog(folder)
    assert catalog.text == ["first", "", "third"]  # index order; I1 has no line -> empty, and a warning
    assert "1 of 3 items have no text line" in caplog.text
    text.write_text("item_id:token\ttext:token_seq\nI0\tfirst\n\nI0\tagain\n", encoding="utf-8")
    with pytest.raises(ValueError, match=location(text, 4) + " item 'I0' has a second text line"):
        load_item_catalog(folder)
    text.write_text("item_id\ttext\nI0\tfirst\n", encoding="utf-8")
    with pytest.raises(ValueError, match=location(text, 1) + " expected header"):
        load_item_catalog(folder)


def test_no_or_several_train_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*exactly one \\*\\.train\\.inter.*none"):
        load_atomic_dataset(empty, cache_dir=tmp_path / "cache")
    folder = write_atomic(tmp_path / "two", name="A")
    write_atomic(folder, name="B")
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r".*\['A', 'B'\]"):
        find_dataset_name(folder)
    assert len(load_atomic_dataset(folder, dataset_name="B", cache_dir=tmp_path / "cache")["train"]) == 3


def test_missing_split_file(tmp_path):
    folder = write_atomic(tmp_path / "data")
    (folder / "X.valid.inter").unlink()
    with pytest.raises(ValueError, match=location(folder / "X.valid.inter") + " file not found"):
        load_atomic_dataset(folder, cache_dir=tmp_path / "cache")


def test_raw_feature_size_not_a_multiple_of_the_width(tmp_path):
    path = tmp_path / "X.feat1CLS"
    np.arange(5 * 4 + 1, dtype=np.float32).tofile(path)  # 84 bytes: not whole rows of width 4
    with pytest.raises(ValueError, match=location(path) + " 84 bytes is not a whole number of float32 rows of width 4"):
        read_feature_file(path, num_items=5, feature_size=4)
    with pytest.raises(ValueError, match=location(path) + ".*needs its width"):
        read_feature_file(path, num_items=5)


@pytest.mark.parametrize("suffix", [".feat1CLS", ".npy"])
def test_feature_file_with_wrong_row_count(tmp_path, suffix):
    table = np.ones((4, 3), dtype=np.float32)
    path = tmp_path / f"X{suffix}"
    save_table(path, table)
    with pytest.raises(ValueError, match=location(path) + r" 4 rows, expected one per item \(5\)"):
        read_feature_file(path, num_items=5, feature_size=3)


@pytest.mark.parametrize("suffix", [".feat1CLS", ".npy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_feature_file_with_nan_or_inf(tmp_path, suffix, bad):
    table = np.ones((5, 3), dtype=np.float32)
    table[3, 1] = bad
    path = tmp_path / f"X{suffix}"
    save_table(path, table)
    with pytest.raises(ValueError, match=location(path) + r" row 3 holds NaN or inf \(1 rows in all\)"):
        read_feature_file(path, num_items=5, feature_size=3)


def test_npy_feature_errors(tmp_path):
    path = tmp_path / "X.npy"
    np.save(path, np.ones((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=location(path) + " width 3, expected 4"):
        read_feature_file(path, num_items=5, feature_size=4)
    np.save(path, np.ones(15, dtype=np.float32))
    with pytest.raises(ValueError, match=location(path) + " expected a 2-D array"):
        read_feature_file(path, num_items=5)
    with pytest.raises(ValueError, match=location(tmp_path / "none.npy") + " feature file not found"):
        read_feature_file(tmp_path / "none.npy", num_items=5)


def test_npy_features_are_float32_copies(tmp_path):
    path = tmp_path / "X.npy"
    np.save(path, np.arange(15, dtype=np.float64).reshape(5, 3))
    table = read_feature_file(path, num_items=5)
    assert table.dtype == np.float32 and not isinstance(table, np.memmap)
    np.testing.assert_array_equal(table, np.arange(15).reshape(5, 3))


def test_catalog_present_mask_marks_all_zero_rows(tmp_path):
    folder = write_atomic(tmp_path / "data")
    table = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    table[[1, 4]] = 0.0
    table[2] = [0.0, -0.5, 0.0, 0.0]  # a single negative value still counts as present
    np.save(folder / "X.image.npy", table)
    catalog = load_item_catalog(folder, feature_files={"image": "X.image.npy"})
    assert catalog.present["image"].tolist() == [True, False, True, True, False]
    assert catalog.text is None  # no .text file in this folder


# ------------------------------------------------------------------------------------------------------
# padding: pad_histories / HistoryDataset / SequenceCollator
# ------------------------------------------------------------------------------------------------------


def test_pad_histories_pads_to_the_batch_longest_and_keeps_the_most_recent():
    histories = [[1, 2], [3], [4, 5, 6, 7, 8, 9], [10, 11, 12]]
    items, offsets = to_csr(histories)
    padded, lengths = pad_histories(items, offsets, np.array([0, 1, 3]), max_seq_length=5)
    assert padded.shape == (3, 3)  # the batch's longest (3), not max_seq_length (5)
    assert padded.tolist() == [[1, 2, 0], [3, 0, 0], [10, 11, 12]]
    assert lengths.tolist() == [2, 1, 3]
    padded, lengths = pad_histories(items, offsets, np.array([2, 0]), max_seq_length=4)
    assert padded.tolist() == [[6, 7, 8, 9], [1, 2, 0, 0]]  # the 4 most recent of row 2, oldest first
    assert lengths.tolist() == [4, 2]
    assert padded.dtype == np.int64


def test_history_dataset_batch_fields():
    histories = [[1, 2], [3], [4, 5, 6, 7, 8, 9]]
    items, offsets = to_csr(histories)
    split = {"items": items, "offsets": offsets, "user": np.array([7, 8, 9]), "target": np.array([20, 21, 22])}
    dataset = HistoryDataset(split, max_seq_length=3)
    assert len(dataset) == 3
    assert dataset.lengths.tolist() == [2, 1, 3]
    batch = dataset.__getitems__([2, 1])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [3, 0, 0]]
    assert torch.equal(batch["attention_mask"], batch["input_ids"] != 0)
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["labels"].tolist() == [22, 21]
    assert batch["row_index"].tolist() == [2, 1]
    assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    single = dataset[0]
    assert single["input_ids"].tolist() == [[1, 2]] and single["labels"].tolist() == [20]


histories_strategy = st.lists(st.lists(st.integers(1, 1000), min_size=0, max_size=25), min_size=1, max_size=12)


@FAST
@given(histories=histories_strategy, max_seq_length=st.integers(1, 30), data=st.data())
def test_pad_histories_matches_reference(histories, max_seq_length, data):
    rows = data.draw(st.lists(st.integers(0, len(histories) - 1), min_size=1, max_size=10))
    items, offsets = to_csr(histories)
    padded, lengths = pad_histories(items, offsets, np.asarray(rows), max_seq_length)
    expected = reference_pad(histories, rows, max_seq_length)
    assert padded.tolist() == expected
    assert lengths.tolist() == [min(len(histories[r]), max_seq_length) for r in rows]


@FAST
@given(
    histories=st.lists(st.lists(st.integers(1, 1000), min_size=1, max_size=25), min_size=1, max_size=12),
    max_seq_length=st.integers(1, 30),
    data=st.data(),
)
def test_history_dataset_and_collator_match_reference(histories, max_seq_length, data):
    rows = data.draw(st.lists(st.integers(0, len(histories) - 1), min_size=1, max_size=10))
    targets = data.draw(st.lists(st.integers(1, 1000), min_size=len(histories), max_size=len(histories)))
    items, offsets = to_csr(histories)
    split = {"items": items, "offsets": offsets, "user": np.arange(len(histories)), "target": np.asarray(targets)}
    batch = HistoryDataset(split, max_seq_length).__getitems__(rows)
    expected = reference_pad(histories, rows, max_seq_length)
    assert batch["input_ids"].tolist() == expected
    assert batch["attention_mask"].tolist() == [[v != 0 for v in row] for row in expected]
    assert batch["labels"].tolist() == [targets[r] for r in rows]

    collated = SequenceCollator(max_seq_length)([{"history": histories[r], "target": targets[r]} for r in rows])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(collated[key], batch[key])


def test_collator_matches_history_dataset_on_scientific(scientific):
    rows = [5, 0, 17, 3, 2, 1000]
    dataset = HistoryDataset(scientific["train"], max_seq_length=4)
    batch = dataset.__getitems__(rows)
    examples = [scientific["train"][r] for r in rows]
    assert max(len(e["history"]) for e in examples) > 4  # truncation is exercised
    collated = SequenceCollator(max_seq_length=4)(examples)
    assert set(collated) == {"input_ids", "attention_mask", "labels"}
    for key in collated:
        assert torch.equal(collated[key], batch[key]), key
    assert batch["labels"].tolist() == [e["target"] for e in examples]
    # and an HF-style batch of dataset rows from .select works too
    selected = scientific["train"].select(rows)
    assert torch.equal(SequenceCollator(4)(list(selected))["input_ids"], batch["input_ids"])


def test_history_dataset_from_arrow_matches_the_rows(scientific):
    dataset = HistoryDataset(scientific["valid"], max_seq_length=50)
    assert len(dataset) == 2928
    histories = scientific["valid"]["history"]
    assert dataset.lengths.tolist() == [min(len(h), 50) for h in histories]
    rows = [0, 10, 2927]
    assert dataset.__getitems__(rows)["input_ids"].tolist() == reference_pad(histories, rows, 50)
    assert dataset.users.tolist()[:3] == scientific["valid"][:3]["user"]


def test_collator_errors_and_optional_labels():
    collator = SequenceCollator(max_seq_length=3)
    with pytest.raises(ValueError, match="example 1 has an empty history"):
        collator([{"history": [1, 2], "target": 3}, {"history": [], "target": 4}])
    batch = collator([{"history": [1, 2, 3, 4]}, {"history": [5]}])
    assert "labels" not in batch
    assert batch["input_ids"].tolist() == [[2, 3, 4], [5, 0, 0]]


def test_dataloader_with_workers_gives_the_same_batches(scientific):
    dataset = HistoryDataset(scientific["valid"], max_seq_length=20)
    sampler = LengthGroupedBatchSampler(dataset.lengths, batch_size=64, seed=3, group_factor=4)
    batches = list(sampler)[:6]

    def run(num_workers):
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, collate_fn=identity_collate, num_workers=num_workers
        )
        return list(loader)

    serial, parallel = run(0), run(2)
    assert len(serial) == len(parallel) == 6
    for indices, a, b in zip(batches, serial, parallel):
        assert a["row_index"].tolist() == indices  # the loader went through __getitems__ with the batch
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------------
# LengthGroupedBatchSampler
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skewed_lengths() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.minimum(rng.geometric(0.15, size=2003), 50)  # many short, a long tail


def test_sampler_covers_every_index_once(skewed_lengths):
    sampler = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=1)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(skewed_lengths)))
    assert len(batches) == len(sampler) == 63  # ceil(2003 / 32)
    sizes = sorted(len(b) for b in batches)
    assert sizes[0] == 2003 - 62 * 32 and set(sizes[1:]) == {32}
    assert all(isinstance(i, int) for i in flat)


def test_sampler_drop_last(skewed_lengths):
    sampler = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=1, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 62
    assert all(len(b) == 32 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) == 62 * 32


def test_sampler_is_deterministic_per_seed_and_epoch(skewed_lengths):
    a = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=7)
    b = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=7)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again without set_epoch repeats the epoch
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    assert epoch1 != epoch0
    a.set_epoch(0)
    assert list(a) == epoch0  # a resumed run sees the same batches
    other_seed = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=8)
    assert list(other_seed) != epoch0


def test_sampler_groups_reduce_padding(skewed_lengths):
    grouped = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=2, group_factor=20)
    plain = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=2, group_factor=1)
    grouped_padding = padding_fraction(list(grouped), skewed_lengths)
    plain_padding = padding_fraction(list(plain), skewed_lengths)
    assert grouped_padding < 0.5 * plain_padding
    # grouped batches are still random: not simply the global length order
    assert list(grouped) != list(LengthGroupedBatchSampler(skewed_lengths, batch_size=32, shuffle=False))


def test_sampler_without_shuffle_is_longest_first(skewed_lengths):
    sampler = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, shuffle=False)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(skewed_lengths)))
    assert np.all(np.diff(skewed_lengths[flat]) <= 0)
    assert len(batches) == len(sampler)
    assert list(sampler) == batches  # no randomness
    dropped = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, shuffle=False, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 62
    assert all(len(b) == 32 for b in dropped)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=300),
    batch_size=st.integers(1, 64),
    min_fill=st.floats(0.05, 1.0),
)
def test_min_fill_batches_cover_every_row_once_with_little_padding(lengths, batch_size, min_fill):
    lengths = np.array(lengths)
    sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=False, min_fill=min_fill)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[flat]) <= 0)  # still longest first
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert lengths[batch].min() >= min_fill * lengths[batch].max()
    for previous, batch in zip(batches, batches[1:]):  # a batch ends only when full or at a too short history
        assert len(previous) == batch_size or lengths[batch[0]] < min_fill * lengths[previous[0]]


def test_min_fill_cuts_the_padding_of_a_skewed_evaluation_set(skewed_lengths):
    def padding(sampler):
        return sum(len(b) * skewed_lengths[b].max() - skewed_lengths[b].sum() for b in sampler)

    fixed = LengthGroupedBatchSampler(skewed_lengths, batch_size=1024, shuffle=False)
    filled = LengthGroupedBatchSampler(skewed_lengths, batch_size=1024, shuffle=False, min_fill=0.7)
    assert padding(filled) < 0.5 * padding(fixed)
    with pytest.raises(ValueError, match="min_fill"):
        LengthGroupedBatchSampler(skewed_lengths, batch_size=32, shuffle=True, min_fill=0.5)
    with pytest.raises(ValueError, match="min_fill"):
        LengthGroupedBatchSampler(skewed_lengths, batch_size=32, shuffle=False, min_fill=1.5)


# ------------------------------------------------------------------------------------------------------
# the shared scientific_full set (skipped when absent)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scientific_full(shared_data_dir) -> Path:
    folder = shared_data_dir / "scientific_full"
    if not (folder / "Scientific.train.inter").exists():
        pytest.skip(f"{folder} not found")
    return folder


def test_scientific_full_counts(scientific_full, tmp_path):
    dataset = load_atomic_dataset(scientific_full, cache_dir=tmp_path)
    assert {split: len(dataset[split]) for split in dataset} == {"train": 34101, "valid": 8442, "test": 8442}
    targets = dataset["test"].with_format("numpy")[:]["target"]
    assert targets.min() >= 1 and targets.max() <= 4385


def test_scientific_full_catalog(scientific_full):
    catalog = load_item_catalog(
        scientific_full,
        feature_files={"text": "Scientific.text_minilm.npy", "image": "Scientific.image_clip.npy"},
    )
    assert catalog.num_items == 4385
    assert catalog.features["text"].shape == (4385, 384)
    assert catalog.features["image"].shape == (4385, 512)
    assert catalog.present["text"].all()
    zero_rows = ~np.any(np.load(scientific_full / "Scientific.image_clip.npy") != 0, axis=1)
    assert int(zero_rows.sum()) == 2800
    np.testing.assert_array_equal(catalog.present["image"], ~zero_rows)
    assert int(catalog.present["image"].sum()) == 4385 - 2800


def test_the_short_batch_comes_last_so_sharding_over_processes_loses_nothing():
    lengths = np.random.default_rng(0).integers(1, 30, size=1000)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=64, seed=3, group_factor=4)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches[:-1]] == [64] * 15 and len(batches[-1]) == 1000 - 15 * 64
        # Accelerate's round-by-round sharding over 2 processes keeps every row when the short batch is last
        seen = [
            i for round_start in range(0, len(batches), 2) for b in batches[round_start : round_start + 2] for i in b
        ]
        assert sorted(seen) == list(range(1000))


def test_low_data_regime_keeps_a_share_of_the_training_users_and_every_evaluation_user(tmp_path):
    from test_trainer import write_planted_dataset

    folder = write_planted_dataset(tmp_path / "data", num_users=200)
    dataset = data_module.load_atomic_dataset(folder, cache_dir=tmp_path / "cache")
    small = data_module.subsample_training_users(dataset, 0.1, seed=3)
    users = set(np.asarray(small["train"][:]["user"]).tolist())
    assert len(users) == 20
    every = np.asarray(dataset["train"][:]["user"])
    assert len(small["train"]) == int(np.isin(every, list(users)).sum())  # all the rows of the kept users
    for split in ("valid", "test"):
        assert small[split][:] == dataset[split][:]
    again = data_module.subsample_training_users(dataset, 0.1, seed=3)
    assert set(np.asarray(again["train"][:]["user"]).tolist()) == users
    other = data_module.subsample_training_users(dataset, 0.1, seed=4)
    assert set(np.asarray(other["train"][:]["user"]).tolist()) != users
    assert data_module.subsample_training_users(dataset, 1.0, seed=3) is dataset
    with pytest.raises(ValueError, match=r"train_users_fraction=0\.0 is invalid; allowed: a float in \(0, 1\]"):
        data_module.subsample_training_users(dataset, 0.0, seed=3)


def test_bad_data_is_refused_or_flagged_naming_the_file_and_the_row(tmp_path, caplog):
    from test_trainer import write_planted_dataset

    folder = write_planted_dataset(tmp_path / "data", num_users=20)
    load = data_module.load_atomic_dataset
    load(folder, cache_dir=tmp_path / "cache")

    # the parsed-data cache follows the contents: a rewritten file of the same size and time is re-read
    valid = folder / "Toy.valid.inter"
    text, stat = valid.read_text(), valid.stat()
    first = text.splitlines()[1].split("\t")
    target = int(first[2])
    changed_target = str(target + 1 if len(str(target + 1)) == len(first[2]) and target + 1 < 40 else target - 1)
    assert len(changed_target) == len(first[2])
    changed = text.replace("\t".join(first), "\t".join([*first[:2], changed_target]), 1)
    valid.write_text(changed)
    os.utime(valid, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load(folder, cache_dir=tmp_path / "cache")["valid"][0]["target"] == int(changed_target) + 1
    valid.write_text(text)

    test = folder / "Toy.test.inter"
    lines = test.read_text().splitlines(keepends=True)
    test.write_text("".join(lines + [lines[3]]))
    with pytest.raises(data_module.AtomicFileError, match=rf"Toy.test.inter:{len(lines) + 1}: user 2 has a second row"):
        load(folder, cache_dir=tmp_path / "cache")
    test.write_text("".join(lines))

    valid.write_text("".join(text.splitlines(keepends=True)[:3]))  # 2 of 20 users
    with caplog.at_level("WARNING"):
        load(folder, cache_dir=tmp_path / "cache")
    assert "hold different users (18 only in test, 0 only in valid; 2 in valid in all)" in caplog.text
    valid.write_text(text)

    index = folder / "Toy.item2index"
    good = index.read_text()
    index.write_text(good.replace("item7\t7", "item3\t7"))
    with pytest.raises(
        data_module.AtomicFileError, match=r"item2index:8: raw id 'item3' is listed twice \(first on line 4\)"
    ):  # noqa: E501
        data_module.read_index_file(index)
    index.write_bytes(good.encode().replace(b"item5", b"item\xff5"))
    with pytest.raises(data_module.AtomicFileError, match=r"item2index:6: not UTF-8 text \(byte 0xff"):
        data_module.read_index_file(index)
    index.write_text(good)

    np.save(folder / "Toy.ints.npy", np.ones((40, 4), dtype=np.int64))
    with pytest.raises(data_module.AtomicFileError, match=r"Toy.ints.npy: dtype int64, expected floating-point"):
        data_module.read_feature_file(folder / "Toy.ints.npy", 40)
    whole = (folder / "Toy.text.npy").read_bytes()
    (folder / "Toy.cut.npy").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data_module.AtomicFileError, match=r"Toy.cut.npy: not a readable .npy array"):
        data_module.read_feature_file(folder / "Toy.cut.npy", 40)
    np.save(folder / "Toy.zero.npy", np.zeros((40, 4), dtype=np.float32))
    with caplog.at_level("WARNING"):
        data_module.load_item_catalog(folder, feature_files={"image": "Toy.zero.npy"})
    assert "Toy.zero.npy: every row is zero, so no item has the image modality" in caplog.text


def test_sampler_with_groups_keeps_every_full_batch_within_one_group(skewed_lengths):
    groups = np.random.default_rng(4).integers(0, 3, size=len(skewed_lengths))
    sampler = LengthGroupedBatchSampler(skewed_lengths, batch_size=32, seed=1, group_factor=4, groups=groups)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(skewed_lengths)))  # every row once
    single = [b for b in batches if len(set(groups[b])) == 1 and len(b) == 32]
    assert len(batches) - len(single) <= 3  # only the pooled leftovers of the three groups may mix
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches  # a resumed run sees the same batches
    with pytest.raises(ValueError, match="one label per row"):
        LengthGroupedBatchSampler(skewed_lengths, batch_size=32, groups=groups[:-1])


def test_read_image_file(tmp_path):
    absolute = tmp_path / "elsewhere" / "b.jpg"
    images = tmp_path / "X.images"
    images.write_text(f"item_id:token\timage:token\nA\timg/a.jpg\nB\t{absolute}\nC\t\nZ\tz.jpg\n")
    assert read_image_file(images, ["A", "B", "C", "D"]) == [tmp_path / "img" / "a.jpg", absolute, None, None]
    images.write_text("item_id:token\tpath:token\nA\ta.jpg\n")
    with pytest.raises(AtomicFileError, match="expected header"):
        read_image_file(images, ["A"])
    images.write_text("item_id:token\timage:token\nA\ta.jpg\nA\tb.jpg\n")
    with pytest.raises(AtomicFileError, match=r"X.images:3: item 'A' has a second image line"):
        read_image_file(images, ["A"])
