"""Raw readers: hand-made files for every format and every kind of bad input (file name + line in the message)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayrec.data.readers import (
    READERS,
    _scan_delimited,
    read_csv_table,
    read_movielens_dcolon,
    read_movielens_tab,
    read_parquet_table,
    read_table,
    read_tsv_pairs,
    read_users_dat,
)
from rayrec.errors import DataFormatError, DatasetNotFoundError


def _fails(reader, path: Path, line: int | None, *snippets: str) -> DataFormatError:
    with pytest.raises(DataFormatError) as ei:
        reader(path)
    msg = str(ei.value)
    assert path.name in msg, msg
    if line is not None:
        assert f"{path.name}:{line}:" in msg, msg
        assert ei.value.line == line
    for s in snippets:
        assert s in msg, msg
    return ei.value


def test_readers_registry_keys():
    assert set(READERS) == {"users_dat", "movielens_tab", "movielens_dcolon", "csv", "parquet"}


# --------------------------------------------------------------------------------------------- users.dat
def test_users_dat_reads_lines_as_users(write):
    p = write("users.dat", "2 10 11\n0\n3 12 10 7\n")
    x = read_users_dat(p)
    np.testing.assert_array_equal(x.user, [0, 0, 2, 2, 2])  # user 1 ("0") has no items but keeps its id
    np.testing.assert_array_equal(x.item, [10, 11, 12, 10, 7])
    assert x.rating is None and x.timestamp is None
    assert x.user.dtype == np.int64 and x.item.dtype == np.int64


def test_users_dat_crlf_and_no_final_newline(write):
    x = read_users_dat(write("u.dat", "1 5\r\n2 6 7"))
    np.testing.assert_array_equal(x.user, [0, 1, 1])
    np.testing.assert_array_equal(x.item, [5, 6, 7])


@pytest.mark.parametrize(
    "text, line, snippets",
    [
        ("2 1 2\n3 4 x 5\n", 2, ["'x'", "not an integer"]),
        ("2 1 -3\n", 1, ["'-3'", "negative"]),
        ("1 1\n3 1 2\n", 2, ["count '3'", "2 item ids"]),
        ("1 2.5\n", 1, ["'2.5'"]),
        ("1 99999999999999999999999\n", 1, ["int64"]),
        ("1 5\n\n1 6\n", 2, ["blank line"]),
        ("", 1, ["empty file"]),
        ("0\n0\n", 1, ["no interactions"]),
        ("x 1\n", 1, ["count 'x'"]),
    ],
)
def test_users_dat_bad_input(write, text, line, snippets):
    _fails(read_users_dat, write("users.dat", text), line, *snippets)


def test_users_dat_shared_file(data_root: Path):
    x = read_users_dat(data_root / "citeulike-t" / "users.dat")
    assert len(x) == 134_860
    assert len(np.unique(x.user)) == 7_947 and x.user.max() == 7_946
    assert len(np.unique(x.item)) == 25_584


def test_missing_file_is_dataset_not_found(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="nope.dat"):
        read_users_dat(tmp_path / "nope.dat")


# --------------------------------------------------------------------------------------------- MovieLens
def test_movielens_tab_good(write):
    p = write("u.data", "196\t242\t3\t881250949\n\n186\t302\t4.5\t891717742\n")
    x = read_movielens_tab(p)
    np.testing.assert_array_equal(x.user, [196, 186])
    np.testing.assert_array_equal(x.item, [242, 302])
    np.testing.assert_array_equal(x.rating, np.array([3.0, 4.5], dtype=np.float32))
    np.testing.assert_array_equal(x.timestamp, [881250949, 891717742])


@pytest.mark.parametrize(
    "text, line, snippets",
    [
        ("1\t2\t3\t4\n1\t2\t3\n", 2, ["expected 4 fields"]),
        ("1\t2\t3\t4\n5\tx\t3\t4\n", 2, ["item id 'x'"]),
        ("1\t-2\t3\t4\n", 1, ["item id '-2'", "negative"]),
        ("1\t2\t3\t4\n\n1\t2\tabc\t4\n", 3, ["rating 'abc'"]),
        ("1\t2\tnan\t4\n", 1, ["not a finite number"]),
        ("1\t2\t3\t1e3\n", 1, ["timestamp '1e3'"]),
        ("1\t\t3\t4\n", 1, ["empty item id"]),
        ("", 1, ["empty file"]),
    ],
)
def test_movielens_tab_bad_input(write, text, line, snippets):
    _fails(read_movielens_tab, write("u.data", text), line, *snippets)


def test_movielens_tab_fast_and_slow_paths_agree(data_root: Path):
    p = data_root / "ml-100k" / "u.data"
    fast = read_movielens_tab(p)
    names, kinds = ["user", "item", "rating", "timestamp"], ["id", "id", "float", "int"]
    slow = _scan_delimited(p, p.read_bytes(), "\t", names, kinds)
    assert len(fast) == 100_000 and len(np.unique(fast.user)) == 943 and len(np.unique(fast.item)) == 1_682
    for col in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(fast, col), getattr(slow, col))


def test_movielens_dcolon_good(write):
    x = read_movielens_dcolon(write("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"))
    np.testing.assert_array_equal(x.item, [1193, 661])
    np.testing.assert_array_equal(x.rating, [5.0, 3.0])
    np.testing.assert_array_equal(x.timestamp, [978300760, 978302109])


@pytest.mark.parametrize(
    "text, line, snippets",
    [
        ("1::2::3::4\n1::2::3\n", 2, ["expected 4 fields"]),
        ("1::2::3::4\n1:::2::3::4\n", 2, ["item id ':2'"]),
        ("1::2::3::4\n1\t2::3::4::5\n", 2, ["user id '1\\t2'"]),
        ("1::2::3::4\n1::y::3::4\n", 2, ["item id 'y'"]),
        ("\n\n", 1, ["empty file"]),
    ],
)
def test_movielens_dcolon_bad_input(write, text, line, snippets):
    _fails(read_movielens_dcolon, write("ratings.dat", text), line, *snippets)


def test_tsv_pairs(write):
    x = read_tsv_pairs(write("train.tsv", "0\t3\n0\t6\n1\t2\n"))
    np.testing.assert_array_equal(x.user, [0, 0, 1])
    np.testing.assert_array_equal(x.item, [3, 6, 2])
    _fails(read_tsv_pairs, write("bad.tsv", "0\t3\n0\t3\t4\n"), 2, "expected 2 fields")


# --------------------------------------------------------------------------------------------- CSV
def test_csv_good_with_extra_and_reordered_columns(write):
    p = write("x.csv", 'title,item,user,timestamp,rating\n"a, b",5,1,100,4\n\n"c\nd",6,2,101,3.5\n')
    x = read_csv_table(p)
    np.testing.assert_array_equal(x.user, [1, 2])
    np.testing.assert_array_equal(x.item, [5, 6])
    np.testing.assert_array_equal(x.timestamp, [100, 101])
    np.testing.assert_array_equal(x.rating, np.array([4.0, 3.5], dtype=np.float32))
    y = read_table(write("y.csv", "user,item\n1,2\n"))
    assert y.rating is None and y.timestamp is None


@pytest.mark.parametrize(
    "text, line, snippets",
    [
        ("user,item\n1,2\n3,x\n", 3, ["item id 'x'"]),
        ("user,item\n1,2\n\n,2\n", 4, ["empty user id"]),
        ("user,item\n1,-2\n", 2, ["negative"]),
        ("user,item\n1,2.5\n", 2, ["'2.5'"]),
        ("user,item,rating\n1,2,3\n1,2\n", 3, ["expected 3 fields"]),
        ('user,note,item\n1,"multi\nline",2\n1,ok,zz\n', 4, ["item id 'zz'"]),  # quoted newline counted
        ("user,rating\n1,2\n", 1, ["no 'item' column"]),
        ("user,item\n", 2, ["no data rows"]),
        ("", 1, ["empty file"]),
        ("user,item,timestamp\n1,2,2020-01-01\n", 2, ["timestamp '2020-01-01'"]),
    ],
)
def test_csv_bad_input(write, text, line, snippets):
    _fails(read_csv_table, write("data.csv", text), line, *snippets)


# --------------------------------------------------------------------------------------------- parquet
def _pq(path: Path, **cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def test_parquet_file_and_directory(tmp_path: Path):
    _pq(tmp_path / "d" / "part-00001.parquet", user=pa.array([3], pa.int32()), item=pa.array([4], pa.int32()),
        timestamp=pa.array([9], pa.int64()))
    _pq(tmp_path / "d" / "part-00000.parquet", user=pa.array([1, 2], pa.int32()), item=pa.array([5, 6], pa.int32()),
        timestamp=pa.array([7, 8], pa.int64()))
    _pq(tmp_path / "d" / "meta" / "users.parquet", id=pa.array([0]))  # not top level: not data
    x = read_parquet_table(tmp_path / "d")
    np.testing.assert_array_equal(x.user, [1, 2, 3])  # part files in name order
    np.testing.assert_array_equal(x.item, [5, 6, 4])
    np.testing.assert_array_equal(x.timestamp, [7, 8, 9])
    y = read_table(_pq(tmp_path / "f.parquet", user=pa.array(["12", " 3"]), item=pa.array([1.0, 2.0])))
    np.testing.assert_array_equal(y.user, [12, 3])  # integral strings / floats are accepted
    np.testing.assert_array_equal(y.item, [1, 2])


@pytest.mark.parametrize(
    "cols, snippets",
    [
        ({"user": pa.array([1, None, 3]), "item": pa.array([1, 2, 3])}, ["row 1 (0-based)", "null user id"]),
        ({"user": pa.array([1, 2]), "item": pa.array([1.0, 2.5])}, ["row 1 (0-based)", "2.5"]),
        ({"user": pa.array(["1", "b"]), "item": pa.array([1, 2])}, ["row 1 (0-based)", "'b'"]),
        ({"user": pa.array([1, 2, -4]), "item": pa.array([1, 2, 3])}, ["row 2 (0-based)", "negative"]),
        ({"user": pa.array([1]), "other": pa.array([1])}, ["no 'item' column"]),
        ({"user": pa.array([], pa.int64()), "item": pa.array([], pa.int64())}, ["0 rows"]),
    ],
)
def test_parquet_bad_input(tmp_path: Path, cols, snippets):
    p = _pq(tmp_path / "bad.parquet", **cols)
    _fails(read_parquet_table, p, None, *snippets)


def test_parquet_empty_directory(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    _fails(read_parquet_table, tmp_path / "empty", None, "no *.parquet")


def test_csv_with_byte_order_mark(write):
    x = read_csv_table(write("bom.csv", "\ufeffuser,item\n1,2\n".encode("utf-8")))
    np.testing.assert_array_equal(x.user, [1])
    _fails(read_csv_table, write("bom_bad.csv", "\ufeffuser,item\n1,2\n3,q\n".encode("utf-8")), 3, "item id 'q'")
