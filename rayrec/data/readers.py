"""Raw interaction readers: one function per on-disk format, each returning :class:`Interactions`.

Every reader keeps the file's row order and the raw (un-remapped) ids. Bad input raises
:class:`~rayrec.errors.DataFormatError` whose message is ``<path>:<line>: <what>`` and names the bad token.

Formats (``READERS`` key -> function):

=====================  ===============================  ==============================================================
key                    function                         format
=====================  ===============================  ==============================================================
``users_dat``          :func:`read_users_dat`           CiteULike / Foursquare: line n (0-based) = user n,
                                                        ``<count> <item> <item> ...`` (``0`` = a user with no items)
``movielens_tab``      :func:`read_movielens_tab`       ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``
``movielens_dcolon``   :func:`read_movielens_dcolon`    ``ratings.dat``: ``user::item::rating::timestamp``
``csv``                :func:`read_csv_table`           CSV with a header naming ``user,item[,rating,timestamp]``
``parquet``            :func:`read_parquet_table`       a parquet file or a directory of ``*.parquet`` (same columns)
=====================  ===============================  ==============================================================

Parsing strategy: the delimited formats are parsed by pyarrow (fast path). Whenever the fast path fails or its
result breaks a rule (null, negative id, non-finite rating), the file is re-parsed line by line (slow path), which
either raises on the first bad line with its exact 1-based line number or returns the rows. Blank lines are skipped
in the MovieLens and CSV formats; in ``users.dat`` a blank line is an error (the line number *is* the user id).
Parquet errors name the part file and the 0-based row inside it.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
from collections.abc import Callable, Iterator
from typing import NoReturn
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rayrec.errors import DataFormatError, DatasetNotFoundError

__all__ = [
    "Interactions",
    "READERS",
    "read_users_dat",
    "read_movielens_tab",
    "read_movielens_dcolon",
    "read_csv_table",
    "read_parquet_table",
    "read_table",
    "read_tsv_pairs",
]

_INT_RE = re.compile(r"-?[0-9]+")  # what a text id / timestamp token may look like (after stripping blanks)
_DIGITS_WS = re.compile(r"[0-9\s]*")  # a users.dat made only of digits and blanks holds only non-negative ints
_I64_MAX = np.iinfo(np.int64).max


# --------------------------------------------------------------------------------------------- container
@dataclass
class Interactions:
    """A table of (user, item[, rating, timestamp]) rows. Row order = file order until something reorders it.

    N = number of rows. Ids are raw ids as read (readers) or contiguous 0-based ids (after ``preprocess.remap``).
    """

    user: np.ndarray  # [N] int64
    item: np.ndarray  # [N] int64
    rating: np.ndarray | None = None  # [N] float32
    timestamp: np.ndarray | None = None  # [N] int64

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        n = len(self.user)
        if self.user.ndim != 1 or self.item.shape != (n,):
            raise ValueError(f"user/item must be 1-D of equal length, got {self.user.shape} and {self.item.shape}")
        if self.rating is not None:
            self.rating = np.asarray(self.rating, dtype=np.float32)
            if self.rating.shape != (n,):
                raise ValueError(f"rating must have shape ({n},), got {self.rating.shape}")
        if self.timestamp is not None:
            self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
            if self.timestamp.shape != (n,):
                raise ValueError(f"timestamp must have shape ({n},), got {self.timestamp.shape}")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> Interactions:
        """Rows selected by a boolean mask ``[N]`` or an integer index array ``[M]`` (in the given order)."""
        return Interactions(
            user=self.user[index],
            item=self.item[index],
            rating=None if self.rating is None else self.rating[index],
            timestamp=None if self.timestamp is None else self.timestamp[index],
        )


# --------------------------------------------------------------------------------------------- token checks
def _check_token(kind: str, tok: str, name: str) -> str | None:
    """Why ``tok`` is not a valid ``kind`` value ("id" | "int" | "float"), or None when it is."""
    t = tok.strip()
    if t == "":
        return f"empty {name}"
    if kind in ("id", "int"):
        if not _INT_RE.fullmatch(t):
            return f"{name} {tok!r} is not an integer"
        v = int(t)
        if kind == "id" and v < 0:
            return f"{name} {tok!r} is negative"
        if not -_I64_MAX <= v <= _I64_MAX:
            return f"{name} {tok!r} does not fit in int64"
        return None
    try:
        f = float(t)
    except ValueError:
        return f"{name} {tok!r} is not a number"
    if not math.isfinite(f):
        return f"{name} {tok!r} is not a finite number"
    return None


def _columns_from_rows(rows: list[list[str]], kinds: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """Convert already validated string fields ``[N][C]`` to typed numpy columns."""
    out: dict[str, np.ndarray] = {}
    for j, (kind, name) in enumerate(zip(kinds, names)):
        vals = np.array([r[j].strip() for r in rows], dtype=str)  # [N] validated tokens
        out[name] = vals.astype(np.float64).astype(np.float32) if kind == "float" else vals.astype(np.int64)
    return out


def _interactions(
    path: Path, cols: dict[str, np.ndarray], line: int, empty: str = "no interactions in file"
) -> Interactions:
    if len(cols["user"]) == 0:
        raise DataFormatError(path, line, empty)
    return Interactions(
        user=cols["user"], item=cols["item"], rating=cols.get("rating"), timestamp=cols.get("timestamp")
    )


def _need_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(f"{p}: no such file")
    return p


# --------------------------------------------------------------------------------------------- users.dat
def read_users_dat(path: str | Path) -> Interactions:
    """Read a CiteULike/Foursquare ``users.dat``: line n (0-based) lists the items of user n.

    Each line is ``<count> <item_1> ... <item_count>``; ``count`` must equal the number of ids that follow,
    all tokens must be non-negative integers. ``0`` alone is a user with no items (contributes no rows but
    still takes the user id). Returns raw user ids ``0..L-1`` (L lines) and raw item ids, in file order.
    """
    p = _need_file(path)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFormatError(p, line, f"not UTF-8 text (byte {raw[e.start]:#x})") from None
    lines = text.split("\n")  # [L] line n = user n (a trailing "\r" is removed by str.split below)
    if lines[-1] == "":  # a final newline does not start another user
        lines.pop()
    if not lines:
        raise DataFormatError(p, 1, "empty file: expected '<count> <item> <item> ...' per user")
    rows = [ln.split() for ln in lines]  # the one per-line loop: text has to be split line by line
    ntok = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))  # [L]
    blank = np.flatnonzero(ntok == 0)
    if len(blank):
        raise DataFormatError(p, int(blank[0]) + 1, "blank line: expected '<count> <item> ...' (use '0' for no items)")
    flat = list(itertools.chain.from_iterable(rows))  # [T] all tokens, T = sum(ntok)
    if not _DIGITS_WS.fullmatch(text):  # a sign, letter, dot, ...: find and name the first bad token
        _raise_first_bad_users_token(p, rows)
    try:
        vals = np.array(flat).astype(np.int64)  # [T]
    except (ValueError, OverflowError):  # e.g. a 20-digit id
        _raise_first_bad_users_token(p, rows)
    starts = np.concatenate([[0], np.cumsum(ntok)[:-1]])  # [L] index of each line's count token
    counts = vals[starts]  # [L]
    bad = np.flatnonzero(counts != ntok - 1)
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(
            p, i + 1, f"count {rows[i][0]!r} does not match the {ntok[i] - 1} item ids that follow on the line"
        )
    is_item = np.ones(len(vals), dtype=bool)
    is_item[starts] = False
    items = vals[is_item]  # [N]
    users = np.repeat(np.arange(len(lines), dtype=np.int64), ntok - 1)  # [N]
    if len(items) == 0:
        raise DataFormatError(p, 1, "no interactions in file (every user has 0 items)")
    return Interactions(user=users, item=items)


def _raise_first_bad_users_token(p: Path, rows: list[list[str]]) -> NoReturn:
    for ln, toks in enumerate(rows, start=1):
        for j, tok in enumerate(toks):
            why = _check_token("id", tok, "count" if j == 0 else "item id")
            if why is not None:
                raise DataFormatError(p, ln, f"{why} (token {j + 1} on the line)")
    raise DataFormatError(p, None, "could not parse as integers")  # pragma: no cover - numpy and the scan disagree


# --------------------------------------------------------------------------------------------- MovieLens
_ML_NAMES = ["user", "item", "rating", "timestamp"]
_ML_KINDS = ["id", "id", "float", "int"]


def read_movielens_tab(path: str | Path) -> Interactions:
    """Read MovieLens-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp`` per line, no header."""
    p = _need_file(path)
    raw = p.read_bytes()
    return _read_delimited(p, raw, raw, "\t", _ML_NAMES, _ML_KINDS)


def read_movielens_dcolon(path: str | Path) -> Interactions:
    """Read MovieLens-1M/10M ``ratings.dat``: ``user::item::rating::timestamp`` per line, no header."""
    p = _need_file(path)
    raw = p.read_bytes()
    # pyarrow wants a one-byte delimiter: rewrite '::' as TAB for the fast path (files that already hold a TAB
    # go straight to the line scan, which splits on '::' and reports exactly).
    fast = raw.replace(b"::", b"\t") if b"\t" not in raw else None
    return _read_delimited(p, raw, fast, "::", _ML_NAMES, _ML_KINDS)


def read_tsv_pairs(path: str | Path) -> Interactions:
    """Read ``user<TAB>item`` lines (no header), e.g. DE-RRD's split files ``train.tsv``."""
    p = _need_file(path)
    raw = p.read_bytes()
    return _read_delimited(p, raw, raw, "\t", ["user", "item"], ["id", "id"])


