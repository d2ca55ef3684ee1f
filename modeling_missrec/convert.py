"""Raw interaction log + item metadata -> the atomic files that `modeling_missrec.data` reads.

Pipeline (every drop is counted in `ConversionStats` and logged; bad input raises `ConversionError`):
  1. read the interaction log (CSV/TSV, Parquet or JSON Lines) and the item metadata; validate ids and timestamps
  2. optionally drop exact duplicate interactions (same user, item and timestamp; kept by default, because
     repeated purchases are real interactions in Amazon-style logs)
  3. keep only interactions of items that have a metadata row
  4. iterative k-core filtering of users and items until nothing changes
  5. per user, a stable sort by timestamp (equal timestamps keep their file order)
  6. users indexed in order of first appearance in the filtered log; items in order of first appearance when
     reading the users in that order, each user's interactions in time order; users with fewer than 3
     interactions (possible only with k < 3) cannot be split and are skipped
  7. leave-one-out split: last item -> test target, second-to-last -> valid target, every earlier position t >= 1
     -> one train row; histories keep the most recent `max_seq_length` items
  8. item text = cleaned title + categories + brand (configurable); optional `X.images` with image paths

Files written to `output_dir` (each via a temporary file and `os.replace`, so a reader never sees half a file):
`X.train.inter`, `X.valid.inter`, `X.test.inter`, `X.user2index`, `X.item2index`, `X.text`, `X.images` (with an
image column) and `X.stats.json`.

Row numbers in error messages count data records from 1 (the CSV header is not a row); for JSON Lines they are
line numbers.

    python -m modeling_missrec.convert ratings.csv meta.jsonl --output_dir data/Scientific --dataset_name Scientific
"""

from __future__ import annotations

import argparse
import ast
import gzip
import html
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_atomically
from .columnar_log import LogColumns, read_log
from .data import IMAGE_HEADER, INTER_HEADER, TEXT_HEADER
from .raw_values import ConversionError, check_columns, is_missing, normalise_ids, parse_timestamps

logger = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "parquet", "jsonl")
TEXT_FIELDS = ("title", "categories", "brand", "description")
LOG_READERS = ("arrow", "pandas")
USERS_PER_WRITE = 20_000  # the split files are written in blocks of this many users' lines: bounded memory
MIN_INTERACTIONS_TO_SPLIT = 3  # one train-part item, one valid target, one test target
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # Amazon review/metadata dumps named *.json are JSON Lines
}


@dataclass(frozen=True)
class ColumnNames:
    """Column names in the input files.

    `metadata_item=None` means the same name as `item`. The optional metadata columns (categories, brand,
    description) are used when a column of that name exists and skipped (logged) otherwise, as long as they keep
    their default name; a name that differs from the default must exist, so a typo is an error, not a silently
    missing field. `image=None` writes no `X.images` file.
    """

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    metadata_item: str | None = None
    title: str = "title"
    categories: str | None = "categories"
    brand: str | None = "brand"
    description: str | None = "description"
    image: str | None = None

    @property
    def metadata_item_column(self) -> str:
        return self.metadata_item or self.item

    def is_default(self, name: str) -> bool:
        """Whether the field `name` still has its default column name (then it may be absent from the file)."""
        default = {f.name: f.default for f in fields(self)}[name]
        return getattr(self, name) == default


