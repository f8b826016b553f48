"""Known datasets: where their files live under the data root, how to read them, and where they come from.

Data root resolution (:func:`resolve_data_root`): the explicit argument (``DataConfig.root``), else
``$RAYREC_DATA``, else ``./data``. A dataset lives in ``<root>/<spec.directory>/`` and consists of
``spec.files``. :func:`locate` checks that every file is there and matches its recorded checksum, and downloads
missing files from the official URL when that is allowed and a network is reachable (temp file + checksum +
rename, so a half-written download is never taken for data). Datasets are never copied into the repository.

Checksums are ``"sha256:<hex>"`` or ``"md5:<hex>"``; ``None`` means "not known offline": the file is then
accepted unverified (and for an archive download, the archive's own checksum is still checked when known).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from rayrec.errors import ConfigError, DataFormatError, DatasetNotFoundError

__all__ = ["DatasetSpec", "DATASETS", "resolve_data_root", "locate", "file_checksum", "verify_checksum"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the registry.

    ``files`` are relative to ``<root>/<directory>``. ``read_path`` is what the reader is given (relative to the
    same directory; default ``files[0]``; ``"."`` = the directory itself, e.g. a directory of parquet parts).
    ``presplit`` datasets (DE-RRD's published split) are not read by a reader but by ``splits.load_derrd_split``.
    """

    name: str
    reader: str | None  # key of readers.READERS; None for presplit datasets
    directory: str  # relative to the data root
    files: tuple[str, ...]  # relative to `directory`
    url: str | None  # official download (a file, or an archive when `archive` is set); None = no download
    checksums: dict[str, str | None]  # per file: "sha256:<hex>" | "md5:<hex>" | None (unknown: not verified)
    archive: str | None = None  # "zip" when `url` is an archive
    members: dict[str, str] = field(default_factory=dict)  # file -> member path inside the archive
    archive_checksum: str | None = None  # checksum of the archive itself ("md5:<hex>" as published)
    read_path: str | None = None  # what the reader reads (default files[0])
    presplit: bool = False
    citation: str = ""
    licence: str = ""
    how_to_get: str = ""  # printed when the files are missing and cannot be downloaded

    @property
    def reader_target(self) -> str:
        return self.read_path if self.read_path is not None else self.files[0]


_GROUPLENS_CITATION = (
    "F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and Context. "
    "ACM Transactions on Interactive Intelligent Systems 5, 4, Article 19."
)
_GROUPLENS_LICENCE = (
    "GroupLens terms (README in the archive): research use only, cite the paper, no redistribution without "
    "permission, no commercial use. Do not ship the files inside a package or repository."
)
_CITEULIKE_CITATION = (
    "Hao Wang, Binyi Chen and Wu-Jun Li. 2013. Collaborative Topic Regression with Social Regularization "
    "for Tag Recommendation. IJCAI 2013."
)