_ARROW_TYPE = {"id": pa.int64(), "int": pa.int64(), "float": pa.float32()}


def _read_delimited(
    p: Path, raw: bytes, fast: bytes | None, sep: str, names: list[str], kinds: list[str]
) -> Interactions:
    """Header-less delimited text: pyarrow fast path on ``fast`` (TAB-separated bytes), else the line scan."""
    if not raw.strip(b"\r\n"):
        raise DataFormatError(p, 1, f"empty file: expected '{sep.join(names)}' per line")
    if fast is not None:
        try:
            table = pacsv.read_csv(
                io.BytesIO(fast),
                read_options=pacsv.ReadOptions(column_names=names),
                parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: _ARROW_TYPE[k] for n, k in zip(names, kinds)},
                    null_values=[""],
                    strings_can_be_null=False,
                ),
            )
            cols = _arrow_columns_if_valid(table)
            if cols is not None:
                return _interactions(p, cols, 1)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    return _scan_delimited(p, raw, sep, names, kinds)


def _arrow_columns_if_valid(table: pa.Table) -> dict[str, np.ndarray] | None:
    """Numpy columns of a parsed table, or None when a null, negative id or non-finite rating is present."""
    if any(c.null_count for c in table.columns):
        return None
    cols = {name: table.column(name).to_numpy() for name in table.column_names}
    if (cols["user"] < 0).any() or (cols["item"] < 0).any():
        return None
    if "rating" in cols and not np.isfinite(cols["rating"]).all():
        return None
    return cols