@dataclass
class ConversionStats:
    """What a conversion produced and everything it dropped, with the reason; saved as `X.stats.json`."""

    dataset_name: str
    users: int = 0
    items: int = 0
    interactions: int = 0
    train_rows: int = 0
    valid_rows: int = 0
    test_rows: int = 0
    sparsity: float = 0.0
    sequence_length: dict[str, float] = field(default_factory=dict)  # interactions per user
    history_length: dict[str, dict[str, float]] = field(default_factory=dict)  # per split, after truncation
    # input and what was dropped, step by step
    interactions_read: int = 0
    metadata_rows_read: int = 0
    duplicate_metadata_rows_skipped: int = 0
    duplicate_interactions: int = 0  # exact (user, item, timestamp) repeats found in the log
    duplicate_interactions_dropped: int = 0
    interactions_without_metadata: int = 0
    items_without_metadata: int = 0
    metadata_items_never_interacted: int = 0
    kcore_rounds: int = 0  # rounds that removed something
    kcore_users_removed: int = 0
    kcore_items_removed: int = 0
    kcore_interactions_removed: int = 0
    short_users_skipped: int = 0
    short_user_interactions_dropped: int = 0
    items_only_in_short_users: int = 0
    empty_texts: int = 0  # items whose text fields were all empty
    long_texts_emptied: int = 0
    images_written: int | None = None
    items_without_image: int | None = None
    settings: dict[str, object] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """A human-readable report, printed by the CLI."""
        lines = [
            f"dataset {self.dataset_name}: {self.users} users, {self.items} items, {self.interactions} interactions "
            f"(sparsity {self.sparsity:.6f})",
            f"rows: train {self.train_rows}, valid {self.valid_rows}, test {self.test_rows}",
        ]
        if self.sequence_length:
            s = self.sequence_length
            lines.append(
                f"interactions per user: min {s['min']:g}, mean {s['mean']:.2f}, median {s['median']:g}, "
                f"max {s['max']:g}"
            )
        for split, s in self.history_length.items():
            if s:
                lines.append(
                    f"{split} history length: min {s['min']:g}, mean {s['mean']:.2f}, median {s['median']:g}, "
                    f"max {s['max']:g}"
                )
        lines += [
            f"read: {self.interactions_read} interactions, {self.metadata_rows_read} metadata rows",
            f"duplicate metadata rows skipped: {self.duplicate_metadata_rows_skipped}",
            f"exact duplicate interactions: {self.duplicate_interactions} found, "
            f"{self.duplicate_interactions_dropped} dropped",
            f"without metadata: {self.interactions_without_metadata} interactions of {self.items_without_metadata} "
            f"items dropped; {self.metadata_items_never_interacted} metadata items never interacted with",
            f"k-core ({self.settings.get('k_core')}): {self.kcore_rounds} rounds removed "
            f"{self.kcore_users_removed} users, {self.kcore_items_removed} items, "
            f"{self.kcore_interactions_removed} interactions",
            f"users with fewer than {MIN_INTERACTIONS_TO_SPLIT} interactions skipped: {self.short_users_skipped} "
            f"({self.short_user_interactions_dropped} interactions, {self.items_only_in_short_users} items only "
            "they had)",
            f"texts: {self.empty_texts} empty (no text fields), {self.long_texts_emptied} emptied for length "
            f">= {self.settings.get('max_text_length')}",
        ]
        if self.images_written is not None:
            lines.append(f"images: {self.images_written} paths written, {self.items_without_image} items without one")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ text
_REMOVED_QUOTES = str.maketrans("", "", '"\u201c\u201d\u201e\u201f')
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Unescape HTML entities, remove double quotes (ASCII and typographic; apostrophes stay, they are part of
    words), turn newlines/tabs/any whitespace run into one space, and end with exactly one period.

    Quotes are removed after unescaping, so `&quot;` goes too; an empty result stays empty (no lone period)."""
    text = html.unescape(text).translate(_REMOVED_QUOTES)
    text = _WHITESPACE.sub(" ", text).strip().rstrip(". ")
    return f"{text}." if text else ""


def field_text(value: object) -> str:
    """One metadata field as plain text: lists (also nested, and list-looking strings such as `["A", "B"]` or
    `[['A', 'B']]` from CSV) are flattened and joined with spaces; missing values give ''."""
    if is_missing(value):
        return ""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            for parse in (json.loads, ast.literal_eval):  # literal_eval evaluates literals only, never code
                try:
                    parsed = parse(stripped)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                if isinstance(parsed, list):
                    return field_text(parsed)
        return stripped
    if isinstance(value, list | tuple | np.ndarray):
        return " ".join(part for part in map(field_text, value) if part)
    return str(value)


def item_text(values: Iterable[object], max_length: int = 2000) -> tuple[str, bool]:
    """The cleaned text of one item from its field values; `(text, emptied_for_length)`.

    A text of `max_length` characters or more becomes '' (such texts are mostly scraped noise, and a
    fixed-length text encoder would only see their start anyway)."""
    text = clean_text(" ".join(part for part in map(field_text, values) if part))
    if len(text) >= max_length:
        return "", True
    return text, False


# --------------------------------------------------------------------------------------------- reading
def detect_format(path: str | os.PathLike, explicit: str | None = None) -> str:
    """`csv`, `tsv`, `parquet` or `jsonl` from `explicit` or the file extension (a trailing `.gz` is ignored)."""
    if explicit:
        if explicit not in FORMATS:
            raise ConversionError(f"{path}: unknown format {explicit!r}; expected one of {', '.join(FORMATS)}")
        return explicit
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in _EXTENSIONS:
        return _EXTENSIONS[suffixes[-1]]
    raise ConversionError(
        f"{path}: cannot tell the format from the extension; expected one of {', '.join(sorted(_EXTENSIONS))} "
        "(optionally .gz), or pass the format explicitly"
    )


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix.lower() == ".gz" else open(path, encoding="utf-8")


def _read_jsonl(path: Path, wanted: Sequence[str]) -> tuple[dict[str, list], np.ndarray, list[str]]:
    """The `wanted` columns (absent keys -> None), the line number of each record and every key seen."""
    columns: dict[str, list] = {name: [] for name in wanted}
    rows: list[int] = []
    seen: dict[str, None] = {}
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConversionError(
                    f"{path}: row {line_number}: expected one JSON object per line ({error})"
                ) from None
            if not isinstance(record, dict):
                raise ConversionError(f"{path}: row {line_number}: expected a JSON object, got {type(record).__name__}")
            for key in record:
                if key not in seen:
                    seen[key] = None
            for name in wanted:
                columns[name].append(record.get(name))
            rows.append(line_number)
    return columns, np.asarray(rows, dtype=np.int64), list(seen)


def read_table(
    path: str | os.PathLike,
    required: dict[str, str],
    optional: dict[str, str] | None = None,
    file_format: str | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Columns of a CSV/TSV, Parquet or JSON Lines file, and each record's row number for messages.

    `required` and `optional` map column names to their role (for messages); a missing required column is an
    error listing the columns found, a missing optional one is left out of the frame. CSV cells are read as
    strings (empty -> ''), so ids such as `0001` keep their leading zeros."""
    path = Path(path)
    optional = optional or {}
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    fmt = detect_format(path, file_format)
    wanted = list(dict.fromkeys([*required, *optional]))
    try:
        if fmt in ("csv", "tsv"):
            sep = "\t" if fmt == "tsv" else ","
            found = list(pd.read_csv(path, sep=sep, nrows=0).columns)
            present = [c for c in wanted if c in found]
            check_columns(path, required, found)
            frame = pd.read_csv(path, sep=sep, usecols=present, dtype=str, keep_default_na=False)
            rows = np.arange(1, len(frame) + 1, dtype=np.int64)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            found = list(pq.read_schema(path).names)
            present = [c for c in wanted if c in found]
            check_columns(path, required, found)
            frame = pd.read_parquet(path, columns=present)
            rows = np.arange(1, len(frame) + 1, dtype=np.int64)
        else:
            columns, rows, found = _read_jsonl(path, wanted)
            check_columns(path, required, found)
            present = [c for c in wanted if c in found]
            frame = pd.DataFrame({c: pd.Series(columns[c], dtype=object) for c in present}, index=range(len(rows)))
    except ConversionError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as error:  # pandas' parser errors are ValueErrors
        raise ConversionError(f"{path}: cannot read as {fmt}: {error}") from error
    except Exception as error:  # pyarrow raises its own ArrowInvalid etc. for a corrupt Parquet file
        raise ConversionError(f"{path}: cannot read as {fmt}: {type(error).__name__}: {error}") from error
    for column, role in optional.items():
        if column not in frame.columns:
            logger.info("%s: no %r column; the %s field is left empty", path, column, role)
    return frame.reset_index(drop=True), rows