DATASETS: dict[str, DatasetSpec] = {
    "citeulike-t": DatasetSpec(
        name="citeulike-t",
        reader="users_dat",
        directory="citeulike-t",
        files=("users.dat",),
        url="https://raw.githubusercontent.com/js05212/citeulike-t/master/users.dat",
        checksums={"users.dat": "sha256:02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf"},
        citation=_CITEULIKE_CITATION,
        licence="No licence stated by js05212/citeulike-t; cite Wang, Chen & Li (IJCAI 2013).",
    ),
    "citeulike-t-derrd": DatasetSpec(
        name="citeulike-t-derrd",
        reader=None,
        directory="citeulike-t/derrd_loo_seed0",
        files=("train.tsv", "valid.tsv", "test.tsv", "counts.txt"),
        url=None,
        checksums={
            "train.tsv": "sha256:6f399c3f0214f6e057e27e46fe14280f1cb105c6a4ba7129de5a65073617216c",
            "valid.tsv": "sha256:6381da3c6acf0a2d154800aac9c1a20449c0b2dfb3d6d478abe860d85e7f1df5",
            "test.tsv": "sha256:f07a00a65f10633b9830f338c7a8d184a44681b0d92e3a6d48c1ad58102b8677",
            "counts.txt": "sha256:366019b617372338735587ddf80bdd4faf325911cf3f822495a2b3edf2a30502",
        },
        read_path=".",
        presplit=True,
        citation="S. Kang, J. Hwang, W. Kweon, H. Yu. 2020. DE-RRD: A Knowledge Distillation Framework for "
        "Recommender System. CIKM 2020. Data: " + _CITEULIKE_CITATION,
        licence="Split from GitHub SeongKu-Kang/DE-RRD_CIKM20 (GPL-2.0); underlying data: citeulike-t "
        "(no licence stated).",
        how_to_get=(
            "No public download exists in this form. Convert the pickles Dataset/citeULike/LOO/"
            "{train_mat_0,valid_sample_0,test_sample_0,counts} of GitHub SeongKu-Kang/DE-RRD_CIKM20 "
            "(commit 97b6bf6f) to 'user<TAB>item' lines (train.tsv, valid.tsv, test.tsv) and counts.txt "
            "('user_count<TAB>5220', 'item_count<TAB>25182'), and put the four files in that directory."
        ),
    ),
    "ml-100k": DatasetSpec(
        name="ml-100k",
        reader="movielens_tab",
        directory="ml-100k",
        files=("u.data",),
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        checksums={"u.data": "md5:6e47046882bad158b0efbb84cd5cb987"},
        archive="zip",
        members={"u.data": "ml-100k/u.data"},
        # GroupLens' published ml-100k.zip.md5 (identical in many independent public loaders; not re-downloaded here)
        archive_checksum="md5:0e33842e24a9c977be4e0107933c0723",
        citation=_GROUPLENS_CITATION,
        licence=_GROUPLENS_LICENCE,
    ),
    "ml-1m": DatasetSpec(
        name="ml-1m",
        reader="movielens_dcolon",
        directory="ml-1m",
        files=("ratings.dat",),
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        # The extracted ratings.dat has no checksum known offline: a present file is accepted unverified.
        checksums={"ratings.dat": None},
        archive="zip",
        members={"ratings.dat": "ml-1m/ratings.dat"},
        # GroupLens' published ml-1m.zip.md5, cross-checked in several independent public loaders (not downloaded
        # here): a download is verified against it before ratings.dat is extracted.
        archive_checksum="md5:c4d9eecfca2ab87c1945afe126590906",
        citation=_GROUPLENS_CITATION,
        licence=_GROUPLENS_LICENCE,
    ),
    "synthetic": DatasetSpec(
        name="synthetic",
        reader="parquet",
        directory="synthetic",
        files=("manifest.json",),
        url=None,
        checksums={"manifest.json": None},
        read_path=".",
        citation="Generated by rayrec.data.synthetic.generate_synthetic (planted user/item clusters).",
        licence="Generated data; no restrictions.",
        how_to_get=(
            "Generate it: python -c \"from rayrec.data.synthetic import generate_synthetic; "
            "generate_synthetic('<root>/synthetic', num_users=..., num_items=..., num_interactions=...)\""
        ),
    ),
}


# --------------------------------------------------------------------------------------------- roots + checksums
def resolve_data_root(root: str | Path | None = None) -> Path:
    """The data root: ``root`` if given, else ``$RAYREC_DATA``, else ``./data`` (absolute, ``~`` expanded)."""
    if root is None or str(root) == "":
        root = os.environ.get("RAYREC_DATA") or "data"
    return Path(os.path.expanduser(str(root))).resolve()


