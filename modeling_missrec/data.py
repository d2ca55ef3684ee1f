"""Reading and validating MISSRec/UniSRec atomic files; the item catalogue; vectorised batching.

Atomic layout (reference §2.1), for a dataset `X` in one folder:
  X.train.inter / X.valid.inter / X.test.inter   TSV, header `user_id:token  item_id_list:token_seq
                                                  item_id:token`; rows: user index, history (space-separated
                                                  item indices, oldest first), target item index
  X.item2index / X.user2index                    TSV `raw id <tab> 0-based index`, no header
  X.text                                         TSV, header `item_id:token  text:token_seq`
  feature files                                  raw float32 rows (`.feat1CLS` ...) or `.npy`, row i = item i
Item index i in the files is item id i + 1 in the model; id 0 is padding.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from torch.utils.data import DataLoader

from .atomic import replace_directory

logger = logging.getLogger(__name__)

INTER_HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
TEXT_HEADER = ["item_id:token", "text:token_seq"]
IMAGE_HEADER = ["item_id:token", "image:token"]
SPLITS = ("train", "valid", "test")
_CACHE_VERSION = "1"


class AtomicFileError(ValueError):
    """A problem in an input file; the message names the file, the line and what was expected."""


@dataclass
class ItemCatalog:
    """One domain's items as read from its atomic files: raw ids in index order, frozen features and
    modality-present masks per modality (numpy). A model holds its own copy as buffers,
    `item_catalog.MissrecItemCatalog`, filled from this by `load_item_features`.

    `features[m]` is `[num_items, F_m]` float32 (row i = item id i + 1); `present[m]` is `[num_items]` bool,
    False where the row is all zeros (a missing modality).
    """

    raw_item_ids: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)
    text: list[str] | None = None

    @property
    def num_items(self) -> int:
        return len(self.raw_item_ids)

    def item_id(self, raw_item_id: str) -> int:
        """Model item id (1-based) of a raw id such as an ASIN."""
        if not hasattr(self, "_index"):
            self._index = {raw: i + 1 for i, raw in enumerate(self.raw_item_ids)}
        if raw_item_id not in self._index:
            raise KeyError(f"unknown item {raw_item_id!r}: not in the catalogue of {self.num_items} items")
        return self._index[raw_item_id]

    def feature_size(self, modality: str) -> int:
        return int(self.features[modality].shape[1])

    def summary(self) -> str:
        parts = [f"{self.num_items} items"]
        for m, present in self.present.items():
            parts.append(f"{m}: width {self.feature_size(m)}, present for {int(present.sum())}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------- readers
def _text_lines(path: Path, start: int = 1):
    """(line number, line without its newline) of a UTF-8 text file; a line that is not UTF-8 is an error
    naming the file and the line, instead of a bare UnicodeDecodeError."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=start):
            try:
                yield line_number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise AtomicFileError(
                    f"{path}:{line_number}: not UTF-8 text (byte {raw[error.start]:#04x} at column {error.start + 1})"
                ) from None


def _rows_after_header(path: Path, expected: list[str]):
    """`_text_lines` of an atomic TSV after checking its header line against `expected`."""
    lines = _text_lines(path)
    header = next(lines, (1, ""))[1].split("\t")
    if header != expected:
        raise AtomicFileError(f"{path}:1: expected header {expected}, got {header}")
    return lines


def read_index_file(path: str | os.PathLike) -> list[str]:
    """Raw ids of an `.item2index` / `.user2index` file, ordered by their 0-based index."""
    path = Path(path)
    raw_ids: dict[int, str] = {}
    first_line: dict[str, int] = {}
    for line_number, line in _text_lines(path):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            raise AtomicFileError(f"{path}:{line_number}: expected 'raw id<TAB>integer index', got {line!r}")
        index = int(parts[1])
        if index in raw_ids:
            raise AtomicFileError(f"{path}:{line_number}: index {index} is assigned twice")
        if parts[0] in first_line:
            raise AtomicFileError(
                f"{path}:{line_number}: raw id {parts[0]!r} is listed twice (first on line {first_line[parts[0]]})"
            )
        first_line[parts[0]] = line_number
        raw_ids[index] = parts[0]
    expected = set(range(len(raw_ids)))
    if set(raw_ids) != expected:
        missing = sorted(expected - set(raw_ids))[:5]
        raise AtomicFileError(f"{path}: indices must be 0..{len(raw_ids) - 1} without gaps; missing {missing}")
    return [raw_ids[i] for i in range(len(raw_ids))]