# ---------------------------------------------------------------------------------------------- helpers
def _summary(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {
        "min": float(values.min()),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "max": float(values.max()),
    }


def _present(codes: np.ndarray, size: int) -> np.ndarray:
    """`[size]` bool: which of the integer codes 0..size-1 occur. One scatter pass: `np.unique` (which hashes
    integers since numpy 2.3) took 15 of the 48 s of a 5M-row conversion in its ten calls, and more than
    linearly more at 50M rows."""
    seen = np.zeros(size, dtype=bool)
    seen[codes] = True
    return seen


def _count_distinct(codes: np.ndarray, size: int) -> int:
    return int(np.count_nonzero(_present(codes, size)))


def _kcore(user_codes: np.ndarray, item_codes: np.ndarray, k: int, stats: ConversionStats) -> np.ndarray:
    """Mask of the interactions in the k-core: repeatedly drop users and items with fewer than `k`
    interactions (counted over what is left, repeats included) until a round changes nothing."""
    keep = np.ones(len(user_codes), dtype=bool)
    num_users, num_items = int(user_codes.max()) + 1, int(item_codes.max()) + 1
    users_before = _count_distinct(user_codes, num_users)
    items_before = _count_distinct(item_codes, num_items)
    while True:
        user_counts = np.bincount(user_codes[keep], minlength=num_users)
        item_counts = np.bincount(item_codes[keep], minlength=num_items)
        still = keep & (user_counts[user_codes] >= k) & (item_counts[item_codes] >= k)
        if still.sum() == keep.sum():
            break
        stats.kcore_rounds += 1
        keep = still
        if not keep.any():
            break
    stats.kcore_users_removed = users_before - _count_distinct(user_codes[keep], num_users)
    stats.kcore_items_removed = items_before - _count_distinct(item_codes[keep], num_items)
    stats.kcore_interactions_removed = int(len(keep) - keep.sum())
    return keep


def convert_interactions(
    interactions_path: str | os.PathLike,
    metadata_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset_name: str,
    *,
    k_core: int = 5,
    max_seq_length: int = 50,
    columns: ColumnNames | None = None,
    interactions_format: str | None = None,
    metadata_format: str | None = None,
    text_fields: Sequence[str] = ("title", "categories", "brand"),
    max_text_length: int = 2000,
    on_duplicate_metadata: str = "error",
    drop_duplicate_interactions: bool = False,
    log_reader: str = "arrow",
) -> ConversionStats:
    """Convert an interaction log and item metadata into atomic files `output_dir/dataset_name.*`.

    `text_fields` picks (and orders) the metadata fields joined into an item's text, from
    `title`, `categories`, `brand`, `description`. `on_duplicate_metadata` is `"error"` (a second metadata row
    for an item is an error naming both rows) or `"first"` (keep the first row, count the others).
    `log_reader` is `"arrow"` (CSV/TSV/Parquet read column by column, see `columnar_log`; JSON Lines always
    goes through pandas) or `"pandas"` (one Python string per cell: the reference, same output, slower).
    Returns the statistics, which are also written to `dataset_name.stats.json`.

    The phases, each a function below: read the metadata (one row per item), read the log and keep the
    interactions of items with metadata, the k-core, drop users too short to split, order the log, build the
    rows, the surviving items' texts and images, write."""
    columns = columns or ColumnNames()
    interactions_path, metadata_path, output_dir = Path(interactions_path), Path(metadata_path), Path(output_dir)
    _check_settings(k_core, max_seq_length, dataset_name, on_duplicate_metadata, text_fields)
    if log_reader not in LOG_READERS:
        raise ConversionError(f"log_reader must be one of {list(LOG_READERS)}, got {log_reader!r}")
    stats = ConversionStats(dataset_name=dataset_name)
    stats.settings = {
        "interactions_path": str(interactions_path),
        "metadata_path": str(metadata_path),
        "k_core": k_core,
        "max_seq_length": max_seq_length,
        "text_fields": list(text_fields),
        "max_text_length": max_text_length,
        "on_duplicate_metadata": on_duplicate_metadata,
        "drop_duplicate_interactions": drop_duplicate_interactions,
        "columns": asdict(columns),
    }
    metadata, meta_ids, field_columns = _read_metadata(
        metadata_path, columns, text_fields, metadata_format, on_duplicate_metadata, stats
    )
    log = _read_log(interactions_path, columns, interactions_format, log_reader, drop_duplicate_interactions, stats)
    meta_position = pd.Index(meta_ids)
    keep = _keep_items_with_metadata(log, meta_position, interactions_path, metadata_path, columns, stats)
    index = _kcore_and_splittable(log, np.nonzero(keep)[0], k_core, interactions_path, stats)
    index, user_order, item_order, user_raw, item_raw = _ordered(log, index)
    train, valid, test = _rows_and_lengths(index, user_order, item_order, item_raw, log, max_seq_length,
                                           interactions_path, stats)  # fmt: skip
    kept_meta = metadata.iloc[meta_position.get_indexer(item_raw)].reset_index(drop=True)
    texts, images = _texts_and_images(kept_meta, field_columns, text_fields, columns, max_text_length, stats)
    _write(output_dir, dataset_name, train, valid, test, user_raw, item_raw, texts, images, stats)
    return stats


def _check_settings(k_core, max_seq_length, dataset_name, on_duplicate_metadata, text_fields) -> None:
    if k_core < 1:
        raise ConversionError(f"k_core must be at least 1, got {k_core}")
    if max_seq_length < 1:
        raise ConversionError(f"max_seq_length must be at least 1, got {max_seq_length}")
    if not dataset_name or any(c in dataset_name for c in "/\\\t\n") or dataset_name.startswith("."):
        raise ConversionError(f"dataset_name {dataset_name!r}: expected a plain file-name prefix such as 'Scientific'")
    if on_duplicate_metadata not in ("error", "first"):
        raise ConversionError(f"on_duplicate_metadata must be 'error' or 'first', got {on_duplicate_metadata!r}")
    unknown = [f for f in text_fields if f not in TEXT_FIELDS]
    if unknown or not text_fields:
        raise ConversionError(f"text_fields {list(text_fields)}: expected a non-empty subset of {list(TEXT_FIELDS)}")


def _read_metadata(metadata_path, columns, text_fields, metadata_format, on_duplicate_metadata, stats):
    """The metadata table with one row per item, its normalised item ids and the columns of the text fields."""
    meta_required = {columns.metadata_item_column: "metadata_item", columns.title: "title"}
    meta_optional: dict[str, str] = {}
    field_columns: dict[str, str] = {"title": columns.title}
    for name in ("categories", "brand", "description"):
        column = getattr(columns, name)
        if column is None or name not in text_fields:
            continue
        field_columns[name] = column
        (meta_optional if columns.is_default(name) else meta_required)[column] = name
    if columns.image is not None:
        meta_required[columns.image] = "image"
    metadata, meta_rows = read_table(metadata_path, meta_required, meta_optional, metadata_format)
    stats.metadata_rows_read = len(metadata)
    meta_ids = normalise_ids(
        metadata[columns.metadata_item_column], metadata_path, columns.metadata_item_column, meta_rows
    )
    duplicated = pd.Series(meta_ids).duplicated(keep="first").to_numpy()
    if duplicated.any():
        if on_duplicate_metadata == "error":
            second = int(np.argmax(duplicated))
            first = int(np.argmax(meta_ids == meta_ids[second]))
            raise ConversionError(
                f"{metadata_path}: item {meta_ids[second]!r} has two metadata rows (rows {meta_rows[first]} and "
                f"{meta_rows[second]}; {int(duplicated.sum())} duplicate rows in all); expected one row per item, "
                "or pass --on_duplicate_metadata first to keep the first"
            )
        stats.duplicate_metadata_rows_skipped = int(duplicated.sum())
        logger.warning(
            "%s: %d duplicate metadata rows skipped (first row of each item kept)",
            metadata_path,
            stats.duplicate_metadata_rows_skipped,
        )
        metadata, meta_ids = metadata[~duplicated].reset_index(drop=True), meta_ids[~duplicated]
    if len(metadata) == 0:
        raise ConversionError(f"{metadata_path}: no metadata rows")
    return metadata, meta_ids, field_columns


@dataclass
class _Log(LogColumns):
    """The interaction log as codes (see `LogColumns`) and which rows are still kept."""

    keep: np.ndarray


def _read_log(interactions_path, columns, interactions_format, log_reader, drop_duplicate_interactions, stats):
    fmt = detect_format(interactions_path, interactions_format)
    if log_reader == "arrow" and fmt != "jsonl":
        read = read_log(interactions_path, columns.user, columns.item, columns.time, fmt)
    else:
        read = _read_log_with_pandas(interactions_path, columns, interactions_format)
    stats.interactions_read = len(read.user_codes)
    keep = np.ones(len(read.user_codes), dtype=bool)
    triples = pd.DataFrame({"u": read.user_codes, "i": read.item_codes, "t": read.times})
    repeats = triples.duplicated(keep="first").to_numpy()
    stats.duplicate_interactions = int(repeats.sum())
    if drop_duplicate_interactions and repeats.any():
        keep &= ~repeats
        stats.duplicate_interactions_dropped = stats.duplicate_interactions
        logger.info("dropped %d exact duplicate interactions", stats.duplicate_interactions)
    return _Log(**vars(read), keep=keep)


def _read_log_with_pandas(interactions_path, columns, interactions_format) -> LogColumns:
    """The reference reader (and the one for JSON Lines): one Python string per cell."""
    log, rows = read_table(
        interactions_path,
        {columns.user: "user", columns.item: "item", columns.time: "time"},
        file_format=interactions_format,
    )
    if len(log) == 0:
        raise ConversionError(f"{interactions_path}: no interaction rows")
    users = normalise_ids(log[columns.user], interactions_path, columns.user, rows)
    items = normalise_ids(log[columns.item], interactions_path, columns.item, rows)
    times = parse_timestamps(log[columns.time], interactions_path, columns.time, rows)
    del log
    user_codes, user_names = pd.factorize(users)  # codes in order of first appearance in the file
    item_codes, item_names = pd.factorize(items)
    return LogColumns(user_codes, user_names, item_codes, item_names, times)


def _keep_items_with_metadata(log: _Log, meta_position, interactions_path, metadata_path, columns, stats):
    keep, item_codes = log.keep, log.item_codes
    has_metadata = meta_position.get_indexer(log.item_names) >= 0  # per distinct item
    without = keep & ~has_metadata[item_codes]
    stats.interactions_without_metadata = int(without.sum())
    stats.items_without_metadata = _count_distinct(item_codes[without], len(has_metadata))
    before = f"{int(keep.sum())} interactions of {_count_distinct(item_codes[keep], len(has_metadata))} items"
    keep = keep & has_metadata[item_codes]
    if stats.interactions_without_metadata:
        logger.warning(
            "%s: dropped %d interactions of %d items that have no row in %s",
            interactions_path,
            stats.interactions_without_metadata,
            stats.items_without_metadata,
            metadata_path,
        )
    if not keep.any():
        raise ConversionError(
            f"{interactions_path}: no interaction is left after keeping items with metadata (before: {before}; "
            f"{len(meta_position)} items in {metadata_path}); do the item ids of the two files match "
            f"(columns {columns.item!r} and {columns.metadata_item_column!r})?"
        )
    interacted = _present(item_codes[keep], len(has_metadata))
    stats.metadata_items_never_interacted = int(len(meta_position) - np.count_nonzero(has_metadata & interacted))
    return keep


def _kcore_and_splittable(log: _Log, index: np.ndarray, k_core: int, interactions_path, stats) -> np.ndarray:
    """Rows (positions in the log) left after the k-core and after users too short to split."""
    user_codes, item_codes = log.user_codes, log.item_codes
    sub_users, sub_items = user_codes[index], item_codes[index]
    num_users, num_items = len(log.user_names), len(log.item_names)
    before = (
        f"{len(index)} interactions, {_count_distinct(sub_users, num_users)} users, "
        f"{_count_distinct(sub_items, num_items)} items"
    )
    core = _kcore(sub_users, sub_items, k_core, stats)
    index = index[core]
    logger.info(
        "k-core (k=%d): %d rounds removed %d users, %d items, %d interactions",
        k_core,
        stats.kcore_rounds,
        stats.kcore_users_removed,
        stats.kcore_items_removed,
        stats.kcore_interactions_removed,
    )
    if len(index) == 0:
        raise ConversionError(
            f"{interactions_path}: k-core filtering with k={k_core} removed every interaction (before it: {before}); "
            "use a smaller --k_core or more data"
        )
    # Users that cannot be split (only possible with k < 3).
    counts = np.bincount(user_codes[index], minlength=len(log.user_names))
    short = counts[user_codes[index]] < MIN_INTERACTIONS_TO_SPLIT
    if short.any():
        stats.short_users_skipped = int(((counts > 0) & (counts < MIN_INTERACTIONS_TO_SPLIT)).sum())
        stats.short_user_interactions_dropped = int(short.sum())
        remaining_items = _present(item_codes[index[~short]], num_items)
        short_items = _present(item_codes[index[short]], num_items)
        stats.items_only_in_short_users = int(np.count_nonzero(short_items & ~remaining_items))
        logger.warning(
            "skipped %d users with fewer than %d interactions (%d interactions); they cannot be split into "
            "train/valid/test",
            stats.short_users_skipped,
            MIN_INTERACTIONS_TO_SPLIT,
            stats.short_user_interactions_dropped,
        )
        before = f"{len(index)} interactions of {int((counts > 0).sum())} users"
        index = index[~short]
        if len(index) == 0:
            raise ConversionError(
                f"{interactions_path}: every user left after k-core filtering (k={k_core}; {before}) has fewer than "
                f"{MIN_INTERACTIONS_TO_SPLIT} interactions, so none can be split into train/valid/test"
            )
    return index


def _ordered(log: _Log, index: np.ndarray):
    """Users by first appearance in the filtered log, then time, then file position (stable); new user and
    item numbers (first appearance in that order) and their raw ids."""
    user_order, kept_user_codes = pd.factorize(log.user_codes[index])
    order = np.lexsort((index, log.times[index], user_order))
    index = index[order]
    user_order = user_order[order]
    item_order, kept_item_codes = pd.factorize(log.item_codes[index])  # first appearance in the sorted scan
    return index, user_order, item_order, log.user_names[kept_user_codes], log.item_names[kept_item_codes]


def _rows_and_lengths(index, user_order, item_order, item_raw, log: _Log, max_seq_length, interactions_path, stats):
    """The train, valid and test files' lines (leave-one-out per user), as iterables of text blocks written one
    block at a time, and the size statistics, computed from the sequence lengths alone."""
    boundaries = np.flatnonzero(np.diff(user_order)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(index)]])
    sequence_lengths = ends - starts
    train_counts = sequence_lengths - MIN_INTERACTIONS_TO_SPLIT  # positions 1..n-3
    if train_counts.sum() == 0:
        raise ConversionError(
            f"{interactions_path}: no train rows: each of the {len(starts)} users left after filtering has exactly "
            f"{MIN_INTERACTIONS_TO_SPLIT} interactions (one history item, the valid and the test target), and a "
            "train split needs a user with at least 4"
        )
    # Train row j of a user is position t = j + 1; its history holds min(t, max_seq_length) items.
    positions = np.arange(int(train_counts.sum())) - np.repeat(np.cumsum(train_counts) - train_counts, train_counts) + 1
    stats.users, stats.items, stats.interactions = len(starts), len(item_raw), len(index)
    stats.train_rows, stats.valid_rows, stats.test_rows = int(train_counts.sum()), len(starts), len(starts)
    # Over distinct (user, item) pairs: repeated purchases are kept as interactions, and counting them would
    # make a small, repetitive log "denser than full" (a negative sparsity).
    user_codes, item_codes = log.user_codes, log.item_codes
    pair_keys = np.sort(user_codes[index].astype(np.int64) * (int(item_codes.max()) + 1) + item_codes[index])
    pairs = int(len(pair_keys) and 1 + np.count_nonzero(np.diff(pair_keys)))  # sorting: 20x np.unique's hashing
    stats.sparsity = 1.0 - pairs / (stats.users * stats.items)
    stats.sequence_length = _summary(sequence_lengths)
    stats.history_length = {
        "train": _summary(np.minimum(positions, max_seq_length)),
        "valid": _summary(np.minimum(sequence_lengths - 2, max_seq_length)),
        "test": _summary(np.minimum(sequence_lengths - 1, max_seq_length)),
    }
    # One string object per item number, shared by every line that names the item.
    tokens = np.array([str(i) for i in range(len(item_raw))], dtype=object)[item_order]
    lines = _SplitLines(tokens, starts.tolist(), ends.tolist(), max_seq_length)
    return lines.blocks("train"), lines.blocks("valid"), lines.blocks("test")


