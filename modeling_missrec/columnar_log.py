"""An interaction log read column by column with pyarrow: ids become integer codes and timestamps seconds
without a Python object per cell, so that an Amazon-dump-sized log (tens of millions of rows) converts in
minutes and within a few GiB.

`read_log` gives what `convert` works on: per row a user code and an item code (numbered in order of first
appearance in the file) with the raw ids behind the codes, and the timestamp in seconds. It applies the same
rules as the pandas reader of `convert` (`read_table` + `normalise_ids` + `parse_timestamps`), which stays as
the reference and for JSON Lines: ids are stripped strings, integer-valued numbers without a decimal point;
an empty id, one with a tab or newline, or an unparsable timestamp is an error naming the first such row.
Only the distinct ids are ever Python objects.
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .raw_values import ConversionError, check_columns, id_string, parse_timestamps

_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"  # what a unix-seconds cell looks like


@dataclass
class LogColumns:
    """The log as codes: `user_codes[r]` indexes `user_names` (first appearance order), likewise items;
    `times[r]` in seconds since the epoch."""

    user_codes: np.ndarray
    user_names: pd.Index
    item_codes: np.ndarray
    item_names: pd.Index
    times: np.ndarray


def read_log(path: str | os.PathLike, user: str, item: str, time: str, file_format: str) -> LogColumns:
    """The user, item and time columns of a CSV/TSV (optionally .gz) or Parquet log (see the module doc)."""
    path = Path(path)
    table = _read_table(path, {user: "user", item: "item", time: "time"}, file_format)
    if table.num_rows == 0:
        raise ConversionError(f"{path}: no interaction rows")
    user_codes, user_names = encode_ids(table.column(user), path, user)
    item_codes, item_names = encode_ids(table.column(item), path, item)
    times = seconds(table.column(time), path, time)
    return LogColumns(user_codes, user_names, item_codes, item_names, times)


def _read_table(path: Path, required: dict[str, str], file_format: str) -> pa.Table:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        if file_format == "parquet":
            check_columns(path, required, pq.read_schema(path).names)
            return pq.read_table(path, columns=list(required))
        delimiter = "\t" if file_format == "tsv" else ","
        check_columns(path, required, _csv_header(path, delimiter))
        # Every cell as text, an empty one as "" (not null), as the pandas reader does (dtype=str, no NA values).
        options = pa_csv.ConvertOptions(
            include_columns=list(required),
            column_types={name: pa.string() for name in required},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter), convert_options=options)
    except ConversionError:
        raise
    except Exception as error:  # pyarrow's ArrowInvalid etc. for a malformed file
        raise ConversionError(f"{path}: cannot read as {file_format}: {type(error).__name__}: {error}") from error


def _csv_header(path: Path, delimiter: str) -> list[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open  # pyarrow detects .gz by the name too
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader(handle, delimiter=delimiter), [])


def encode_ids(column: pa.ChunkedArray, path: Path, name: str) -> tuple[np.ndarray, pd.Index]:
    """Codes per row (first appearance) and the normalised ids behind them. Raw values that normalise to the
    same id (` a` and `a`, `12` and `12.0`) share a code; a bad id is an error naming its first row."""
    if pa.types.is_dictionary(column.type):  # a pandas categorical written to Parquet
        column = column.cast(column.type.value_type)
    if pa.types.is_nested(column.type):
        first = next(i for i, value in enumerate(column.to_pylist()) if value is not None)
        raise ConversionError(
            f"{path}: row {first + 1}: column {name!r} holds a list ({str(column[first].as_py())[:60]}), not one "
            "id; one interaction per row is expected (explode list-valued columns first)"
        )
    if column.null_count:
        _bad_id(
            path, name, pc.is_null(column).to_numpy(zero_copy_only=False), "empty or missing id", "every row needs one"
        )
    distinct = pc.unique(column)  # in order of first appearance
    raw_codes = pc.index_in(column, value_set=distinct).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_string(distinct.type) or pa.types.is_large_string(distinct.type):
        names = pc.utf8_trim_whitespace(distinct).to_numpy(zero_copy_only=False)
    else:
        names = np.array([id_string(value) for value in distinct.to_pylist()], dtype=object)
    empty = names == ""
    if empty.any():
        _bad_id(path, name, np.isin(raw_codes, np.flatnonzero(empty)), "empty or missing id", "every row needs one")
    breaks = np.fromiter(("\t" in s or "\n" in s or "\r" in s for s in names), dtype=bool, count=len(names))
    if breaks.any():
        row = int(np.argmax(np.isin(raw_codes, np.flatnonzero(breaks))))
        raise ConversionError(
            f"{path}: row {row + 1}: id {names[raw_codes[row]]!r} in column {name!r} contains a tab or newline, "
            "which the tab-separated output cannot hold"
        )
    merged, unique_names = pd.factorize(names)  # first appearance of a merged id = its first raw variant's
    return merged[raw_codes].astype(np.int64), pd.Index(unique_names)


def _bad_id(path: Path, name: str, mask: np.ndarray, problem: str, expectation: str) -> None:
    first = int(np.argmax(mask))
    raise ConversionError(
        f"{path}: row {first + 1}: {problem} in column {name!r} ({int(mask.sum())} such rows); {expectation}"
    )


def seconds(column: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    """Seconds since the epoch (float64). Numbers and numeric text are parsed by pyarrow; anything else (ISO
    strings, dates, a bad cell) goes through the pandas reader's `parse_timestamps`, which names a bad row."""
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        if column.null_count == 0:
            values = column.to_numpy().astype(np.float64)
            if np.isfinite(values).all():
                return values
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.utf8_trim_whitespace(column)
        if pc.all(pc.match_substring_regex(text, _NUMBER)).as_py():
            values = pc.cast(text, pa.float64()).to_numpy()
            if np.isfinite(values).all():
                return values
    rows = np.arange(1, len(column) + 1, dtype=np.int64)
    # Text as Python strings (what the pandas reader sees); other types as pandas converts them.
    text_type = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    values = pd.Series(column.to_numpy(zero_copy_only=False), dtype=object) if text_type else column.to_pandas()
    return parse_timestamps(values, path, name, rows)