def read_text_file(path: str | os.PathLike, raw_item_ids: Sequence[str]) -> list[str]:
    """Item texts in index order; an item with no line gets an empty text (counted and logged)."""
    path = Path(path)
    by_raw: dict[str, str] = {}
    for line_number, line in _rows_after_header(path, TEXT_HEADER):
        if not line:
            continue
        raw, _, text = line.partition("\t")
        if raw in by_raw:
            raise AtomicFileError(f"{path}:{line_number}: item {raw!r} has a second text line")
        by_raw[raw] = text
    texts = [by_raw.get(raw, "") for raw in raw_item_ids]
    missing = sum(raw not in by_raw for raw in raw_item_ids)
    if missing:
        logger.warning("%s: %d of %d items have no text line; their text is empty", path, missing, len(texts))
    return texts


def read_image_file(path: str | os.PathLike, raw_item_ids: Sequence[str]) -> list[Path | None]:
    """Image paths in item index order from an `X.images` TSV (header `item_id:token<TAB>image:token`; a path
    relative to the file's folder or absolute). An item with no line or an empty path gets None (counted)."""
    path = Path(path)
    by_raw: dict[str, Path] = {}
    for line_number, line in _rows_after_header(path, IMAGE_HEADER):
        if not line.strip():
            continue
        raw, separator, image = line.partition("\t")
        if not separator:
            raise AtomicFileError(f"{path}:{line_number}: expected 'item id<TAB>image path', got {line!r}")
        if raw in by_raw:
            raise AtomicFileError(f"{path}:{line_number}: item {raw!r} has a second image line")
        if image.strip():
            by_raw[raw] = path.parent / image.strip()  # an absolute path replaces the folder
    paths = [by_raw.get(raw) for raw in raw_item_ids]
    missing = sum(p is None for p in paths)
    if missing:
        logger.warning(
            "%s: %d of %d items have no image path; their image rows will be zero", path, missing, len(paths)
        )
    unknown = len(set(by_raw) - set(raw_item_ids))
    if unknown:
        logger.info("%s: %d image lines name items outside the catalogue; ignored", path, unknown)
    return paths


def read_inter_file(path: str | os.PathLike, num_items: int) -> dict[str, np.ndarray]:
    """One split: `user` [R], `history` as CSR (`items` flat, `offsets` [R + 1]) of 1-based item ids, `target`.

    Every row is validated: integers, item indices in 0..num_items-1, a non-empty history.
    """
    path = Path(path)
    users: list[int] = []
    targets: list[int] = []
    flat: list[int] = []
    offsets = [0]
    for line_number, line in _rows_after_header(path, INTER_HEADER):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise AtomicFileError(f"{path}:{line_number}: expected 3 tab-separated fields, got {len(fields)}")
        try:
            user = int(fields[0])
            history = [int(token) for token in fields[1].split()]
            target = int(fields[2])
        except ValueError:
            raise AtomicFileError(
                f"{path}:{line_number}: expected integer user, history and target indices, got {line!r}"
            ) from None
        if not history:
            raise AtomicFileError(f"{path}:{line_number}: empty history; every row needs at least one item")
        for item in (*history, target):
            if not 0 <= item < num_items:
                raise AtomicFileError(
                    f"{path}:{line_number}: item index {item} out of range 0..{num_items - 1} "
                    f"(the .item2index file lists {num_items} items)"
                )
        users.append(user)
        targets.append(target + 1)
        flat.extend(item + 1 for item in history)
        offsets.append(len(flat))
    if not users:
        raise AtomicFileError(f"{path}: no interaction rows after the header")
    return {
        "user": np.asarray(users, dtype=np.int64),
        "items": np.asarray(flat, dtype=np.int64),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "target": np.asarray(targets, dtype=np.int64),
    }