@dataclass
class _SplitLines:
    """The leave-one-out lines of every user, whose item numbers (as strings, time order) are
    `tokens[start:end]`: position t's history is the `max_seq_length` items before t; t = n-1 is the test row,
    n-2 the valid row, 1..n-3 the train rows."""

    tokens: np.ndarray
    starts: list[int]
    ends: list[int]
    max_seq_length: int

    def blocks(self, split: str):
        """The lines of `split` as text blocks of `USERS_PER_WRITE` users each (written one at a time)."""
        users = len(self.starts)
        for first in range(0, users, USERS_PER_WRITE):
            block = range(first, min(first + USERS_PER_WRITE, users))
            yield "".join(line for user in block for line in self.user_lines(user, split))

    def user_lines(self, user: int, split: str) -> list[str]:
        sequence = self.tokens[self.starts[user] : self.ends[user]].tolist()
        n, length, name = len(sequence), self.max_seq_length, str(user)
        positions = {"train": range(1, n - 2), "valid": (n - 2,), "test": (n - 1,)}[split]
        return [f"{name}\t{' '.join(sequence[max(0, t - length) : t])}\t{sequence[t]}\n" for t in positions]


def _texts_and_images(kept_meta, field_columns, text_fields, columns, max_text_length, stats):
    """Each surviving item's text (its fields joined) and image path (None without an image column)."""
    text_columns = [field_columns[f] for f in text_fields if f in field_columns and field_columns[f] in kept_meta]
    texts: list[str] = []
    for values in zip(*(kept_meta[c].tolist() for c in text_columns)):
        text, emptied = item_text(values, max_text_length)
        stats.long_texts_emptied += emptied
        stats.empty_texts += (not text) and not emptied
        texts.append(text)
    if stats.long_texts_emptied:
        logger.warning("%d item texts of %d or more characters were emptied", stats.long_texts_emptied, max_text_length)
    images: list[str] | None = None
    if columns.image is not None:
        images = [_image_path(v) for v in kept_meta[columns.image].tolist()]
        stats.images_written = sum(bool(p) for p in images)
        stats.items_without_image = len(images) - stats.images_written
    return texts, images