def file_checksum(path: str | Path, algo: str = "sha256") -> str:
    """``"<algo>:<hex>"`` of a file, read in 1 MiB blocks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{algo}:{h.hexdigest()}"


def verify_checksum(path: str | Path, expected: str | None) -> None:
    """Raise :class:`DataFormatError` when ``path`` does not match ``expected`` (None: nothing to verify)."""
    if expected is None:
        return
    algo, _, want = expected.partition(":")
    if algo not in ("sha256", "md5") or not want:
        raise ValueError(f"bad checksum spec {expected!r}: expected 'sha256:<hex>' or 'md5:<hex>'")
    got = file_checksum(path, algo)
    if got != expected:
        raise DataFormatError(
            path, None,
            f"checksum mismatch: expected {expected}, got {got}. The file is corrupt, truncated or a different "
            "version; delete it to download it again (or put the official file in its place).",
        )


# --------------------------------------------------------------------------------------------- locate + download
def _network_available(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout_s`` (file:// URLs always count as reachable)."""
    u = urllib.parse.urlparse(url)
    if u.scheme == "file":
        return True
    if not u.hostname:
        return False
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _download(url: str, dest: Path, timeout_s: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` through a temp file in the same directory (renamed only when complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch(spec: DatasetSpec, directory: Path, missing: list[str]) -> None:
    """Download ``missing`` files of ``spec`` into ``directory`` (verifying archive and file checksums)."""
    assert spec.url is not None
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-download-", dir=directory) as tmpd:
        tmp = Path(tmpd)
        if spec.archive is None:
            if len(spec.files) != 1:
                raise ValueError(f"dataset {spec.name}: a plain-file URL must describe exactly one file")
            _download(spec.url, tmp / spec.files[0])
            extracted = {spec.files[0]: tmp / spec.files[0]}
        elif spec.archive == "zip":
            archive = tmp / Path(urllib.parse.urlparse(spec.url).path).name
            _download(spec.url, archive)
            verify_checksum(archive, spec.archive_checksum)
            extracted = {}
            with zipfile.ZipFile(archive) as zf:
                for rel in missing:
                    member = spec.members[rel]
                    out = tmp / "extract" / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 20)
                    extracted[rel] = out
        else:
            raise ValueError(f"dataset {spec.name}: unsupported archive type {spec.archive!r}")
        for rel in missing:
            verify_checksum(extracted[rel], spec.checksums[rel])
            target = directory / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(extracted[rel], target)


def _missing_message(spec: DatasetSpec, directory: Path, root: Path, missing: list[str], why: str) -> str:
    lines = [
        f"dataset '{spec.name}': missing {', '.join(missing)} in {directory}",
        f"  data root: {root} (from data.root, else $RAYREC_DATA, else ./data)",
    ]
    if spec.url is not None:
        where = f" (archive member {', '.join(spec.members[m] for m in missing)})" if spec.archive else ""
        lines.append(f"  official download: {spec.url}{where}")
        lines.append(f"  not downloaded: {why}. Download it yourself and put the file(s) at "
                     + ", ".join(str(directory / m) for m in missing))
    if spec.how_to_get:
        lines.append(f"  {spec.how_to_get.replace('<root>', str(root))}")
    return "\n".join(lines)


def locate(name: str, root: str | Path | None = None, download: bool = True) -> Path:
    """The directory of dataset ``name`` under the data root, with every file present and verified.

    Present files are checked against their recorded checksums (mismatch -> :class:`DataFormatError`). Missing
    files are downloaded when ``download`` is true, the dataset has a URL and its host is reachable (short socket
    check); otherwise :class:`DatasetNotFoundError` lists the missing files, where they were looked for and the URL.
    """
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))}, or 'files')")
    spec = DATASETS[name]
    data_root = resolve_data_root(root)
    directory = data_root / spec.directory
    missing = [f for f in spec.files if not (directory / f).is_file()]
    for f in spec.files:
        if f not in missing:
            verify_checksum(directory / f, spec.checksums[f])
    if not missing:
        return directory
    if spec.url is None:
        raise DatasetNotFoundError(_missing_message(spec, directory, data_root, missing, "no download URL"))
    if not download:
        raise DatasetNotFoundError(_missing_message(spec, directory, data_root, missing, "data.download is false"))
    if not _network_available(spec.url):
        raise DatasetNotFoundError(
            _missing_message(spec, directory, data_root, missing, f"no network ({spec.url} is unreachable)")
        )
    _fetch(spec, directory, missing)
    return directory