def read_feature_file(
    path: str | os.PathLike, num_items: int, feature_size: int | None = None, memory_map: bool = False
) -> np.ndarray:
    """A feature table `[num_items, F]` from a raw float32 file (width `feature_size` required) or a `.npy`.

    Errors name the file and, for bad values, the row. With `memory_map` the table stays on disk (pre-training
    catalogues of ~450k items): it is checked chunk by chunk and returned as a read-only memory map."""
    path = Path(path)
    if not path.exists():
        raise AtomicFileError(f"{path}: feature file not found")
    if path.suffix == ".npy":
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise AtomicFileError(f"{path}: not a readable .npy array (truncated or damaged?): {error}") from None
        if not np.issubdtype(table.dtype, np.floating):
            raise AtomicFileError(f"{path}: dtype {table.dtype}, expected floating-point features (e.g. float32)")
        if table.ndim != 2:
            raise AtomicFileError(f"{path}: expected a 2-D array [items, width], got shape {table.shape}")
        if feature_size is not None and table.shape[1] != feature_size:
            raise AtomicFileError(f"{path}: width {table.shape[1]}, expected {feature_size} (from the config)")
    else:
        if feature_size is None:
            raise AtomicFileError(f"{path}: a raw float32 feature file needs its width (feature_size)")
        size = path.stat().st_size
        if size % (4 * feature_size):
            raise AtomicFileError(f"{path}: {size} bytes is not a whole number of float32 rows of width {feature_size}")
        table = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, feature_size)
    if table.shape[0] != num_items:
        raise AtomicFileError(f"{path}: {table.shape[0]} rows, expected one per item ({num_items})")
    chunk, first_bad, bad_rows = 65536, None, 0
    for start in range(0, len(table), chunk):
        bad = ~np.isfinite(table[start : start + chunk]).all(axis=1)
        if bad.any():
            first_bad = start + int(np.argmax(bad)) if first_bad is None else first_bad
            bad_rows += int(bad.sum())
    if first_bad is not None:
        raise AtomicFileError(f"{path}: row {first_bad} holds NaN or inf ({bad_rows} rows in all)")
    if memory_map and table.dtype == np.float32:
        return table
    return np.ascontiguousarray(table, dtype=np.float32)


def find_dataset_name(data_dir: str | os.PathLike) -> str:
    """The `X` of the single `X.train.inter` in `data_dir`."""
    names = sorted(p.name[: -len(".train.inter")] for p in Path(data_dir).glob("*.train.inter"))
    if len(names) != 1:
        raise AtomicFileError(f"{data_dir}: expected exactly one *.train.inter file, found {names or 'none'}")
    return names[0]


def load_item_catalog(
    data_dir: str | os.PathLike,
    dataset_name: str | None = None,
    feature_files: Mapping[str, str] | None = None,
    feature_sizes: Mapping[str, int] | None = None,
) -> ItemCatalog:
    """Items, texts (when a `.text` file exists) and the features of each modality in `feature_files`
    (`{"text": "X.feat1CLS", "image": "X.feat3CLS"}`, paths relative to `data_dir` or absolute; `{name}` stands
    for the dataset prefix X)."""
    data_dir = Path(data_dir)
    name = dataset_name or find_dataset_name(data_dir)
    raw_ids = read_index_file(data_dir / f"{name}.item2index")
    text_path = data_dir / f"{name}.text"
    catalog = ItemCatalog(raw_ids, text=read_text_file(text_path, raw_ids) if text_path.exists() else None)
    for modality, file_name in (feature_files or {}).items():
        size = (feature_sizes or {}).get(modality)
        file_name = file_name.format(name=name)
        table = read_feature_file(data_dir / file_name, len(raw_ids), size)
        catalog.features[modality] = table
        catalog.present[modality] = np.abs(table).sum(axis=1) > 0
        missing = int((~catalog.present[modality]).sum())
        if missing == len(raw_ids):
            logger.warning(
                "%s: every row is zero, so no item has the %s modality; leave the file out instead", file_name, modality
            )
        elif missing:
            logger.info(
                "%s: %d of %d items lack the %s modality (all-zero rows)", file_name, missing, len(raw_ids), modality
            )
    return catalog


def _fingerprint(paths: Sequence[Path], extra: str) -> str:
    """The cache key: the files' contents (not their size and time, which a rewritten file may keep)."""
    digest = hashlib.sha256((_CACHE_VERSION + extra).encode())
    for path in paths:
        digest.update(str(path.resolve()).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class _quiet_datasets:
    """Silence datasets' progress bars for the short cache write."""

    def __enter__(self):
        import datasets

        self.was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc):
        import datasets

        if self.was_enabled:
            datasets.enable_progress_bars()