def _write(output_dir, dataset_name, train, valid, test, user_raw, item_raw, texts, images, stats) -> None:
    """Every atomic file, each written whole (temporary file + rename), the statistics last."""
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix = output_dir / dataset_name
    header = "\t".join(INTER_HEADER) + "\n"
    outputs: dict[str, Iterable[str]] = {
        "train.inter": itertools.chain([header], train),
        "valid.inter": itertools.chain([header], valid),
        "test.inter": itertools.chain([header], test),
        "user2index": (f"{raw}\t{i}\n" for i, raw in enumerate(user_raw)),
        "item2index": (f"{raw}\t{i}\n" for i, raw in enumerate(item_raw)),
        "text": ["\t".join(TEXT_HEADER) + "\n", *(f"{raw}\t{t}\n" for raw, t in zip(item_raw, texts))],
    }
    if images is not None:
        outputs["images"] = [
            "\t".join(IMAGE_HEADER) + "\n",
            *(f"{raw}\t{p}\n" for raw, p in zip(item_raw, images) if p),
        ]
    elif Path(f"{prefix}.images").exists():
        logger.warning("%s.images is from an earlier run (no image column given this time)", prefix)
    for suffix, chunks in outputs.items():
        write_atomically(Path(f"{prefix}.{suffix}"), chunks)
    stats.files = [f"{dataset_name}.{suffix}" for suffix in outputs] + [f"{dataset_name}.stats.json"]
    write_atomically(Path(f"{prefix}.stats.json"), [json.dumps(stats.to_dict(), indent=2), "\n"])
    logger.info(
        "wrote %s.* (%d users, %d items, %d interactions)", prefix, stats.users, stats.items, stats.interactions
    )


