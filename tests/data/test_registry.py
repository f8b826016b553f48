"""Dataset registry: data root resolution, checksums, missing files without network, download via file://."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from rayrec.data import registry
from rayrec.data.readers import READERS
from rayrec.data.registry import DATASETS, DatasetSpec, file_checksum, locate, resolve_data_root
from rayrec.errors import ConfigError, DataFormatError, DatasetNotFoundError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No host is reachable, and any attempt to open a URL fails the test."""
    monkeypatch.setattr(registry, "_network_available", lambda url, timeout_s=2.0: False)

    def _no_urlopen(*a, **k):
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(registry.urllib.request, "urlopen", _no_urlopen)


def test_specs_are_consistent():
    for name, spec in DATASETS.items():
        assert spec.name == name
        assert set(spec.checksums) == set(spec.files)
        assert spec.presplit or spec.reader in READERS
        for c in spec.checksums.values():
            assert c is None or c.split(":")[0] in ("sha256", "md5")
        if spec.archive:
            assert set(spec.members) == set(spec.files) and spec.url
    assert {"citeulike-t", "citeulike-t-derrd", "ml-100k", "ml-1m", "synthetic"} <= set(DATASETS)


def test_resolve_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RAYREC_DATA", str(tmp_path / "env"))
    assert resolve_data_root(str(tmp_path / "arg")) == (tmp_path / "arg").resolve()
    assert resolve_data_root(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("RAYREC_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root(None) == (tmp_path / "data").resolve()


def test_locate_shared_datasets_verifies_checksums(data_root: Path, no_network):
    assert locate("citeulike-t") == data_root / "citeulike-t"  # root from $RAYREC_DATA
    assert locate("ml-100k", str(data_root)) == data_root / "ml-100k"  # md5 of u.data
    assert locate("citeulike-t-derrd") == data_root / "citeulike-t" / "derrd_loo_seed0"
    got = file_checksum(data_root / "citeulike-t" / "users.dat")
    assert got == DATASETS["citeulike-t"].checksums["users.dat"]


def test_checksum_mismatch_is_a_clear_error(tmp_path: Path, no_network):
    (tmp_path / "citeulike-t").mkdir()
    (tmp_path / "citeulike-t" / "users.dat").write_text("1 2\n")
    with pytest.raises(DataFormatError, match="checksum mismatch") as ei:
        locate("citeulike-t", tmp_path)
    assert "users.dat" in str(ei.value) and "expected sha256:02d5d429" in str(ei.value)


def test_missing_files_without_network(tmp_path: Path, no_network):
    with pytest.raises(DatasetNotFoundError) as ei:
        locate("ml-1m", tmp_path, download=True)
    msg = str(ei.value)
    assert "ratings.dat" in msg and str(tmp_path / "ml-1m") in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg and "no network" in msg
    assert not (tmp_path / "ml-1m").exists()  # nothing half-created

    with pytest.raises(DatasetNotFoundError, match="data.download is false") as ei:
        locate("citeulike-t", tmp_path, download=False)
    assert "raw.githubusercontent.com/js05212/citeulike-t" in str(ei.value)


def test_derrd_missing_says_where_to_put_the_files(tmp_path: Path, no_network):
    with pytest.raises(DatasetNotFoundError) as ei:
        locate("citeulike-t-derrd", tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "citeulike-t" / "derrd_loo_seed0") in msg
    assert "train.tsv" in msg and "counts.txt" in msg and "No public download" in msg


def test_unknown_dataset(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        locate("nope", tmp_path)


def _toy_zip(tmp_path: Path, payload: bytes) -> tuple[Path, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("toy/u.data", payload)
        zf.writestr("toy/README", b"readme")
    z = tmp_path / "src" / "toy.zip"
    z.parent.mkdir()
    z.write_bytes(buf.getvalue())
    return z, "md5:" + hashlib.md5(buf.getvalue()).hexdigest()


def test_download_extracts_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    payload = b"1\t2\t5\t100\n"
    z, zip_md5 = _toy_zip(tmp_path, payload)
    spec = DatasetSpec(
        name="toy", reader="movielens_tab", directory="toy", files=("u.data",), url=z.as_uri(),
        checksums={"u.data": "sha256:" + hashlib.sha256(payload).hexdigest()}, archive="zip",
        members={"u.data": "toy/u.data"}, archive_checksum=zip_md5,
    )
    monkeypatch.setitem(DATASETS, "toy", spec)
    root = tmp_path / "root"
    d = locate("toy", root)
    assert (d / "u.data").read_bytes() == payload
    assert sorted(p.name for p in d.iterdir()) == ["u.data"]  # no temp files or archive left behind
    assert locate("toy", root, download=False) == d  # present now: no download needed

    bad = DatasetSpec(**{**spec.__dict__, "name": "toy2", "directory": "toy2", "archive_checksum": "md5:" + "0" * 32})
    monkeypatch.setitem(DATASETS, "toy2", bad)
    with pytest.raises(DataFormatError, match="checksum mismatch"):
        locate("toy2", root)
    assert list((root / "toy2").iterdir()) == []  # the failed download left nothing