def _scan_delimited(p: Path, raw: bytes, sep: str, names: list[str], kinds: list[str]) -> Interactions:
    """Line-by-line parse of a header-less delimited file; raises on the first bad line, else returns the rows."""
    rows: list[list[str]] = []
    for ln, bline in enumerate(raw.splitlines(), start=1):
        if not bline:  # truly empty lines are skipped, as the fast path does
            continue
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError:
            raise DataFormatError(p, ln, "not UTF-8 text") from None
        fields = line.split(sep)
        if len(fields) != len(names):
            raise DataFormatError(
                p, ln, f"expected {len(names)} fields '{sep.join(names)}', got {len(fields)}: {line[:80]!r}"
            )
        for tok, kind, name in zip(fields, kinds, names):
            why = _check_token(kind, tok, f"{name} id" if kind == "id" else name)
            if why is not None:
                raise DataFormatError(p, ln, why)
        rows.append(fields)
    return _interactions(p, _columns_from_rows(rows, kinds, names), 1)


# --------------------------------------------------------------------------------------------- CSV
_OPTIONAL = {"rating": ("float", pa.float32()), "timestamp": ("int", pa.int64())}


def read_csv_table(path: str | Path) -> Interactions:
    """Read a CSV file whose header names ``user`` and ``item`` (and optionally ``rating``, ``timestamp``).

    Other columns are ignored. Ids must be non-negative integers, ``timestamp`` an integer (e.g. epoch seconds),
    ``rating`` a finite number. Line numbers in errors count the header as line 1.
    """
    p = _need_file(path)
    with p.open("r", newline="", encoding="utf-8-sig", errors="strict") as f:  # -sig: drop a BOM
        try:
            header = next(csv.reader(f), None)
        except UnicodeDecodeError:
            raise DataFormatError(p, 1, "not UTF-8 text") from None
    if not header or all(not h.strip() for h in header):
        raise DataFormatError(p, 1, "empty file: expected a header line naming columns user,item[,rating,timestamp]")
    names = [h.strip() for h in header]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataFormatError(p, 1, f"duplicate column names in header: {dup}")
    for need in ("user", "item"):
        if need not in names:
            raise DataFormatError(
                p, 1, f"header has no '{need}' column (found {names}); expected user,item[,rating,timestamp]"
            )
    wanted = ["user", "item"] + [c for c in _OPTIONAL if c in names]
    types = {"user": pa.int64(), "item": pa.int64()} | {c: _OPTIONAL[c][1] for c in wanted[2:]}
    try:
        table = pacsv.read_csv(
            p,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=",", ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types=types, null_values=[""], strings_can_be_null=False
            ),
        )
        cols = _arrow_columns_if_valid(table)
        if cols is not None:
            return _interactions(p, cols, 2, "no data rows after the header")
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        pass
    return _scan_csv(p, names, wanted)


