"""Tests for modeling_missrec.convert: a hand-computed conversion (metadata filter, iterative k-core, stable
sort, indexing, leave-one-out rows, texts), truncation, text cleaning, the three input formats, loading the
output with modeling_missrec.data, every bad-input error, the CLI, and a hypothesis property against a naive
reference of the filtering."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_missrec.convert import (
    ColumnNames,
    ConversionError,
    clean_text,
    convert_interactions,
    field_text,
    item_text,
    main,
)
from modeling_missrec.data import (
    load_atomic_dataset,
    load_item_catalog,
    read_index_file,
    read_inter_file,
    read_text_file,
)

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A log designed so that k-core (k=3) needs three removing rounds after the metadata filter drops item Z:
#   counts after dropping Z: A 4, B 3, C 3, D 3, E 2, F 3, G 3; users u1 6, u2 6, u3 6, u4 3 (D, E, A)
#   round 1 removes item E (2)       -> u2 has 5, u4 has 2
#   round 2 removes user u4 (2)      -> A has 3, D has 2
#   round 3 removes item D (2)       -> u1 and u3 have 5
#   round 4 changes nothing: u1, u2, u3 with A B C F G each.
# u2's B and A share timestamp 5 and B comes first in the file, so a stable sort gives B before A.
LOG_ROWS = [
    ("u4", "Z", 5),
    ("u3", "C", 30),
    ("u1", "A", 10),
    ("u4", "D", 1),
    ("u3", "A", 10),
    ("u2", "G", 50),
    ("u1", "B", 20),
    ("u3", "B", 20),
    ("u2", "B", 5),
    ("u1", "D", 25),
    ("u4", "E", 2),
    ("u2", "A", 5),
    ("u3", "D", 35),
    ("u1", "C", 30),
    ("u2", "C", 40),
    ("u3", "F", 40),
    ("u4", "A", 3),
    ("u1", "F", 40),
    ("u2", "E", 45),
    ("u3", "G", 50),
    ("u1", "G", 50),
    ("u2", "F", 30),
]
LONG_TITLE = "x" * 2000
META_ROWS = [
    # item, title, categories, brand
    ("A", "Alpha &amp; Omega", None, None),
    ("B", 'The "Best" Pen', None, "Acme"),
    ("C", "Line one\nLine two\t end...", None, None),
    ("D", "Delta", None, None),
    ("E", "Echo", None, None),
    ("F", "Foo.", ["Cat1", "Cat2"], "Acme"),
    ("G", LONG_TITLE, None, None),
]

# Hand-computed expected output. Users in first appearance after filtering: u3 (row 2), u1 (row 3), u2 (row 6).
# Items in first appearance scanning u3, u1, u2 in time order: A 0, B 1, C 2, F 3, G 4.
# Sequences: u3 -> 0 1 2 3 4, u1 -> 0 1 2 3 4, u2 -> B A F C G = 1 0 3 2 4.
EXPECTED = {
    "train.inter": HEADER + "0\t0\t1\n0\t0 1\t2\n1\t0\t1\n1\t0 1\t2\n2\t1\t0\n2\t1 0\t3\n",
    "valid.inter": HEADER + "0\t0 1 2\t3\n1\t0 1 2\t3\n2\t1 0 3\t2\n",
    "test.inter": HEADER + "0\t0 1 2 3\t4\n1\t0 1 2 3\t4\n2\t1 0 3 2\t4\n",
    "user2index": "u3\t0\nu1\t1\nu2\t2\n",
    "item2index": "A\t0\nB\t1\nC\t2\nF\t3\nG\t4\n",
    "text": "item_id:token\ttext:token_seq\n"
    "A\tAlpha & Omega.\n"
    "B\tThe Best Pen Acme.\n"
    "C\tLine one Line two end.\n"
    "F\tFoo. Cat1 Cat2 Acme.\n"
    "G\t\n",
}


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def log_frame(rows=LOG_ROWS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def meta_frame(rows=META_ROWS) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["item_id", "title", "categories", "brand"])


def write_csv_inputs(folder: Path, log: pd.DataFrame | None = None, meta: pd.DataFrame | None = None):
    """The log and metadata as CSV; list categories are written as JSON strings, as a CSV export would."""
    folder.mkdir(parents=True, exist_ok=True)
    log = log_frame() if log is None else log
    meta = meta_frame() if meta is None else meta.copy()
    if "categories" in meta:
        meta["categories"] = meta["categories"].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    log.to_csv(folder / "log.csv", index=False)
    meta.to_csv(folder / "meta.csv", index=False)
    return folder / "log.csv", folder / "meta.csv"


def write_jsonl(path: Path, frame: pd.DataFrame) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for record in frame.to_dict(orient="records"):
            record = {k: v for k, v in record.items() if not (isinstance(v, float) and np.isnan(v))}
            out.write(json.dumps(record) + "\n")
    return path


def read_outputs(folder: Path, name: str = "X") -> dict[str, str]:
    return {suffix: (folder / f"{name}.{suffix}").read_text(encoding="utf-8") for suffix in EXPECTED}


def convert(folder: Path, log=None, meta=None, **kwargs):
    log_path, meta_path = write_csv_inputs(folder / "in", log, meta)
    kwargs.setdefault("k_core", 3)
    return convert_interactions(log_path, meta_path, folder / "out", "X", **kwargs)


# ------------------------------------------------------------------------------------------------------
# the hand-made log
# ------------------------------------------------------------------------------------------------------


def test_hand_made_log_gives_the_hand_computed_files(tmp_path):
    stats = convert(tmp_path)
    assert read_outputs(tmp_path / "out") == EXPECTED
    assert (stats.users, stats.items, stats.interactions) == (3, 5, 15)
    assert (stats.train_rows, stats.valid_rows, stats.test_rows) == (6, 3, 3)
    assert stats.interactions_read == 22
    assert (stats.interactions_without_metadata, stats.items_without_metadata) == (1, 1)
    assert stats.metadata_items_never_interacted == 0
    assert stats.kcore_rounds == 3
    assert (stats.kcore_users_removed, stats.kcore_items_removed, stats.kcore_interactions_removed) == (1, 2, 6)
    assert stats.long_texts_emptied == 1
    assert stats.short_users_skipped == 0
    assert stats.sparsity == pytest.approx(0.0)
    assert stats.sequence_length == {"min": 5.0, "mean": 5.0, "median": 5.0, "max": 5.0}
    assert stats.history_length["train"] == {"min": 1.0, "mean": 1.5, "median": 1.5, "max": 2.0}
    assert stats.history_length["test"]["max"] == 4.0
    saved = json.loads((tmp_path / "out" / "X.stats.json").read_text())
    assert saved == json.loads(json.dumps(stats.to_dict()))
    assert saved["kcore_rounds"] == 3 and saved["settings"]["k_core"] == 3
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temporary files left behind
    assert not (tmp_path / "out" / "X.images").exists()


def test_kcore_stops_at_the_first_round_without_change(tmp_path):
    """With k=2 every user and item already qualifies (E has exactly 2), so no round removes anything."""
    stats = convert(tmp_path, k_core=2)
    assert stats.kcore_rounds == 0
    assert stats.kcore_interactions_removed == 0
    assert (stats.users, stats.items, stats.interactions) == (4, 7, 21)


def test_stable_sort_keeps_file_order_for_equal_timestamps(tmp_path):
    rows = [
        ("u", "P3", 7),
        ("v", "P1", 1),
        ("u", "P1", 7),
        ("v", "P2", 2),
        ("u", "P4", 7),
        ("u", "P2", 7),
        ("v", "P3", 3),
        ("u", "P0", 3),
    ]
    meta = pd.DataFrame({"item_id": ["P0", "P1", "P2", "P3", "P4"], "title": ["a", "b", "c", "d", "e"]})
    convert(tmp_path, log_frame(rows), meta, k_core=1)
    out = tmp_path / "out"
    users = read_index_file(out / "X.user2index")
    items = read_index_file(out / "X.item2index")
    assert users == ["u", "v"]
    # u in time order: P0 (3), then the four at 7 in file order P3 P1 P4 P2; then v's new items: none new
    assert items == ["P0", "P3", "P1", "P4", "P2"]
    test = (out / "X.test.inter").read_text().splitlines()
    assert test[1] == "0\t0 1 2 3\t4"  # u: P0 P3 P1 P4 -> P2
    assert test[2] == "1\t2 4\t1"  # v: P1 P2 -> P3


def test_history_truncation_and_leave_one_out_rows(tmp_path):
    seq = [f"I{i}" for i in range(7)]
    rows = [("u", item, t) for t, item in enumerate(seq)] + [("w", "I0", 0), ("w", "I1", 1), ("w", "I2", 2)]
    meta = pd.DataFrame({"item_id": seq, "title": seq})
    stats = convert(tmp_path, log_frame(rows), meta, k_core=1, max_seq_length=3)
    out = tmp_path / "out"
    train = (out / "X.train.inter").read_text().splitlines()[1:]
    # u has 7 items: train part I0..I4, rows t = 1..4; w has 3: no train row
    assert train == ["0\t0\t1", "0\t0 1\t2", "0\t0 1 2\t3", "0\t1 2 3\t4"]
    assert (out / "X.valid.inter").read_text().splitlines()[1:] == ["0\t2 3 4\t5", "1\t0\t1"]
    # u: history = the 3 items before I6; w: I0 I1 -> I2 (shorter than max_seq_length)
    assert (out / "X.test.inter").read_text().splitlines()[1:] == ["0\t3 4 5\t6", "1\t0 1\t2"]
    assert stats.train_rows == 4 and stats.history_length["train"]["max"] == 3.0
    assert stats.history_length["valid"] == {"min": 1.0, "mean": 2.0, "median": 2.0, "max": 3.0}


# ------------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Tom &amp; Jerry", "Tom & Jerry."),
        ("5&quot; screen &lt;new&gt;", "5 screen <new>."),
        ('Say "hi" \u201cnow\u201d', "Say hi now."),
        ("Men's shoes", "Men's shoes."),
        ("one\ntwo\r\nthree\tfour", "one two three four."),
        ("  lots   of \u00a0 space  ", "lots of space."),
        ("ends with dots...", "ends with dots."),
        ("ends with period. ", "ends with period."),
        ("", ""),
        (" . ", ""),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_field_text_flattens_lists_and_list_strings():
    assert field_text(["A", ["B", "C"], None, ""]) == "A B C"
    assert field_text('["A", "B"]') == "A B"
    assert field_text("[['Clothing', 'Men']]") == "Clothing Men"
    assert field_text("[Set of 2] pens") == "[Set of 2] pens"
    assert field_text(np.array(["x", "y"], dtype=object)) == "x y"
    assert field_text(float("nan")) == "" and field_text(None) == ""


def test_item_text_length_rule_counts_the_final_text():
    assert item_text(["a" * 1998]) == ("a" * 1998 + ".", False)  # 1999 characters: kept
    assert item_text(["a" * 1999]) == ("", True)  # 2000 with the period: emptied
    assert item_text(["title", None, "brand"]) == ("title brand.", False)
    assert item_text(["x" * 20], max_length=10) == ("", True)


# ------------------------------------------------------------------------------------------------------
# formats and loading
# ------------------------------------------------------------------------------------------------------


def test_parquet_and_jsonl_inputs_match_csv(tmp_path):
    convert(tmp_path / "csv")
    expected = read_outputs(tmp_path / "csv" / "out")
    assert expected == EXPECTED
    (tmp_path / "pq").mkdir()
    log_frame().to_parquet(tmp_path / "pq" / "log.parquet")
    meta_frame().to_parquet(tmp_path / "pq" / "meta.parquet")  # categories as a real list column
    convert_interactions(
        tmp_path / "pq" / "log.parquet", tmp_path / "pq" / "meta.parquet", tmp_path / "pq" / "out", "X", k_core=3
    )
    assert read_outputs(tmp_path / "pq" / "out") == expected
    (tmp_path / "js").mkdir()
    write_jsonl(tmp_path / "js" / "log.jsonl", log_frame())
    write_jsonl(tmp_path / "js" / "meta.jsonl", meta_frame())
    convert_interactions(
        tmp_path / "js" / "log.jsonl", tmp_path / "js" / "meta.jsonl", tmp_path / "js" / "out", "X", k_core=3
    )
    assert read_outputs(tmp_path / "js" / "out") == expected


def test_iso_timestamps_and_integer_ids_match_unix_seconds_and_string_ids(tmp_path):
    rows = [(10 + u, 100 + i, 1_600_000_000 + 3600 * (i * 7 % 5) + u) for u in range(3) for i in range(4)]
    meta = pd.DataFrame({"item_id": [100 + i for i in range(4)], "title": [f"t{i}" for i in range(4)]})
    convert(tmp_path / "unix", log_frame(rows), meta, k_core=1)
    iso = log_frame(rows)
    iso["timestamp"] = pd.to_datetime(iso["timestamp"], unit="s", utc=True).map(lambda t: t.isoformat())
    iso.loc[0, "timestamp"] = iso.loc[0, "timestamp"].replace("+00:00", "Z")
    (tmp_path / "iso").mkdir()
    iso.to_parquet(tmp_path / "iso" / "log.parquet")
    meta.to_parquet(tmp_path / "iso" / "meta.parquet")  # integer item ids
    convert_interactions(
        tmp_path / "iso" / "log.parquet", tmp_path / "iso" / "meta.parquet", tmp_path / "iso" / "out", "X", k_core=1
    )
    assert read_outputs(tmp_path / "iso" / "out") == read_outputs(tmp_path / "unix" / "out")
    assert read_index_file(tmp_path / "iso" / "out" / "X.user2index") == ["10", "11", "12"]


def test_output_loads_with_the_data_module(tmp_path):
    stats = convert(tmp_path)
    out = tmp_path / "out"
    dataset = load_atomic_dataset(out, "X", cache_dir=tmp_path / "cache")
    assert {split: len(dataset[split]) for split in ("train", "valid", "test")} == {
        "train": stats.train_rows,
        "valid": stats.valid_rows,
        "test": stats.test_rows,
    }
    assert dataset["test"][2]["history"] == [2, 1, 4, 3] and dataset["test"][2]["target"] == 5  # 1-based ids
    catalog = load_item_catalog(out, "X")
    assert catalog.raw_item_ids == ["A", "B", "C", "F", "G"] and catalog.num_items == stats.items
    assert catalog.text == [
        "Alpha & Omega.",
        "The Best Pen Acme.",
        "Line one Line two end.",
        "Foo. Cat1 Cat2 Acme.",
        "",
    ]


def test_image_paths_file(tmp_path):
    meta = meta_frame()
    meta["image"] = ["img/a.jpg", None, "img/c.jpg", "img/d.jpg", "img/e.jpg", "img/f.jpg", ""]
    stats = convert(tmp_path, meta=meta, columns=ColumnNames(image="image"))
    lines = (tmp_path / "out" / "X.images").read_text().splitlines()
    assert lines == ["item_id:token\timage:token", "A\timg/a.jpg", "C\timg/c.jpg", "F\timg/f.jpg"]
    assert (stats.images_written, stats.items_without_image) == (3, 2)


def test_rewriting_replaces_the_files(tmp_path):
    convert(tmp_path)
    convert(tmp_path, k_core=2)
    # u4's first row (item Z) is dropped, so u4 first appears in row 4, after u3 and u1
    assert read_index_file(tmp_path / "out" / "X.user2index") == ["u3", "u1", "u4", "u2"]
    assert not list((tmp_path / "out").glob(".*tmp"))


# ------------------------------------------------------------------------------------------------------
# duplicates, short users
# ------------------------------------------------------------------------------------------------------


def test_duplicate_interactions_kept_by_default_and_dropped_with_the_flag(tmp_path):
    rows = [("u", "A", 1), ("u", "B", 2), ("u", "B", 2), ("u", "C", 3), ("u", "B", 4)]
    meta = pd.DataFrame({"item_id": ["A", "B", "C"], "title": ["a", "b", "c"]})
    kept = convert(tmp_path / "keep", log_frame(rows), meta, k_core=1)
    assert kept.interactions == 5 and kept.duplicate_interactions == 1 and kept.duplicate_interactions_dropped == 0
    dropped = convert(tmp_path / "drop", log_frame(rows), meta, k_core=1, drop_duplicate_interactions=True)
    assert dropped.interactions == 4 and dropped.duplicate_interactions_dropped == 1
    assert (tmp_path / "drop" / "out" / "X.test.inter").read_text().splitlines()[1] == "0\t0 1 2\t1"


def test_duplicate_metadata_is_an_error_by_default_and_a_counted_skip_with_first(tmp_path):
    meta = pd.concat([meta_frame(), pd.DataFrame([("B", "Other B", None, None)], columns=meta_frame().columns)])
    with pytest.raises(ConversionError, match=r"meta\.csv: item 'B' has two metadata rows \(rows 2 and 8"):
        convert(tmp_path / "a", meta=meta)
    stats = convert(tmp_path / "b", meta=meta, on_duplicate_metadata="first")
    assert stats.duplicate_metadata_rows_skipped == 1 and stats.metadata_rows_read == 8
    assert read_outputs(tmp_path / "b" / "out") == EXPECTED  # the first B row's text


def test_users_too_short_to_split_are_skipped_and_counted_with_small_k(tmp_path):
    rows = [("long", item, t) for t, item in enumerate("ABCD")] + [("short", "A", 9), ("short", "E", 10)]
    meta = pd.DataFrame({"item_id": list("ABCDE"), "title": list("abcde")})
    stats = convert(tmp_path, log_frame(rows), meta, k_core=1)
    assert (stats.short_users_skipped, stats.short_user_interactions_dropped, stats.items_only_in_short_users) == (
        1,
        2,
        1,
    )
    assert read_index_file(tmp_path / "out" / "X.user2index") == ["long"]
    assert read_index_file(tmp_path / "out" / "X.item2index") == list("ABCD")  # E only in the skipped user


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------


def test_missing_interaction_column_names_column_and_lists_found(tmp_path):
    log = log_frame().rename(columns={"timestamp": "time"})
    found = r"\['user_id', 'item_id', 'time'\]"
    with pytest.raises(ConversionError, match=r"log\.csv: missing column 'timestamp'.*" + found):
        convert(tmp_path, log)


def test_missing_metadata_column_and_explicit_optional_column(tmp_path):
    with pytest.raises(ConversionError, match=r"meta\.csv: missing column 'name' \(the title column\)"):
        convert(tmp_path / "a", columns=ColumnNames(title="name"))
    with pytest.raises(ConversionError, match=r"meta\.csv: missing column 'Brand' \(the brand column\)"):
        convert(tmp_path / "b", columns=ColumnNames(brand="Brand"))
    # a default-named optional column may be absent
    stats = convert(tmp_path / "c", meta=meta_frame().drop(columns=["brand", "categories"]))
    assert stats.items == 5


def test_unparsable_timestamp_names_the_row(tmp_path):
    log = log_frame().astype({"timestamp": object})
    log.loc[4, "timestamp"] = "last tuesday"
    with pytest.raises(ConversionError, match=r"log\.csv: row 5: cannot parse timestamp 'last tuesday'"):
        convert(tmp_path, log)


def test_empty_timestamp_names_the_row(tmp_path):
    log = log_frame().astype({"timestamp": object})
    log.loc[2, "timestamp"] = ""
    with pytest.raises(ConversionError, match=r"log\.csv: row 3: cannot parse timestamp"):
        convert(tmp_path, log)


def test_empty_user_id_names_the_row(tmp_path):
    log = log_frame()
    log.loc[6, "user_id"] = "  "
    with pytest.raises(ConversionError, match=r"log\.csv: row 7: empty or missing id in column 'user_id'"):
        convert(tmp_path, log)


def test_missing_item_id_in_parquet_and_jsonl_names_the_row(tmp_path):
    log = log_frame().astype({"item_id": object})
    log.loc[3, "item_id"] = None
    log.to_parquet(tmp_path / "log.parquet")
    write_csv_inputs(tmp_path)
    with pytest.raises(ConversionError, match=r"log\.parquet: row 4: empty or missing id in column 'item_id'"):
        convert_interactions(tmp_path / "log.parquet", tmp_path / "meta.csv", tmp_path / "out", "X")
    write_jsonl(tmp_path / "log.jsonl", log)
    with pytest.raises(ConversionError, match=r"log\.jsonl: row 4: empty or missing id in column 'item_id'"):
        convert_interactions(tmp_path / "log.jsonl", tmp_path / "meta.csv", tmp_path / "out", "X")


def test_bad_json_line_names_the_line(tmp_path):
    write_csv_inputs(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"user_id": "u", "item_id": "A", "timestamp": 1}\n{not json\n')
    with pytest.raises(ConversionError, match=r"log\.jsonl: row 2: expected one JSON object per line"):
        convert_interactions(tmp_path / "log.jsonl", tmp_path / "meta.csv", tmp_path / "out", "X")


def test_empty_after_metadata_filter_says_so(tmp_path):
    meta = pd.DataFrame({"item_id": ["nope"], "title": ["x"]})
    with pytest.raises(
        ConversionError,
        match=r"no interaction is left after keeping items with metadata "
        r"\(before: 22 interactions of 8 items",
    ):
        convert(tmp_path, meta=meta)


def test_empty_after_kcore_says_so(tmp_path):
    with pytest.raises(
        ConversionError,
        match=r"k-core filtering with k=7 removed every interaction \(before it: "
        r"21 interactions, 4 users, 7 items\)",
    ):
        convert(tmp_path, k_core=7)
    assert not (tmp_path / "out").exists()  # nothing written


def test_no_train_rows_is_an_error(tmp_path):
    rows = [("u", "A", 1), ("u", "B", 2), ("u", "C", 3)]
    meta = pd.DataFrame({"item_id": list("ABC"), "title": list("abc")})
    with pytest.raises(ConversionError, match="no train rows"):
        convert(tmp_path, log_frame(rows), meta, k_core=1)


def test_unknown_extension_and_missing_file(tmp_path):
    log_path, meta_path = write_csv_inputs(tmp_path)
    odd = tmp_path / "log.txt"
    odd.write_text(log_path.read_text())
    with pytest.raises(ConversionError, match=r"log\.txt: cannot tell the format"):
        convert_interactions(odd, meta_path, tmp_path / "out", "X")
    stats = convert_interactions(odd, meta_path, tmp_path / "out", "X", k_core=3, interactions_format="csv")
    assert stats.users == 3
    with pytest.raises(ConversionError, match=r"absent\.csv: file not found"):
        convert_interactions(tmp_path / "absent.csv", meta_path, tmp_path / "out", "X")


def test_bad_arguments(tmp_path):
    log_path, meta_path = write_csv_inputs(tmp_path)
    with pytest.raises(ConversionError, match="k_core"):
        convert_interactions(log_path, meta_path, tmp_path / "out", "X", k_core=0)
    with pytest.raises(ConversionError, match="dataset_name"):
        convert_interactions(log_path, meta_path, tmp_path / "out", "a/b")
    with pytest.raises(ConversionError, match="text_fields"):
        convert_interactions(log_path, meta_path, tmp_path / "out", "X", text_fields=["price"])


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------


def test_cli_runs_and_prints_the_summary(tmp_path, capsys):
    log = log_frame().rename(columns={"user_id": "reviewerID", "item_id": "asin", "timestamp": "unixReviewTime"})
    meta = meta_frame().rename(columns={"item_id": "asin"})
    log_path, meta_path = write_csv_inputs(tmp_path / "in", log, meta)
    stats = main(
        [
            str(log_path),
            str(meta_path),
            "--output_dir",
            str(tmp_path / "out"),
            "--dataset_name",
            "X",
            "--k_core",
            "3",
            "--user_column",
            "reviewerID",
            "--item_column",
            "asin",
            "--time_column",
            "unixReviewTime",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert "3 users, 5 items, 15 interactions" in printed and "k-core (3): 3 rounds" in printed
    assert stats.test_rows == 3
    assert read_outputs(tmp_path / "out") == EXPECTED


def test_cli_error_exits_with_status_2(tmp_path, capsys):
    log_path, meta_path = write_csv_inputs(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(log_path),
                str(meta_path),
                "--output_dir",
                str(tmp_path / "out"),
                "--dataset_name",
                "X",
                "--time_column",
                "when",
            ]
        )
    assert exit_info.value.code == 2
    assert "missing column 'when'" in capsys.readouterr().err


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--output_dir",
        "--dataset_name",
        "--k_core",
        "--max_seq_length",
        "--user_column",
        "--item_column",
        "--time_column",
        "--metadata_item_column",
        "--title_column",
        "--categories_column",
        "--brand_column",
        "--description_column",
        "--image_column",
        "--text_fields",
        "--on_duplicate_metadata",
        "--drop_duplicate_interactions",
        "--interactions_format",
        "--metadata_format",
        "--log_reader",
    ):
        assert flag in text


# ------------------------------------------------------------------------------------------------------
# property: the output agrees with a naive reference of the filtering
# ------------------------------------------------------------------------------------------------------


def reference_sequences(rows, meta_items, k):
    """Naive re-implementation: metadata filter, k-core by repeated Counter passes, stable time sort,
    users with fewer than 3 interactions skipped. Returns {user: [items in time order]} in first-appearance
    order of the filtered log."""
    kept = [(pos, u, i, t) for pos, (u, i, t) in enumerate(rows) if i in meta_items]
    while True:
        users = Counter(u for _, u, _, _ in kept)
        items = Counter(i for _, _, i, _ in kept)
        smaller = [r for r in kept if users[r[1]] >= k and items[r[2]] >= k]
        if len(smaller) == len(kept):
            break
        kept = smaller
    order: dict[str, list] = {}
    for pos, u, i, t in kept:
        order.setdefault(u, []).append((t, pos, i))
    return {u: [i for _, _, i in sorted(v)] for u, v in order.items() if len(v) >= 3}


# Few users and items over up to 45 rows, so that most examples survive filtering; the rest check the errors.
log_rows = st.lists(
    st.tuples(
        st.sampled_from([f"u{i}" for i in range(4)]), st.sampled_from([f"i{i}" for i in range(7)]), st.integers(0, 5)
    ),
    min_size=12,
    max_size=45,
)


@FAST
@given(
    rows=log_rows, k=st.integers(1, 4), without_meta=st.sets(st.sampled_from([f"i{i}" for i in range(7)]), max_size=2)
)
def test_property_output_matches_reference(rows, k, without_meta):
    meta_items = [f"i{i}" for i in range(7) if f"i{i}" not in without_meta]
    expected = reference_sequences(rows, set(meta_items), k)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        log_path, meta_path = write_csv_inputs(
            folder, log_frame(rows), pd.DataFrame({"item_id": meta_items, "title": meta_items})
        )
        if not expected or all(len(s) == 3 for s in expected.values()):
            with pytest.raises(ConversionError):
                convert_interactions(log_path, meta_path, folder / "out", "X", k_core=k)
            return
        stats = convert_interactions(log_path, meta_path, folder / "out", "X", k_core=k)
        out = folder / "out"
        users = read_index_file(out / "X.user2index")
        items = read_index_file(out / "X.item2index")
        splits = {s: read_inter_file(out / f"X.{s}.inter", len(items)) for s in ("train", "valid", "test")}
        texts = read_text_file(out / "X.text", items)

    # users in first-appearance order of the filtered log, each in test and valid exactly once, in order
    assert users == list(expected)
    for split in ("valid", "test"):
        assert splits[split]["user"].tolist() == list(range(len(users)))
    # sequence reconstruction: with max_seq_length 50 > 45 rows, test history + target is the whole sequence
    test = splits["test"]
    for u, raw_user in enumerate(users):
        history = test["items"][test["offsets"][u] : test["offsets"][u + 1]] - 1
        sequence = [items[j] for j in [*history.tolist(), int(test["target"][u]) - 1]]
        assert sequence == expected[raw_user]
        assert sequence[-1] == expected[raw_user][-1]  # the test target is the last interaction
        valid = splits["valid"]
        assert items[int(valid["target"][u]) - 1] == expected[raw_user][-2]
    # row counts: one train row per position 1..n-3, so sum(n - 3)
    lengths = [len(s) for s in expected.values()]
    assert len(splits["train"]["target"]) == stats.train_rows == sum(n - 3 for n in lengths)
    assert stats.interactions == sum(lengths) and stats.users == len(users)
    # items: exactly those in the sequences, indexed by first appearance scanning users in order
    scan = list(dict.fromkeys(i for s in expected.values() for i in s))
    assert items == scan and len(texts) == len(items)
    # k-core: every user and item has at least k interactions (with k >= 3 no user is skipped afterwards)
    user_counts = Counter({u: len(s) for u, s in expected.items()})
    item_counts = Counter(i for s in expected.values() for i in s)
    assert min(user_counts.values()) >= max(k, 3)
    if k >= 3:
        assert min(item_counts.values()) >= k
    # train rows: target t of user u has history = the previous min(t, 50) items
    train = splits["train"]
    row = 0
    for u, raw_user in enumerate(users):
        sequence = expected[raw_user]
        for t in range(1, len(sequence) - 2):
            assert train["user"][row] == u
            history = train["items"][train["offsets"][row] : train["offsets"][row + 1]] - 1
            assert [items[j] for j in history] == sequence[:t]
            assert items[int(train["target"][row]) - 1] == sequence[t]
            row += 1


def test_repeat_purchases_never_make_the_sparsity_negative(tmp_path):
    rows = [("u", "A", 1), ("u", "B", 2), ("u", "B", 2), ("u", "C", 3), ("u", "B", 4)]  # one user, 3 items, 5 rows
    meta = pd.DataFrame({"item_id": ["A", "B", "C"], "title": ["a", "b", "c"]})
    stats = convert(tmp_path, log_frame(rows), meta, k_core=1)
    assert stats.interactions == 5 and stats.sparsity == 0.0  # every (user, item) pair occurs: fully dense


def test_a_list_valued_parquet_id_column_is_an_error_naming_the_row(tmp_path):
    (tmp_path / "in").mkdir()
    log = pd.DataFrame({"user_id": [["u1", "u2"], ["u3"]], "item_id": ["A", "B"], "timestamp": [1, 2]})
    log.to_parquet(tmp_path / "in" / "log.parquet")
    meta_frame().to_parquet(tmp_path / "in" / "meta.parquet")
    with pytest.raises(ConversionError, match=r"row 1: column 'user_id' holds a (list|ndarray) .*explode list-valued"):
        convert_interactions(tmp_path / "in" / "log.parquet", tmp_path / "in" / "meta.parquet", tmp_path / "out", "X")


def _both_readers(tmp_path: Path, log_path: Path, meta_path: Path, **kwargs) -> tuple[dict, dict]:
    outputs = []
    for reader in ("pandas", "arrow"):
        out = tmp_path / f"out-{reader}"
        convert_interactions(log_path, meta_path, out, "X", log_reader=reader, **kwargs)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    return outputs[0], outputs[1]


@pytest.mark.parametrize("file_format", ["csv", "tsv", "csv.gz", "parquet", "categorical.parquet"])
def test_columnar_reader_gives_the_pandas_readers_files(tmp_path, file_format):
    # Ids that normalise alike (' u1' and 'u1', 12 and 12.0 in Parquet), leading zeros, ISO and unix times mixed.
    rows = [(f" u{u % 4}" if u % 3 == 0 else f"u{u % 4}", f"0{i % 5}", 1_600_000_000 + 37 * u + i) for u in range(12)
            for i in range(6)]  # fmt: skip
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype({"timestamp": object})
    log.loc[3, "timestamp"] = "2020-09-13T12:26:40Z"
    meta = pd.DataFrame({"item_id": [f"0{i}" for i in range(5)], "title": [f"t {i}" for i in range(5)]})
    meta_path = tmp_path / "meta.csv"
    meta.to_csv(meta_path, index=False)
    log_path = tmp_path / f"log.{file_format}"
    if file_format == "categorical.parquet":
        log.astype({"user_id": "category", "item_id": "category", "timestamp": str}).to_parquet(log_path)
    elif file_format == "parquet":
        log = log.assign(user_id=[float(u.strip()[1:]) for u in log["user_id"]], timestamp=log["timestamp"].astype(str))
        log.to_parquet(log_path)
    else:
        log.to_csv(log_path, index=False, sep="\t" if file_format == "tsv" else ",")
    pandas_files, arrow_files = _both_readers(tmp_path, log_path, meta_path, k_core=2)
    assert arrow_files == pandas_files
    assert pandas_files["X.item2index"].startswith(b"0")  # leading zeros kept
    assert len(pandas_files["X.user2index"].splitlines()) == 4  # " u1" is "u1", 12.0 is "12"


def test_columnar_reader_names_the_first_bad_row_like_the_pandas_reader(tmp_path):
    rows = [("u1", "A", 1), ("u2", "B", 2), ("", "C", 3), ("u4", "D", 4)]
    write_csv_inputs(tmp_path, log_frame(rows))
    for reader in ("pandas", "arrow"):
        with pytest.raises(ConversionError, match=r"row 3: empty or missing id in column 'user_id' \(1 such rows\)"):
            convert_interactions(tmp_path / "log.csv", tmp_path / "meta.csv", tmp_path / "out", "X", log_reader=reader)
    rows = [("u1", "A", 1), ("u2", "B", "soon"), ("u3", "C", 3)]
    write_csv_inputs(tmp_path, log_frame(rows))
    for reader in ("pandas", "arrow"):
        with pytest.raises(ConversionError, match=r"row 2: cannot parse timestamp 'soon'"):
            convert_interactions(tmp_path / "log.csv", tmp_path / "meta.csv", tmp_path / "out", "X", log_reader=reader)


def test_columnar_reader_gives_the_pandas_readers_files_on_a_real_domain(shared_data_dir, tmp_path):
    domain = shared_data_dir / "amazon_pretrain" / "Tools"
    if not domain.is_dir():
        pytest.skip(f"{domain} not found")
    pandas_files, arrow_files = _both_readers(
        tmp_path, domain / "interactions.csv", domain / "items.csv", text_fields=["title"]
    )
    assert arrow_files == pandas_files
    assert len(arrow_files["X.train.inter"].splitlines()) > 30_000  # 66k interactions of 11k users