def _image_path(value: object) -> str:
    """An image path cell as text; a list (e.g. Amazon's `imageURLHighRes`) gives its first entry."""
    if isinstance(value, list | tuple | np.ndarray):
        value = next((v for v in value if not is_missing(v) and str(v).strip()), None)
    if is_missing(value):
        return ""
    text = str(value).strip()
    if any(c in text for c in "\t\n\r"):
        raise ConversionError(f"image path {text!r} contains a tab or newline, which the .images file cannot hold")
    return text


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags, one `add_argument` each with its help text (long because the flags are many, not
    because it decides anything)."""
    parser = argparse.ArgumentParser(
        prog="python -m modeling_missrec.convert",
        description=(
            "Convert a raw interaction log and item metadata into MISSRec atomic files: keep items with metadata, "
            "iterative k-core filtering, stable per-user time sort, leave-one-out train/valid/test rows, cleaned "
            "item texts, optional image paths, and a statistics summary (printed and saved as X.stats.json)."
        ),
    )
    parser.add_argument("interactions", help="interaction log: .csv, .tsv, .parquet or .jsonl (optionally .gz)")
    parser.add_argument("metadata", help="item metadata: .csv, .tsv, .parquet or .jsonl (optionally .gz)")
    parser.add_argument("--output_dir", required=True, help="folder for the atomic files (created if missing)")
    parser.add_argument("--dataset_name", required=True, help="file prefix X of X.train.inter etc.")
    parser.add_argument("--k_core", type=int, default=5, help="minimum interactions per user and item (default 5)")
    parser.add_argument(
        "--max_seq_length", type=int, default=50, help="keep the most recent N items of each history (default 50)"
    )
    parser.add_argument("--interactions_format", choices=FORMATS, help="format of the log (default: from extension)")
    parser.add_argument("--metadata_format", choices=FORMATS, help="format of the metadata (default: from extension)")
    parser.add_argument("--user_column", default="user_id", help="user id column of the log (default user_id)")
    parser.add_argument("--item_column", default="item_id", help="item id column of the log (default item_id)")
    parser.add_argument(
        "--time_column",
        default="timestamp",
        help="timestamp column of the log: unix seconds or ISO-8601 (default timestamp)",
    )
    parser.add_argument(
        "--metadata_item_column", default=None, help="item id column of the metadata (default: same as --item_column)"
    )
    parser.add_argument("--title_column", default="title", help="title column of the metadata (default title)")
    parser.add_argument(
        "--categories_column",
        default="categories",
        help="categories column, a list or a string (default categories; used if present)",
    )
    parser.add_argument("--brand_column", default="brand", help="brand column (default brand; used if present)")
    parser.add_argument(
        "--description_column",
        default="description",
        help="description column (default description; used if present and in --text_fields)",
    )
    parser.add_argument(
        "--image_column", default=None, help="image path column; when given, X.images lists each item's image path"
    )
    parser.add_argument(
        "--text_fields",
        nargs="+",
        choices=TEXT_FIELDS,
        default=["title", "categories", "brand"],
        help="metadata fields joined, in this order, into the item text (default title categories brand)",
    )
    parser.add_argument(
        "--max_text_length",
        type=int,
        default=2000,
        help="an item text of this many characters or more becomes empty (default 2000)",
    )
    parser.add_argument(
        "--on_duplicate_metadata",
        choices=("error", "first"),
        default="error",
        help="a second metadata row for an item: error (default) or keep the first and count the rest",
    )
    parser.add_argument(
        "--drop_duplicate_interactions",
        action="store_true",
        help="drop exact repeats of (user, item, timestamp); by default they are kept as real repeat interactions",
    )
    parser.add_argument(
        "--log_reader",
        choices=LOG_READERS,
        default="arrow",
        help="arrow (default): CSV/TSV/Parquet logs read column by column, for logs of tens of millions of rows; "
        "pandas: the reference reader, one Python string per cell (same files, slower). JSON Lines always uses "
        "pandas",
    )
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> ConversionStats:
    """CLI entry point; prints the statistics summary. A `ConversionError` exits with status 2 and its message."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    columns = ColumnNames(
        user=args.user_column,
        item=args.item_column,
        time=args.time_column,
        metadata_item=args.metadata_item_column,
        title=args.title_column,
        categories=args.categories_column,
        brand=args.brand_column,
        description=args.description_column,
        image=args.image_column,
    )
    try:
        stats = convert_interactions(
            args.interactions,
            args.metadata,
            args.output_dir,
            args.dataset_name,
            k_core=args.k_core,
            max_seq_length=args.max_seq_length,
            columns=columns,
            interactions_format=args.interactions_format,
            metadata_format=args.metadata_format,
            text_fields=args.text_fields,
            max_text_length=args.max_text_length,
            on_duplicate_metadata=args.on_duplicate_metadata,
            drop_duplicate_interactions=args.drop_duplicate_interactions,
            log_reader=args.log_reader,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(stats.summary())
    print(f"wrote {', '.join(stats.files)} to {args.output_dir}")
    return stats


if __name__ == "__main__":
    main()
