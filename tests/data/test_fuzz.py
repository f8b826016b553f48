"""Fuzz: randomly corrupted interaction files either load exactly the rows an independent reference parser reads,
or raise DataFormatError naming the file and the first bad line the reference finds; never anything else.

The reference parsers below re-state each format's documented grammar (rayrec.data.readers) in the plainest
possible code, line by line, so the readers' fast paths (pyarrow, numpy) are checked against it."""

import math
import re

import numpy as np
import pytest

from rayrec.data.readers import read_movielens_tab, read_users_dat
from rayrec.errors import DataFormatError

I64 = 2**63 - 1
INT = re.compile(r"-?[0-9]+")
JUNK = [b"\t", b"\n", b"\r", b"\r\n", b" ", b"-", b"+", b".", b"x", b"9", b"0", b"\xff", b"\xc3", b"", b"e5", b"nan",
        b"inf", b"99999999999999999999", b"-1", b"1.5", b"\t\t", b"\n\n", b"\xef\xbb\xbf", b"\x00", b"\x0b"]


class Bad(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _id(tok: str) -> int | None:
    t = tok.strip()
    if not INT.fullmatch(t) or int(t) < 0 or int(t) > I64:
        return None
    return int(t)


def ref_movielens_tab(raw: bytes):
    """user<TAB>item<TAB>rating<TAB>timestamp per line; empty lines skipped; ids >= 0; finite rating."""
    if not raw.strip(b"\r\n"):
        raise Bad(1)
    rows = []
    for ln, b in enumerate(raw.splitlines(), start=1):
        if not b:
            continue
        try:
            f = b.decode("utf-8").split("\t")
        except UnicodeDecodeError:
            raise Bad(ln) from None
        if len(f) != 4:
            raise Bad(ln)
        u, i = _id(f[0]), _id(f[1])
        try:
            r = float(f[2].strip()) if f[2].strip() else math.nan
        except ValueError:
            r = math.nan
        t = f[3].strip()
        if u is None or i is None or not math.isfinite(r) or not INT.fullmatch(t) or abs(int(t)) > I64:
            raise Bad(ln)
        rows.append((u, i, r, int(t)))
    return rows


def ref_users_dat(raw: bytes):
    """Line n = user n: '<count> <item> ...' with count = number of items; no blank lines; ids >= 0."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Bad(raw[: e.start].count(b"\n") + 1) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise Bad(1)
    pairs = []
    toks = [ln.split() for ln in lines]
    for n, t in enumerate(toks, start=1):
        if not t:
            raise Bad(n)
    for n, t in enumerate(toks, start=1):  # the reader names the first bad token before checking counts
        if any(_id(x) is None for x in t):
            raise Bad(n)
    for n, t in enumerate(toks, start=1):
        if int(t[0]) != len(t) - 1:
            raise Bad(n)
        pairs += [(n - 1, int(x)) for x in t[1:]]
    if not pairs:
        raise Bad(1)
    return pairs


def _mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 7))
        pos = int(rng.integers(0, len(raw) + 1))
        junk = JUNK[int(rng.integers(0, len(JUNK)))]
        if op == 0:  # replace one byte
            raw = raw[:pos] + junk + raw[pos + 1:]
        elif op == 1:  # insert
            raw = raw[:pos] + junk + raw[pos:]
        elif op == 2:  # delete a span
            raw = raw[:pos] + raw[pos + int(rng.integers(1, 8)):]
        elif op == 3:  # truncate
            raw = raw[:pos]
        elif op == 4:  # duplicate a line
            lines = raw.split(b"\n")
            k = int(rng.integers(0, len(lines)))
            raw = b"\n".join(lines[:k + 1] + lines[k:])
        elif op == 5:  # swap two lines
            lines = raw.split(b"\n")
            a, b = rng.integers(0, len(lines), size=2)
            lines[a], lines[b] = lines[b], lines[a]
            raw = b"\n".join(lines)
        else:  # CRLF endings
            raw = raw.replace(b"\n", b"\r\n")
    return raw


def _check(reader, ref, raw: bytes, path, seed: int) -> str:
    path.write_bytes(raw)
    try:
        want = ref(raw)
    except Bad as e:
        want = e
    try:
        got = reader(path)
    except DataFormatError as e:
        assert isinstance(want, Bad), f"seed {seed}: reader refused a file the reference reads: {e}\n{raw!r}"
        assert e.path == str(path) and e.line == want.line, f"seed {seed}: {e} (reference: line {want.line})\n{raw!r}"
        return "refused"
    assert not isinstance(want, Bad), f"seed {seed}: reader loaded a file whose line {want.line} is bad\n{raw!r}"
    return got, want


@pytest.mark.parametrize("seed", range(0, 400, 50))
def test_corrupted_movielens_files_load_exactly_or_fail_on_the_first_bad_line(tmp_path, seed):
    rng = np.random.default_rng(seed)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(seed, seed + 50):
        n = int(rng.integers(1, 12))
        clean = b"".join(b"%d\t%d\t%d\t%d\n" % (rng.integers(0, 50), rng.integers(0, 80), rng.integers(1, 6),
                                                 rng.integers(8e8, 9e8)) for _ in range(n))
        out = _check(read_movielens_tab, ref_movielens_tab, _mutate(clean, rng), tmp_path / "u.data", case)
        if out == "refused":
            outcomes["refused"] += 1
            continue
        got, want = out
        outcomes["loaded"] += 1
        u, i, r, t = (np.array(c) for c in zip(*want))
        np.testing.assert_array_equal(got.user, u)
        np.testing.assert_array_equal(got.item, i)
        np.testing.assert_array_equal(got.rating, r.astype(np.float32))
        np.testing.assert_array_equal(got.timestamp, t)
    assert outcomes["refused"] > 5 and outcomes["loaded"] > 5, outcomes  # the fuzzer exercises both outcomes


@pytest.mark.parametrize("seed", range(0, 400, 50))
def test_corrupted_users_dat_files_load_exactly_or_fail_on_the_first_bad_line(tmp_path, seed):
    rng = np.random.default_rng(10_000 + seed)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(seed, seed + 50):
        lines = []
        for _ in range(int(rng.integers(1, 10))):
            items = rng.integers(0, 100, size=int(rng.integers(0, 6)))
            lines.append(" ".join(map(str, [len(items), *items])))
        out = _check(read_users_dat, ref_users_dat, _mutate(("\n".join(lines) + "\n").encode(), rng),
                     tmp_path / "users.dat", case)
        if out == "refused":
            outcomes["refused"] += 1
            continue
        got, want = out
        outcomes["loaded"] += 1
        np.testing.assert_array_equal(np.stack([got.user, got.item], 1), np.array(want).reshape(-1, 2))
    assert outcomes["refused"] > 5 and outcomes["loaded"] > 5, outcomes
