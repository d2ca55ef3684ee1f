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
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_from_disk

logger = logging.getLogger(__name__)

INTER_HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
TEXT_HEADER = ["item_id:token", "text:token_seq"]
SPLITS = ("train", "valid", "test")
_CACHE_VERSION = "1"


class AtomicFileError(ValueError):
    """A problem in an input file; the message names the file, the line and what was expected."""


@dataclass
class ItemCatalog:
    """One domain's items: raw ids in index order, frozen features and modality-present masks per modality.

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
def read_index_file(path: str | os.PathLike) -> list[str]:
    """Raw ids of an `.item2index` / `.user2index` file, ordered by their 0-based index."""
    path = Path(path)
    raw_ids: dict[int, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
                raise AtomicFileError(f"{path}:{line_number}: expected 'raw id<TAB>integer index', got {line!r}")
            index = int(parts[1])
            if index in raw_ids:
                raise AtomicFileError(f"{path}:{line_number}: index {index} is assigned twice")
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
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != TEXT_HEADER:
            raise AtomicFileError(f"{path}:1: expected header {TEXT_HEADER}, got {header}")
        for line_number, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
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


def read_inter_file(path: str | os.PathLike, num_items: int) -> dict[str, np.ndarray]:
    """One split: `user` [R], `history` as CSR (`items` flat, `offsets` [R + 1]) of 1-based item ids, `target`.

    Every row is validated: integers, item indices in 0..num_items-1, a non-empty history.
    """
    path = Path(path)
    users: list[int] = []
    targets: list[int] = []
    flat: list[int] = []
    offsets = [0]
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != INTER_HEADER:
            raise AtomicFileError(f"{path}:1: expected header {INTER_HEADER}, got {header}")
        for line_number, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
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


def read_feature_file(path: str | os.PathLike, num_items: int, feature_size: int | None = None) -> np.ndarray:
    """A feature table `[num_items, F]` from a raw float32 file (width `feature_size` required) or a `.npy`.

    Errors name the file and, for bad values, the row. `.npy` files are memory-mapped while checked."""
    path = Path(path)
    if not path.exists():
        raise AtomicFileError(f"{path}: feature file not found")
    if path.suffix == ".npy":
        table = np.load(path, mmap_mode="r")
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
        table = np.fromfile(path, dtype=np.float32).reshape(-1, feature_size)
    if table.shape[0] != num_items:
        raise AtomicFileError(f"{path}: {table.shape[0]} rows, expected one per item ({num_items})")
    table = np.ascontiguousarray(table, dtype=np.float32)
    bad = ~np.isfinite(table).all(axis=1)
    if bad.any():
        raise AtomicFileError(f"{path}: row {int(np.argmax(bad))} holds NaN or inf ({int(bad.sum())} rows in all)")
    return table


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
    (`{"text": "X.feat1CLS", "image": "X.feat3CLS"}`, paths relative to `data_dir` or absolute)."""
    data_dir = Path(data_dir)
    name = dataset_name or find_dataset_name(data_dir)
    raw_ids = read_index_file(data_dir / f"{name}.item2index")
    text_path = data_dir / f"{name}.text"
    catalog = ItemCatalog(raw_ids, text=read_text_file(text_path, raw_ids) if text_path.exists() else None)
    for modality, file_name in (feature_files or {}).items():
        size = (feature_sizes or {}).get(modality)
        table = read_feature_file(data_dir / file_name, len(raw_ids), size)
        catalog.features[modality] = table
        catalog.present[modality] = np.abs(table).sum(axis=1) > 0
        missing = int((~catalog.present[modality]).sum())
        if missing:
            logger.info(
                "%s: %d of %d items lack the %s modality (all-zero rows)", file_name, missing, len(raw_ids), modality
            )
    return catalog


def _fingerprint(paths: Sequence[Path], extra: str) -> str:
    digest = hashlib.sha256((_CACHE_VERSION + extra).encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
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
    dataset = DatasetDict(
        {split: _split_to_dataset(read_inter_file(paths[i], num_items)) for i, split in enumerate(SPLITS)}
    )
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        temporary = cache_root / f".tmp-{cache_path.name}-{os.getpid()}"
        with _quiet_datasets():
            dataset.save_to_disk(str(temporary))
        os.replace(temporary, cache_path)
        dataset = load_from_disk(str(cache_path))
    except OSError as error:  # a read-only data folder still works, just without a cache
        logger.warning("could not cache the dataset in %s: %s", cache_root, error)
    return dataset


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
    items: np.ndarray, offsets: np.ndarray, rows: np.ndarray, max_seq_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `[len(rows), W]` histories of the given CSR rows, W = the longest in this batch (at most
    `max_seq_length`, keeping the most recent items), and their lengths. Vectorised: no loop over rows."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = offsets[rows + 1]
    lengths = np.minimum(ends - offsets[rows], max_seq_length)
    starts = ends - lengths
    width = max(int(lengths.max(initial=1)), 1)
    positions = np.arange(width)
    valid = positions[None, :] < lengths[:, None]
    source = np.minimum(starts[:, None] + positions[None, :], max(len(items) - 1, 0))
    padded = np.where(valid, items[source], 0) if len(items) else np.zeros((len(rows), width), np.int64)
    return padded.astype(np.int64, copy=False), lengths


class HistoryDataset(torch.utils.data.Dataset):
    """A split held as CSR arrays; `__getitems__` returns a whole padded batch at once, so the DataLoader's
    collation is vectorised (torch calls `__getitems__` with the batch's indices)."""

    def __init__(self, split: Dataset | Mapping[str, np.ndarray], max_seq_length: int):
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
        self.lengths = np.minimum(np.diff(self.offsets), max_seq_length)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        padded, lengths = pad_histories(self.items, self.offsets, rows, self.max_seq_length)
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
    `set_epoch` makes the order a function of (seed, epoch), so a resumed run sees the same batches."""

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        group_factor: int = 50,
        drop_last: bool = False,
    ):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_factor = max(1, group_factor)
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            # Evaluation: longest first, so batch widths shrink and the first batch shows the peak memory.
            order = np.argsort(-self.lengths, kind="stable")
            stop = n - n % self.batch_size if self.drop_last else n  # keep in step with __len__
            yield from (order[i : i + self.batch_size].tolist() for i in range(0, stop, self.batch_size))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        mega = self.batch_size * self.group_factor
        groups = [order[i : i + mega] for i in range(0, n, mega)]
        order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        for index in rng.permutation(len(batches)):
            yield batches[index].tolist()


def catalog_to_json(catalog: ItemCatalog) -> str:
    """The raw id map saved beside a model (`item_ids.json`), so recommendations speak in raw ids."""
    return json.dumps({"raw_item_ids": catalog.raw_item_ids}, ensure_ascii=False)