def _scan_csv(p: Path, names: list[str], wanted: list[str]) -> Interactions:
    kinds = {"user": "id", "item": "id"} | {c: _OPTIONAL[c][0] for c in _OPTIONAL}
    idx = [names.index(c) for c in wanted]
    rows: list[list[str]] = []
    with p.open("r", newline="", encoding="utf-8-sig", errors="strict") as f:
        reader = csv.reader(f)
        try:
            next(reader)  # header
            for rec in reader:
                ln = reader.line_num  # physical line where this record ends (header = 1)
                if not rec:
                    continue
                if len(rec) != len(names):
                    raise DataFormatError(p, ln, f"expected {len(names)} fields as in the header, got {len(rec)}")
                fields = [rec[i] for i in idx]
                for tok, c in zip(fields, wanted):
                    why = _check_token(kinds[c], tok, f"{c} id" if c in ("user", "item") else c)
                    if why is not None:
                        raise DataFormatError(p, ln, why)
                rows.append(fields)
        except UnicodeDecodeError:
            raise DataFormatError(p, reader.line_num + 1, "not UTF-8 text") from None
        except csv.Error as e:
            raise DataFormatError(p, reader.line_num, f"CSV syntax error: {e}") from None
    if not rows:
        raise DataFormatError(p, 2, "no data rows after the header")
    return _interactions(p, _columns_from_rows(rows, [kinds[c] for c in wanted], wanted), 2)


# --------------------------------------------------------------------------------------------- parquet
def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(f for f in path.glob("*.parquet") if f.is_file())  # top level only (meta/ is not data)
        if not files:
            raise DataFormatError(path, None, "directory holds no *.parquet files")
        return files
    if path.is_file():
        return [path]
    raise DatasetNotFoundError(f"{path}: no such file or directory")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _arrow_ids(f: Path, col: pa.ChunkedArray, name: str) -> np.ndarray:
    """Column ``name`` as non-negative int64 ``[N]``; raises naming the first bad 0-based row."""
    if col.null_count:
        r = _first(col.is_null().to_numpy(zero_copy_only=False))
        raise DataFormatError(f, None, f"row {r} (0-based): null {name} id")
    t = col.type
    if pa.types.is_integer(t):
        v = col.to_numpy()
        if pa.types.is_unsigned_integer(t) and t.bit_width == 64 and (v > _I64_MAX).any():
            r = _first(v > _I64_MAX)
            raise DataFormatError(f, None, f"row {r} (0-based): {name} id {v[r]} does not fit in int64")
        v = v.astype(np.int64)
    elif pa.types.is_floating(t):
        x = col.to_numpy()
        bad = ~np.isfinite(x) | (x != np.floor(x)) | (np.abs(x) > 2.0**62)
        if bad.any():
            r = _first(bad)
            raise DataFormatError(f, None, f"row {r} (0-based): {name} id {x[r]!r} is not an integer")
        v = x.astype(np.int64)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        okm = pc.match_substring_regex(col, r"^\s*-?\d{1,18}\s*$").to_numpy(zero_copy_only=False)
        if not okm.all():
            r = _first(~okm)
            raise DataFormatError(f, None, f"row {r} (0-based): {name} id {col[r].as_py()!r} is not an integer")
        v = pc.cast(pc.utf8_trim_whitespace(col), pa.int64()).to_numpy()
    else:
        raise DataFormatError(f, None, f"column '{name}' has type {t}; integer ids required")
    if (v < 0).any():
        r = _first(v < 0)
        raise DataFormatError(f, None, f"row {r} (0-based): {name} id {v[r]} is negative")
    return v