def _split_to_dataset(split: dict[str, np.ndarray]) -> Dataset:
    offsets = split["offsets"]
    histories = np.split(split["items"], offsets[1:-1])
    return Dataset.from_dict({"user": split["user"], "history": histories, "target": split["target"]})


def _check_evaluation_splits(splits: Mapping[str, dict], paths: Sequence[Path]) -> None:
    """Leave-one-out valid and test splits hold one row per user: a user twice is an error naming the row; a
    valid split and a test split of different users (e.g. a truncated file) is worth a warning."""
    users = {}
    for index, split in enumerate(SPLITS[1:], start=1):
        column = splits[split]["user"]
        unique, first, counts = np.unique(column, return_index=True, return_counts=True)
        if (counts > 1).any():
            user = unique[np.argmax(counts > 1)]
            rows = np.nonzero(column == user)[0][:2] + 2  # file lines: the header is line 1
            raise AtomicFileError(
                f"{paths[index]}:{rows[1]}: user {user} has a second row (first on line {rows[0]}); a {split} "
                "split holds one row per user"
            )
        users[split] = set(unique.tolist())
    if users["valid"] != users["test"]:
        only_test, only_valid = len(users["test"] - users["valid"]), len(users["valid"] - users["test"])
        logger.warning(
            "%s and %s hold different users (%d only in test, %d only in valid; %d in valid in all): is a file "
            "truncated or from another split?", paths[1], paths[2], only_test, only_valid, len(users["valid"]),
        )  # fmt: skip


