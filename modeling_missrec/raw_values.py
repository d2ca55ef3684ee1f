"""What the cells of a raw interaction log mean: ids, timestamps, and the error that names a bad one.

Shared by `convert`'s pandas reader (`read_table`, also for JSON Lines and the metadata) and the columnar reader
of `columnar_log`, so that both apply one set of rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, the row where there is one, and what was
    expected."""


def is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return value is pd.NA or value is pd.NaT


def missing_column(path: Path, column: str, role: str, found: Sequence[str]) -> ConversionError:
    shown = list(found)[:50]
    more = f" (and {len(found) - 50} more)" if len(found) > 50 else ""
    return ConversionError(
        f"{path}: missing column {column!r} (the {role} column); columns found: {shown}{more}. "
        f"Name the right column with --{role}_column."
    )


def check_columns(path: Path, required: dict[str, str], found: Sequence[str]) -> None:
    for column, role in required.items():
        if column not in found:
            raise missing_column(path, column, role, found)


def id_string(value: object) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool | np.bool_):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        # Parquet/pandas turn an integer column with gaps into floats; 12.0 is the id "12"
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value).strip()


def normalise_ids(values: pd.Series, path: Path, column: str, rows: np.ndarray) -> np.ndarray:
    """Ids as stripped strings (integers without a decimal point); an empty or missing id, or one with a tab or
    newline (which would break the TSV output), is an error naming the first such row."""
    if pd.api.types.is_integer_dtype(values.dtype) and not values.isna().any():
        strings = values.astype(np.int64).astype(str).to_numpy(dtype=object)
    else:
        nested = values.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray)).to_numpy(dtype=bool)
        if nested.any():
            first = int(np.argmax(nested))
            raise ConversionError(
                f"{path}: row {rows[first]}: column {column!r} holds a {type(values.iloc[first]).__name__} "
                f"({str(values.iloc[first])[:60]}), not one id; one interaction per row is expected (explode "
                "list-valued columns first)"
            )
        strings = values.map(id_string).to_numpy(dtype=object)
    empty = strings == ""
    if empty.any():
        first = int(np.argmax(empty))
        raise ConversionError(
            f"{path}: row {rows[first]}: empty or missing id in column {column!r} ({int(empty.sum())} such rows); "
            "every row needs one"
        )
    bad = np.fromiter(("\t" in s or "\n" in s or "\r" in s for s in strings), dtype=bool, count=len(strings))
    if bad.any():
        first = int(np.argmax(bad))
        raise ConversionError(
            f"{path}: row {rows[first]}: id {strings[first]!r} in column {column!r} contains a tab or newline, "
            "which the tab-separated output cannot hold"
        )
    return strings


def parse_timestamps(values: pd.Series, path: Path, column: str, rows: np.ndarray) -> np.ndarray:
    """Seconds since the epoch (float64) from integers/floats (unix seconds) or ISO-8601 strings (naive ones
    are read as UTC). Anything else, including an empty cell, is an error naming the first bad row."""
    if pd.api.types.is_bool_dtype(values.dtype):
        raise ConversionError(f"{path}: column {column!r} holds booleans; expected unix seconds or ISO-8601 strings")
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = pd.to_datetime(values, utc=True)
        seconds = ((parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
    elif pd.api.types.is_numeric_dtype(values.dtype):
        seconds = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        objects = values.astype(object)
        objects = objects.where(~objects.map(lambda v: isinstance(v, bool)), None)  # True is not a time
        seconds = np.array(pd.to_numeric(objects, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
        todo = np.isnan(seconds) & objects.map(lambda v: isinstance(v, str) and v.strip() != "").to_numpy(bool)
        if todo.any():
            texts = objects[todo].map(str.strip)
            parsed = pd.to_datetime(texts, format="ISO8601", utc=True, errors="coerce")
            seconds[todo] = ((parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(
                dtype=np.float64, na_value=np.nan
            )
    bad = ~np.isfinite(seconds)
    if bad.any():
        first = int(np.argmax(bad))
        raise ConversionError(
            f"{path}: row {rows[first]}: cannot parse timestamp {values.iloc[first]!r} in column {column!r} "
            f"({int(bad.sum())} such rows); expected unix seconds (integer or float) or an ISO-8601 string"
        )
    return seconds
