"""prepare / load_prepared: counts, layout, traceability, no-op rebuild, atomicity, and errors leaving no output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayrec.config import DataConfig
from rayrec.data import prepared as P
from rayrec.data.prepared import load_prepared, prepare
from rayrec.data.readers import read_users_dat
from rayrec.data.synthetic import generate_synthetic
from rayrec.errors import ArtifactError, ConfigError, DataFormatError, SplitError


@pytest.fixture(scope="module")
def citeulike_loo(shared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("prepared")
    log: list[str] = []
    cfg = DataConfig(dataset="citeulike-t", root=str(shared_root), min_user_interactions=5, split="loo")
    return prepare(cfg, root, progress=log.append), root, log


def _no_leftovers(prepared_root: Path) -> None:
    assert not prepared_root.exists() or list(prepared_root.iterdir()) == [], list(prepared_root.iterdir())


def test_citeulike_loo_layout_and_counts(citeulike_loo):
    path, root, log = citeulike_loo
    assert path.parent == root and path.name.startswith("citeulike-t__loo__")
    for rel in ("manifest.json", "train/part-00000.parquet", "valid/part-00000.parquet", "test/part-00000.parquet",
                "negatives.parquet", "user_map.parquet", "item_map.parquet"):
        assert (path / rel).is_file(), rel
    m = json.loads((path / "manifest.json").read_text())
    assert m["counts"] == {"users": 5_219, "items": 25_181, "interactions": 125_580, "train": 115_142,
                           "valid": 5_219, "test": 5_219, "users_without_valid": 0, "users_without_test": 0}
    assert m["format_version"] == P.FORMAT_VERSION and m["num_eval_negatives"] == 499
    assert m["params"]["min_user_interactions"] == 5 and m["params"]["seed"] == 0
    assert m["source"]["files"] == [{"path": "citeulike-t/users.dat",
                                     "sha256": "02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf"}]
    assert any("k-core" in line and "5,219 users" in line for line in log)
    assert any("written" in line for line in log)
    schema = pq.read_schema(path / "negatives.parquet")
    items_type = schema.field("items").type
    assert items_type.list_size == 499 and items_type.value_type == pa.int64()
    assert pq.read_table(path / "train").num_rows == 115_142  # a split directory reads as one table


def test_load_prepared_negatives_and_csr(citeulike_loo):
    d = load_prepared(citeulike_loo[0])
    assert (d.num_users, d.num_items, len(d.train_user), len(d.valid_item), len(d.test_item)) == (
        5_219, 25_181, 115_142, 5_219, 5_219)
    assert d.negatives.shape == (5_219, 499)
    indptr, indices = d.csr(("train", "valid", "test"))
    assert indptr[-1] == 125_580
    for u in range(0, 5_219, 97):
        row = indices[indptr[u]: indptr[u + 1]]
        assert (np.diff(row) > 0).all()  # sorted per user
        assert not np.isin(d.negatives[u], row).any()  # never an interacted item (train, valid or test)
    keys = np.repeat(np.arange(d.num_users), np.diff(indptr)) * d.num_items + indices
    assert not np.isin(np.repeat(np.arange(d.num_users), 499) * d.num_items + d.negatives.ravel(), keys).any()
    assert d.split_path("train") == d.path / "train"


def test_remap_traceability(citeulike_loo, shared_root: Path):
    d = load_prepared(citeulike_loo[0])
    user_raw, item_raw = d.user_raw(), d.item_raw()
    raw = read_users_dat(shared_root / "citeulike-t" / "users.dat")
    raw_keys = set((raw.user * 100_000 + raw.item).tolist())
    for split in ("train", "valid", "test"):
        u, i = getattr(d, f"{split}_user"), getattr(d, f"{split}_item")
        back = user_raw[u] * 100_000 + item_raw[i]  # every prepared row is a row of users.dat
        assert set(back.tolist()) <= raw_keys
    # ids by first appearance: user 0 is the first line with >= 5 items, item 0 its first item
    lines = (shared_root / "citeulike-t" / "users.dat").read_text().splitlines()
    first = next(n for n, line in enumerate(lines) if int(line.split()[0]) >= 5)
    assert user_raw[0] == first and item_raw[0] == int(lines[first].split()[1])
    assert np.all(np.diff(user_raw) > 0)  # users.dat users appear in line order


def test_second_prepare_is_a_noop(citeulike_loo, shared_root: Path):
    path, root, _ = citeulike_loo
    before = (path / "manifest.json").stat().st_mtime_ns
    log: list[str] = []
    cfg = DataConfig(dataset="citeulike-t", root=str(shared_root), min_user_interactions=5, split="loo")
    assert prepare(cfg, root, progress=log.append) == path
    assert (path / "manifest.json").stat().st_mtime_ns == before
    assert log == [f"[data] {path.name}: up to date"]


def test_params_change_the_target(citeulike_loo, shared_root: Path, tmp_path: Path):
    cfg = DataConfig(dataset="citeulike-t", root=str(shared_root), min_user_interactions=5, split="loo", seed=1,
                     num_eval_negatives=0)
    p = prepare(cfg, tmp_path, progress=lambda s: None)
    assert p.name != citeulike_loo[0].name
    d = load_prepared(p)
    assert d.negatives is None and not (p / "negatives.parquet").exists()
    assert not np.array_equal(d.test_item, load_prepared(citeulike_loo[0]).test_item)


def test_ratio_split_prepared(data_root: Path, tmp_path: Path):
    cfg = DataConfig(dataset="citeulike-t", min_user_interactions=5, split="ratio", order="file",
                     ratios=[0.8, 0.1, 0.1], num_eval_negatives=0)
    m = json.loads((prepare(cfg, tmp_path, progress=lambda s: None) / "manifest.json").read_text())
    assert (m["counts"]["train"], m["counts"]["valid"], m["counts"]["test"]) == (98_405, 12_451, 14_724)
    assert m["counts"]["users_without_valid"] == 701 and m["params"]["ratios"] == [0.8, 0.1, 0.1]


def test_derrd_prepared(data_root: Path, tmp_path: Path):
    cfg = DataConfig(dataset="citeulike-t-derrd", split="derrd", num_eval_negatives=99, min_user_interactions=5)
    log: list[str] = []
    d = load_prepared(prepare(cfg, tmp_path, progress=log.append))
    assert (d.num_users, d.num_items, len(d.train_user), len(d.valid_user), len(d.test_user)) == (
        5_220, 25_182, 115_142, 5_219, 5_219)
    np.testing.assert_array_equal(d.user_raw(), np.arange(5_220))  # identity maps
    np.testing.assert_array_equal(d.item_raw(), np.arange(25_182))
    assert d.negatives.shape == (5_220, 99)  # the phantom user 5219 gets a row too
    assert d.manifest["counts"]["users_without_valid"] == 0
    assert any("ignoring min_user_interactions=5" in line for line in log)
    with pytest.raises(ConfigError, match="published split"):
        prepare(DataConfig(dataset="citeulike-t-derrd", split="loo"), tmp_path)


def test_ml100k_time_loo(data_root: Path, tmp_path: Path):
    cfg = DataConfig(dataset="ml-100k", rating_threshold=4.0, min_user_interactions=5, split="loo", order="time",
                     num_eval_negatives=99)
    d = load_prepared(prepare(cfg, tmp_path, progress=lambda s: None))
    assert d.manifest["counts"]["valid"] == d.num_users == 938
    ts = pq.read_table(d.path / "test").column("timestamp").to_numpy()
    tr = pq.read_table(d.path / "train", columns=["user", "timestamp"])
    latest_train = np.zeros(d.num_users, dtype=np.int64)
    np.maximum.at(latest_train, tr.column("user").to_numpy(), tr.column("timestamp").to_numpy())
    assert (ts >= latest_train[pq.read_table(d.path / "test").column("user").to_numpy()]).all()


# --------------------------------------------------------------------------------------------- errors: no output
@pytest.mark.parametrize(
    "text, error, snippet",
    [
        ("3 1 2 3\n2 4 x\n", DataFormatError, "users.dat:2:"),  # non-integer id
        ("3 1 2 3\n2 4 -5\n", DataFormatError, "users.dat:2:"),  # negative id
        ("3 1 2 3\n4 1 2\n", DataFormatError, "users.dat:2:"),  # count mismatch
        ("", DataFormatError, "users.dat:1:"),  # empty file
        ("3 1 2 3\n2 1 2\n", SplitError, "user 1 (raw id"),  # a user with no training item after the split
    ],
)
def test_bad_input_leaves_no_output(tmp_path: Path, write, text, error, snippet):
    write("raw/users.dat", text)
    cfg = DataConfig(dataset="files", root=str(tmp_path / "raw"), files=["users.dat"], reader="users_dat",
                     num_eval_negatives=0)
    out = tmp_path / "prepared"
    with pytest.raises(error) as ei:
        prepare(cfg, out, progress=lambda s: None)
    assert snippet in str(ei.value)
    _no_leftovers(out)


def test_failure_while_writing_is_atomic(tmp_path: Path, write, monkeypatch: pytest.MonkeyPatch):
    write("raw/users.dat", "3 1 2 3\n3 2 3 4\n3 1 3 4\n")
    cfg = DataConfig(dataset="files", root=str(tmp_path / "raw"), files=["users.dat"], reader="users_dat",
                     num_eval_negatives=1)

    def boom(path: Path, negatives: np.ndarray) -> None:
        (path.parent / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(P, "_write_negatives", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(cfg, tmp_path / "prepared", progress=lambda s: None)
    _no_leftovers(tmp_path / "prepared")
    monkeypatch.undo()
    p = prepare(cfg, tmp_path / "prepared", progress=lambda s: None)
    assert [c.name for c in (tmp_path / "prepared").iterdir()] == [p.name]
    assert load_prepared(p).negatives.shape == (3, 1)


def test_corrupt_target_is_rebuilt(tmp_path: Path, write):
    write("raw/users.dat", "3 1 2 3\n3 2 3 4\n3 1 3 4\n")
    cfg = DataConfig(dataset="files", root=str(tmp_path / "raw"), files=["users.dat"], reader="users_dat",
                     num_eval_negatives=0)
    p = prepare(cfg, tmp_path / "prepared", progress=lambda s: None)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="no readable manifest.json"):
        load_prepared(p)
    assert prepare(cfg, tmp_path / "prepared", progress=lambda s: None) == p
    assert load_prepared(p).num_users == 3
    assert [c.name for c in (tmp_path / "prepared").iterdir()] == [p.name]


def test_load_prepared_errors(tmp_path: Path, write):
    with pytest.raises(ArtifactError, match="prepared dataset not found"):
        load_prepared(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_prepared(tmp_path / "empty")
    write("raw/users.dat", "3 1 2 3\n3 2 3 4\n3 1 3 4\n")
    cfg = DataConfig(dataset="files", root=str(tmp_path / "raw"), files=["users.dat"], reader="users_dat")
    with pytest.raises(SplitError, match="non-interacted items"):  # 4 items, 499 negatives asked
        prepare(cfg, tmp_path / "prepared", progress=lambda s: None)
    cfg.num_eval_negatives = 0
    p = prepare(cfg, tmp_path / "prepared", progress=lambda s: None)
    (p / "valid" / "part-00000.parquet").unlink()
    with pytest.raises(ArtifactError, match="valid"):
        load_prepared(p)


def test_candidates_that_include_a_positive_are_refused(citeulike_loo, tmp_path: Path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad_candidates"
    shutil.copytree(citeulike_loo[0], bad)
    pd = load_prepared(bad)
    negatives = pd.negatives.copy()
    negatives[7, 3] = pd.test_item[pd.test_user == 7][0]  # user 7's held-out test item among its candidates
    t = pq.read_table(bad / "negatives.parquet")
    items = pa.FixedSizeListArray.from_arrays(pa.array(negatives.reshape(-1)), negatives.shape[1])
    pq.write_table(t.set_column(t.schema.get_field_index("items"), "items", items), bad / "negatives.parquet")
    with pytest.raises(ArtifactError, match=r"negatives.parquet: user 7's evaluation candidates include item \d+, "
                                            r"one of its positives"):
        load_prepared(bad)


def test_config_errors(tmp_path: Path, data_root: Path):
    with pytest.raises(ConfigError, match="data.files"):
        prepare(DataConfig(dataset="files"), tmp_path)
    with pytest.raises(ConfigError, match="data.reader"):
        prepare(DataConfig(dataset="files", files=["citeulike-t/users.dat"]), tmp_path)
    with pytest.raises(ConfigError, match="no ratings"):
        prepare(DataConfig(dataset="citeulike-t", rating_threshold=1.0), tmp_path)
    _no_leftovers(tmp_path)


# --------------------------------------------------------------------------------------------- synthetic source
def test_synthetic_through_files_and_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    m = generate_synthetic(tmp_path / "root" / "synthetic", num_users=300, num_items=400, num_interactions=6_000,
                           num_clusters=4, shard_rows=2_000)
    monkeypatch.setenv("RAYREC_DATA", str(tmp_path / "root"))
    a = prepare(DataConfig(dataset="files", files=["synthetic"], reader="parquet", order="time",
                           num_eval_negatives=20), tmp_path / "prepared", progress=lambda s: None)
    b = prepare(DataConfig(dataset="synthetic", order="time", num_eval_negatives=20), tmp_path / "prepared",
                progress=lambda s: None)
    da, db = load_prepared(a), load_prepared(b)
    assert da.manifest["counts"]["interactions"] == db.manifest["counts"]["interactions"] == m["counts"]["interactions"]
    np.testing.assert_array_equal(da.test_item, db.test_item)
    assert len(da.manifest["source"]["files"]) == m["counts"]["parts"]  # every part file is hashed