def _arrow_optional(f: Path, col: pa.ChunkedArray, name: str) -> np.ndarray:
    if col.null_count:
        r = _first(col.is_null().to_numpy(zero_copy_only=False))
        raise DataFormatError(f, None, f"row {r} (0-based): null {name}")
    t = col.type
    if name == "timestamp":
        if pa.types.is_timestamp(t):
            return pc.cast(col, pa.timestamp("s")).cast(pa.int64()).to_numpy()
        if pa.types.is_integer(t):
            return col.to_numpy().astype(np.int64)
        raise DataFormatError(
            f, None, f"column 'timestamp' has type {t}; integer epoch seconds or a timestamp required"
        )
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise DataFormatError(f, None, f"column 'rating' has type {t}; a number required")
    x = col.to_numpy().astype(np.float32)
    if not np.isfinite(x).all():
        r = _first(~np.isfinite(x))
        raise DataFormatError(f, None, f"row {r} (0-based): rating {x[r]!r} is not finite")
    return x


def read_parquet_table(path: str | Path) -> Interactions:
    """Read a parquet file, or every top-level ``*.parquet`` of a directory in name order (``part-00000`` ...).

    Columns ``user``, ``item`` (integer, or integral float/str) are required; ``rating`` and ``timestamp`` are
    optional, but must then be present in every file. Errors name the part file and the 0-based row.
    """
    files = _parquet_files(Path(path))
    parts: list[dict[str, np.ndarray]] = []
    optional: list[str] | None = None
    for f in files:
        try:
            names = pq.ParquetFile(f).schema_arrow.names
        except (pa.ArrowInvalid, OSError) as e:
            raise DataFormatError(f, None, f"not a readable parquet file: {e}") from None
        for need in ("user", "item"):
            if need not in names:
                raise DataFormatError(f, None, f"no '{need}' column (columns: {names})")
        opt = [c for c in _OPTIONAL if c in names]
        if optional is None:
            optional = opt
        elif opt != optional:
            raise DataFormatError(f, None, f"optional columns {opt} differ from the first file's {optional}")
        table = pq.read_table(f, columns=["user", "item", *opt])
        cols = {c: _arrow_ids(f, table.column(c), c) for c in ("user", "item")}
        for c in opt:
            cols[c] = _arrow_optional(f, table.column(c), c)
        parts.append(cols)
    merged = {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}
    if len(merged["user"]) == 0:
        raise DataFormatError(path, None, "no interactions (0 rows)")
    return Interactions(
        user=merged["user"], item=merged["item"], rating=merged.get("rating"), timestamp=merged.get("timestamp")
    )


def read_table(path: str | Path) -> Interactions:
    """A parquet file / directory of parquet files (by suffix or ``is_dir``), else a CSV file with a header."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in (".parquet", ".pq"):
        return read_parquet_table(p)
    return read_csv_table(p)


READERS: dict[str, Callable[[str | Path], Interactions]] = {
    "users_dat": read_users_dat,
    "movielens_tab": read_movielens_tab,
    "movielens_dcolon": read_movielens_dcolon,
    "csv": read_csv_table,
    "parquet": read_parquet_table,
}


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) of a UTF-8 text file; raises DataFormatError on bad bytes."""
    with path.open("rb") as f:
        for ln, bline in enumerate(f, start=1):
            try:
                yield ln, bline.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataFormatError(path, ln, "not UTF-8 text") from None