def load_atomic_dataset(
    data_dir: str | os.PathLike,
    dataset_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """The train/valid/test splits as a `DatasetDict` with columns `user`, `history` (1-based item ids, oldest
    first) and `target`. Parsed once; later calls load the cached Arrow copy (keyed by the files' size and
    modification time) from `cache_dir`, by default `<data_dir>/.missrec_cache`."""
    data_dir = Path(data_dir)
    name = dataset_name or find_dataset_name(data_dir)
    paths = [data_dir / f"{name}.{split}.inter" for split in SPLITS] + [data_dir / f"{name}.item2index"]
    for path in paths:
        if not path.exists():
            raise AtomicFileError(f"{path}: file not found (expected the atomic files of dataset {name!r})")
    cache_root = Path(cache_dir) if cache_dir is not None else data_dir / ".missrec_cache"
    cache_path = cache_root / f"{name}-{_fingerprint(paths, name)}"
    if (cache_path / "dataset_dict.json").exists():
        logger.info("loading the cached dataset from %s", cache_path)
        return load_from_disk(str(cache_path))
    num_items = len(read_index_file(paths[-1]))
    splits = {split: read_inter_file(paths[i], num_items) for i, split in enumerate(SPLITS)}
    _check_evaluation_splits(splits, paths)
    dataset = DatasetDict({split: _split_to_dataset(rows) for split, rows in splits.items()})
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        temporary = cache_root / f".tmp-{cache_path.name}-{os.getpid()}"
        with _quiet_datasets():
            dataset.save_to_disk(str(temporary))
        replace_directory(temporary, cache_path)
        dataset = load_from_disk(str(cache_path))
    except OSError as error:  # a read-only data folder still works, just without a cache
        logger.warning("could not cache the dataset in %s: %s", cache_root, error)
    return dataset


def subsample_training_users(dataset: DatasetDict, fraction: float, seed: int) -> DatasetDict:
    """Keep the train rows of a random `fraction` of the users (at least one), drawn with `seed`; valid and
    test keep every user. The low-data regime: fewer users to learn from, the same users to rank."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_users_fraction={fraction!r} is invalid; allowed: a float in (0, 1].")
    if fraction == 1.0:
        return dataset
    users = np.unique(np.asarray(dataset["train"].with_format("numpy")[:]["user"]))
    count = max(1, round(fraction * len(users)))
    kept = np.random.default_rng(seed).choice(users, size=count, replace=False)
    train = dataset["train"].with_format("numpy")
    rows = np.nonzero(np.isin(train[:]["user"], kept))[0]
    return DatasetDict({**dataset, "train": dataset["train"].select(rows)})


def dataset_statistics(dataset: DatasetDict, num_items: int) -> dict[str, float]:
    """Counts a user would check against the paper's table (reference §2.5)."""
    test = dataset["test"]
    lengths = np.asarray([len(h) for h in test[:]["history"]]) + 1
    return {
        "users": len(test),
        "items": num_items,
        "train_rows": len(dataset["train"]),
        "valid_rows": len(dataset["valid"]),
        "test_rows": len(test),
        "mean_sequence_length": float(lengths.mean()),
        "interactions": int(lengths.sum()),
    }


# -------------------------------------------------------------------------------------------- batching
def pad_histories(
    items: np.ndarray, offsets: np.ndarray, rows: np.ndarray, max_seq_length: int, pad_to_multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[len(rows), W]` histories of the given CSR rows, W = the longest in this batch (at most
    `max_seq_length`, keeping the most recent items) rounded up to a multiple of `pad_to_multiple_of` (still at
    most `max_seq_length`), and their lengths. Vectorised: no loop over rows."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = offsets[rows + 1]
    lengths = np.minimum(ends - offsets[rows], max_seq_length)
    starts = ends - lengths
    width = max(int(lengths.max(initial=1)), 1)
    width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, max(max_seq_length, width))
    positions = np.arange(width)
    valid = positions[None, :] < lengths[:, None]
    source = np.minimum(starts[:, None] + positions[None, :], max(len(items) - 1, 0))
    padded = np.where(valid, items[source], 0) if len(items) else np.zeros((len(rows), width), np.int64)
    return padded.astype(np.int64, copy=False), lengths


class HistoryDataset(torch.utils.data.Dataset):
    """A split held as CSR arrays; `__getitems__` returns a whole padded batch at once, so the DataLoader's
    collation is vectorised (torch calls `__getitems__` with the batch's indices)."""

    def __init__(self, split: Dataset | Mapping[str, np.ndarray], max_seq_length: int, pad_to_multiple_of: int = 1):
        if isinstance(split, Dataset):
            columns = split.with_format("numpy")[:]
            histories = columns["history"]
            lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
            self.items = np.concatenate(histories).astype(np.int64) if len(histories) else np.zeros(0, np.int64)
            self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self.users = np.asarray(columns["user"], dtype=np.int64)
            self.targets = np.asarray(columns["target"], dtype=np.int64)
        else:
            self.items, self.offsets = split["items"], split["offsets"]
            self.users, self.targets = split["user"], split["target"]
        self.max_seq_length = max_seq_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.lengths = np.minimum(np.diff(self.offsets), max_seq_length)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        padded, lengths = pad_histories(self.items, self.offsets, rows, self.max_seq_length, self.pad_to_multiple_of)
        return {
            "input_ids": torch.from_numpy(padded),
            "attention_mask": torch.from_numpy(padded != 0),
            "labels": torch.from_numpy(self.targets[rows]),
            "row_index": torch.from_numpy(rows),
        }


def identity_collate(batch):
    """The batch is already built by `HistoryDataset.__getitems__`."""
    return batch


class SequenceCollator:
    """HF-style collator for examples `{"history": [...], "target": int}` (e.g. rows of the DatasetDict):
    right-pads to the batch's longest history, keeps the `max_seq_length` most recent items."""

    def __init__(self, max_seq_length: int = 50):
        self.max_seq_length = max_seq_length

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        histories = [np.asarray(example["history"], dtype=np.int64) for example in examples]
        lengths = np.fromiter(map(len, histories), dtype=np.int64, count=len(histories))
        if (lengths == 0).any():
            raise ValueError(f"SequenceCollator: example {int(np.argmin(lengths))} has an empty history")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        padded, _ = pad_histories(np.concatenate(histories), offsets, np.arange(len(histories)), self.max_seq_length)
        batch = {"input_ids": torch.from_numpy(padded), "attention_mask": torch.from_numpy(padded != 0)}
        if all("target" in example for example in examples):
            batch["labels"] = torch.tensor([int(example["target"]) for example in examples])
        return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Random batches of similar history lengths, so that padding to the batch's longest history is cheap.

    Each epoch: a seeded permutation is cut into mega-batches of `batch_size x group_factor` rows, each sorted
    by length and cut into batches, and the batches are shuffled. `group_factor=1` is plain random batching.
    `set_epoch` makes the order a function of (seed, epoch), so a resumed run sees the same batches.
    With `groups` (an int label per row, e.g. its pre-training domain) every full batch holds one group's
    rows: the permutation, pools and batches are made within each group, and the rows that fill no whole
    batch of their group are pooled and batched together (fewer than one batch per group, so at most
    groups - 1 mixed full batches and the short last one).

    Without shuffling (evaluation) the rows come longest first in batches of `batch_size`; with `min_fill` > 0 a
    batch also ends before the first history shorter than `min_fill` x its longest, so at least that fraction
    of its padded positions is real. That matters on small evaluation sets: the 2,928 validation users of
    scientific_mm sorted into batches of 1,024 are two thirds padding (the first batch pads histories of mean
    length 7 to 34). Batches then differ in size, which multi-process evaluation does not allow (Accelerate
    removes the duplicates of a short last batch only). The batches are fixed when the sampler is built."""

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        group_factor: int = 50,
        drop_last: bool = False,
        min_fill: float = 0.0,
        groups: np.ndarray | None = None,
    ):
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1]; got {min_fill}.")
        if min_fill and (shuffle or drop_last):
            raise ValueError("min_fill applies to evaluation batches only (shuffle=False, drop_last=False).")
        if groups is not None and (not shuffle or len(groups) != len(lengths)):
            raise ValueError(f"groups applies to training batches, one label per row ({len(lengths)}).")
        self.groups = None if groups is None else np.asarray(groups)
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_factor = max(1, group_factor)
        self.drop_last = drop_last
        self.min_fill = min_fill
        self.epoch = 0
        self._evaluation_batches = None if shuffle else self._longest_first_batches()

    def _longest_first_batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        order = np.argsort(-self.lengths, kind="stable")
        if not self.min_fill:
            stop = n - n % self.batch_size if self.drop_last else n
            return [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]
        descending = -self.lengths[order]  # ascending, for searchsorted
        batches, start = [], 0
        while start < n:  # one iteration per batch
            width = -descending[start]
            wide_enough = int(np.searchsorted(descending, -self.min_fill * width, side="right"))
            stop = min(start + self.batch_size, wide_enough)
            batches.append(order[start:stop])
            start = stop
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pooled_batches(self, order: np.ndarray) -> list[np.ndarray]:
        """`order` cut into pools of `group_factor` batches, each pool sorted by length, cut into batches."""
        mega = self.batch_size * self.group_factor
        pools = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([p[np.argsort(-self.lengths[p], kind="stable")] for p in pools]) if pools else order
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:
        if self._evaluation_batches is not None:
            return len(self._evaluation_batches)
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if self._evaluation_batches is not None:
            # Evaluation: longest first, so batch widths shrink. Without min_fill the first batch is the largest;
            # with it a later, narrower batch may hold more rows (the score blocks grow with the rows).
            yield from (batch.tolist() for batch in self._evaluation_batches)
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if self.groups is None:
            batches = self._pooled_batches(order)
        else:
            batches, leftovers = [], []
            for group in np.unique(self.groups):
                rows = order[self.groups[order] == group]  # this group's rows, still in random order
                whole = len(rows) - len(rows) % self.batch_size
                batches += self._pooled_batches(rows[:whole])
                leftovers.append(rows[whole:])
            batches += self._pooled_batches(np.concatenate(leftovers))
        partial = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        # Full batches in random order, the short one last: Accelerate shards batches round by round across
        # processes and drops a round whose last batch is short, so a short batch in the middle loses data.
        for index in rng.permutation(len(batches)):
            yield batches[index].tolist()
        if partial is not None and not self.drop_last:
            yield partial.tolist()


def build_loader(
    split,
    max_seq_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    group_factor: int,
    num_workers: int,
    min_fill: float = 0.0,
    pad_to_multiple_of: int = 1,
) -> DataLoader:
    dataset = HistoryDataset(split, max_seq_length, pad_to_multiple_of)
    sampler = LengthGroupedBatchSampler(
        dataset.lengths,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        group_factor=group_factor,
        min_fill=min_fill,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=identity_collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


# ------------------------------------------------------------------------------------------ pre-training
class DomainTables:
    """One modality's features over several domains, addressed by global item id (0 = padding), without
    concatenating them: each domain's table stays as loaded (memory-mapped for large corpora)."""

    def __init__(self, tables: Sequence[np.ndarray], item_offsets: np.ndarray):
        self.tables = list(tables)
        self.item_offsets = item_offsets  # [D + 1]; domain d holds global ids offsets[d] + 1 .. offsets[d + 1]
        self.width = int(self.tables[0].shape[1])

    def __len__(self) -> int:
        return int(self.item_offsets[-1]) + 1

    def gather(self, item_ids: np.ndarray) -> np.ndarray:
        """Rows of `item_ids` (any shape) -> `[*shape, F]`; id 0 gives zeros. One fancy index per domain."""
        flat = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((flat.size, self.width), dtype=np.float32)
        domain = np.searchsorted(self.item_offsets, flat, side="left") - 1
        for d, table in enumerate(self.tables):
            selected = np.nonzero((domain == d) & (flat > 0))[0]
            if selected.size:
                rows = flat[selected] - self.item_offsets[d] - 1
                order = np.argsort(rows, kind="stable")  # sorted reads are kinder to a memory map
                out[selected[order]] = table[rows[order]]
        return out.reshape(*np.shape(item_ids), self.width)

    def __getitem__(self, index: slice) -> np.ndarray:
        """Contiguous global rows (for chunked clustering): `tables[start:stop]` with row 0 = padding."""
        start, stop, _ = index.indices(len(self))
        return self.gather(np.arange(start, stop))


@dataclass
class PretrainingCorpus:
    """Several domains merged into one catalogue (reference §2.4): item ids offset per domain, the train
    rows of all domains as one split, per-modality features left in place (`DomainTables`)."""

    domain_names: list[str]
    item_offsets: np.ndarray
    train: dict[str, np.ndarray]
    features: dict[str, DomainTables]
    present: dict[str, np.ndarray]
    augmented_text: DomainTables | None = None

    @property
    def num_items(self) -> int:
        return int(self.item_offsets[-1])

    def feature_size(self, modality: str) -> int:
        return self.features[modality].width

    def row_domains(self) -> np.ndarray:
        """`[rows]` int: the domain (index into `domain_names`) of every train row, from its target's id."""
        return np.searchsorted(self.item_offsets, self.train["target"], side="left") - 1

    def modality_present(self) -> np.ndarray:
        """`[M, N + 1]` bool, modality order as `features`."""
        return np.stack([self.present[m] for m in self.features])

    def summary(self) -> str:
        rows = len(self.train["target"])
        parts = [
            f"{len(self.domain_names)} domains ({', '.join(self.domain_names)}), {self.num_items} items, "
            f"{rows} train rows"
        ]
        parts += [f"{m}: width {t.width}, present for {int(self.present[m].sum())}" for m, t in self.features.items()]
        if self.augmented_text is not None:
            parts.append("word-dropped text features available")
        return "; ".join(parts)


def load_pretraining_corpus(
    domain_dirs: Sequence[str | os.PathLike],
    feature_files: Mapping[str, str],
    feature_sizes: Mapping[str, int] | None = None,
    augmented_text_file: str | None = "{name}.feat2CLS",
) -> PretrainingCorpus:
    """Merge the train rows of several atomic-file folders. `feature_files` name each modality's file with
    `{name}` for the domain prefix; `augmented_text_file` (word-dropped text, `.feat2CLS`) is used when every
    domain has it. Feature files are memory-mapped."""
    names, offsets, tables = [], [0], {m: [] for m in feature_files}
    augmented: list[np.ndarray] = []
    users, items, row_offsets, targets = [], [], [np.zeros(1, np.int64)], []
    for directory in map(Path, domain_dirs):
        name = find_dataset_name(directory)
        num_items = len(read_index_file(directory / f"{name}.item2index"))
        split = read_inter_file(directory / f"{name}.train.inter", num_items)
        base = offsets[-1]
        users.append(split["user"])
        items.append(split["items"] + base)
        row_offsets.append(split["offsets"][1:] + row_offsets[-1][-1])
        targets.append(split["target"] + base)
        for modality, pattern in feature_files.items():
            size = (feature_sizes or {}).get(modality)
            tables[modality].append(read_feature_file(directory / pattern.format(name=name), num_items, size, True))
        if augmented_text_file and "text" in feature_files:
            path = directory / augmented_text_file.format(name=name)
            if path.exists():
                augmented.append(read_feature_file(path, num_items, tables["text"][-1].shape[1], True))
        names.append(name)
        offsets.append(base + num_items)
    item_offsets = np.asarray(offsets, dtype=np.int64)
    features = {m: DomainTables(t, item_offsets) for m, t in tables.items()}
    present = {}
    for modality, table in features.items():
        mask = np.zeros(len(table), dtype=bool)
        for d, rows in enumerate(table.tables):
            for start in range(0, len(rows), 65536):
                block = np.asarray(rows[start : start + 65536])
                mask[offsets[d] + 1 + start : offsets[d] + 1 + start + len(block)] = np.abs(block).sum(1) > 0
        present[modality] = mask
    train = {
        "user": np.concatenate(users),
        "items": np.concatenate(items),
        "offsets": np.concatenate(row_offsets),
        "target": np.concatenate(targets),
    }
    use_augmented = len(augmented) == len(names) and len(names) > 0
    if augmented and not use_augmented:
        logger.warning("word-dropped text features exist for only some domains; using item drop only")
    return PretrainingCorpus(
        names, item_offsets, train, features, present, DomainTables(augmented, item_offsets) if use_augmented else None
    )


class PretrainingCollator:
    """Turns a padded batch of global item ids into the pre-training inputs: per-position features, the
    targets' features, and an augmented view.

    Augmentation, once per batch (reference §2.7): with probability `item_drop_prob` (always, without
    word-dropped text) each item except the first is dropped with probability `item_drop_ratio` and the kept
    items are compacted; the features of the augmented view are looked up for the compacted ids, so text and
    image stay aligned (fix: the original kept the image of the uncompacted sequence). Otherwise each position's
    text feature is swapped for its word-dropped version with probability `word_drop_ratio`.
    Randomness comes from (seed, epoch, batch rows), so a resumed run draws the same views.
    """

    def __init__(
        self,
        corpus: PretrainingCorpus,
        item_drop_ratio: float = 0.2,
        item_drop_prob: float = 0.9,
        word_drop_ratio: float = 0.2,
        seed: int = 0,
        augment: bool = True,
    ):
        self.corpus = corpus
        self.item_drop_ratio = item_drop_ratio
        self.item_drop_prob = item_drop_prob
        self.word_drop_ratio = word_drop_ratio
        self.seed = seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _features(self, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        features = {m: torch.from_numpy(table.gather(ids)) for m, table in self.corpus.features.items()}
        mask = torch.from_numpy(np.stack([self.corpus.present[m][ids] for m in self.corpus.features]))
        return features, mask

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict:
        ids = batch["input_ids"].numpy()
        targets = batch["labels"].numpy()
        item_features, modality_mask = self._features(ids)
        target_features, target_mask = self._features(targets)
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "item_features": item_features,
            "modality_mask": modality_mask,
            "target_features": target_features,
            "target_modality_mask": target_mask,
            "target_ids": batch["labels"],
        }
        if not self.augment:
            return out
        rows = batch["row_index"].numpy() if "row_index" in batch else np.arange(len(ids))
        rng = np.random.default_rng([self.seed, self.epoch, int(rows.sum()), int(rows[0]) if len(rows) else 0])
        if self.corpus.augmented_text is None or rng.random() < self.item_drop_prob:
            augmented_ids = item_drop(ids, self.item_drop_ratio, rng)
            augmented_features, augmented_mask = self._features(augmented_ids)
        else:
            augmented_ids = ids
            augmented_features, augmented_mask = dict(item_features), modality_mask
            swap = (rng.random(ids.shape) < self.word_drop_ratio) & (ids != 0)
            dropped = torch.from_numpy(self.corpus.augmented_text.gather(np.where(swap, ids, 0)))
            augmented_features["text"] = torch.where(
                torch.from_numpy(swap)[..., None], dropped, augmented_features["text"]
            )
        out.update(
            augmented_input_ids=torch.from_numpy(augmented_ids),
            augmented_attention_mask=torch.from_numpy(augmented_ids != 0),
            augmented_item_features=augmented_features,
            augmented_modality_mask=augmented_mask,
        )
        return out


def item_drop(ids: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each item but the first with probability `ratio`, keep the order, compact to the left.
    Vectorised; the result is as wide as the longest kept history."""
    keep = (rng.random(ids.shape) >= ratio) & (ids != 0)
    keep[:, 0] = ids[:, 0] != 0
    order = np.argsort(~keep, axis=1, kind="stable")
    compacted = np.take_along_axis(np.where(keep, ids, 0), order, axis=1)
    width = max(int(keep.sum(1).max(initial=1)), 1)
    return np.ascontiguousarray(compacted[:, :width])
