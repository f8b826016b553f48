"""Atomic artifact directories with a manifest written last.

Every artifact that several processes write (rankings, neighbours) goes to a temporary directory beside its
target (``.<name>.tmp-<id>``); when every part is there, :func:`commit_dir` writes ``manifest.json`` (kind, the
caller's fields, and every file's size and sha256) and renames the directory into place. A reader calls
:func:`read_manifest`, which refuses a directory without a complete manifest or with a file that differs from it,
saying which job to rerun. A crash at any point leaves either the previous artifact or the new one, never a mix.

Training checkpoints are directories that Ray Train persists and that several ranks may write into (sharded
tables): each writing rank lists its files in ``manifest.rank<r>.json``, and :func:`upload_checkpoint` (the loop's
``checkpoint_upload_fn``) copies them into storage each under a temporary name, renamed into place, manifests last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from rayrec.errors import ArtifactError

MANIFEST = "manifest.json"


def temp_dir_for(target: str | Path) -> Path:
    """A fresh, empty temporary directory beside ``target`` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_entries(root: Path, skip: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Path (relative to ``root``), size and sha256 of every file under ``root`` whose name ``skip`` rejects not."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not skip(p.name))
    return [{"path": str(p.relative_to(root)), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files]


def _first_changed(root: Path, entries: list[dict[str, Any]], verify: bool) -> Path | None:
    """The first listed file that is missing or differs in size (``verify``: or in sha256), else None."""
    for f in entries:
        p = root / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or (verify and _sha256(p) != f["sha256"]):
            return p
    return None


def commit_dir(tmp: str | Path, target: str | Path, kind: str, fields: dict[str, Any]) -> Path:
    """Write the manifest of ``tmp`` (last) and rename ``tmp`` to ``target``, replacing an older ``target``."""
    tmp, target = Path(tmp), Path(target)
    manifest = {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": _file_entries(tmp, lambda name: name == MANIFEST),
    }
    part = tmp / f".{MANIFEST}.part"
    part.write_text(json.dumps(manifest, indent=1, default=str))
    os.rename(part, tmp / MANIFEST)
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    return target


def read_manifest(directory: str | Path, kind: str, rerun: str, verify: bool = False) -> dict[str, Any]:
    """The manifest of a committed artifact of ``kind``; :class:`ArtifactError` naming ``rerun`` otherwise.

    ``verify`` also re-hashes every listed file (sizes are always checked).
    """
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d}: {kind} not found; run {rerun}")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ArtifactError(f"{d}: no complete {MANIFEST}, so not a finished {kind}; run {rerun} again") from None
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{d}: holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    changed = _first_changed(d, manifest.get("files", []), verify)
    if changed is not None:
        raise ArtifactError(f"{changed}: missing or changed since its manifest was written; run {rerun} again")
    return manifest


def write_dir(target: str | Path, kind: str, fields: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary directory beside ``target``, then :func:`commit_dir`; on any failure the
    temporary directory is removed and ``target`` is left as it was."""
    tmp = temp_dir_for(target)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_dir(tmp, target, kind, fields)


# --------------------------------------------------------------------------------------------- checkpoints
# A Ray Train checkpoint is the union of the directories its writing ranks reported (rank 0 for a dense model,
# every rank for sharded tables). Each writing rank lists its own files in ``manifest.rank<r>.json``, written last
# into its directory; a checkpoint is complete when the manifests of all its writers are there and match.
CKPT_MANIFEST_GLOB = "manifest.rank*.json"


def write_checkpoint_manifest(d: str | Path, rank: int, writers: int, fields: dict[str, Any] | None = None) -> None:
    """List (size, sha256) every file this rank wrote into checkpoint directory ``d``; call it last."""
    d = Path(d)
    manifest = {"kind": "checkpoint", "rank": rank, "writers": writers, **(fields or {}),
                "files": _file_entries(d, lambda name: name.startswith(("manifest.rank", ".manifest")))}
    part = d / f".manifest.rank{rank}.json.part"
    part.write_text(json.dumps(manifest, indent=1, default=str))
    os.rename(part, d / f"manifest.rank{rank}.json")


def check_checkpoint(directory: str | Path, rerun: str, verify: bool = False) -> list[dict[str, Any]]:
    """The rank manifests of a complete checkpoint; :class:`ArtifactError` naming ``rerun`` otherwise (missing
    directory, no manifest, a writing rank's manifest missing, a listed file missing or of another size; ``verify``
    also re-hashes every file)."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d}: checkpoint not found; run {rerun}")
    manifests = []
    for p in sorted(d.glob(CKPT_MANIFEST_GLOB)):
        try:
            manifests.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            raise ArtifactError(f"{p}: unreadable checkpoint manifest; run {rerun} again") from None
    if not manifests:
        raise ArtifactError(f"{d}: no {CKPT_MANIFEST_GLOB}, so not a complete checkpoint (interrupted while it was "
                            f"written, or written by a rayrec without checkpoint manifests); run {rerun} again")
    writers = manifests[0].get("writers", 1)
    if len(manifests) != writers:
        raise ArtifactError(f"{d}: manifests of {len(manifests)} of its {writers} writing ranks, so an incomplete "
                            f"checkpoint; run {rerun} again")
    for m in manifests:
        changed = _first_changed(d, m.get("files", []), verify)
        if changed is not None:
            raise ArtifactError(f"{changed}: missing or changed since rank {m['rank']} wrote the checkpoint; run "
                                f"{rerun} again")
    return manifests


def copy_renaming(src: str | Path, dst: str | Path) -> None:
    """Copy every file under ``src`` into ``dst`` (created, possibly shared with other writers) each under a
    temporary name first and renamed into place, the ``manifest.rank*.json`` files last: a reader never sees a
    partly written file under its final name, nor a manifest before the files it lists."""
    src, dst = Path(src), Path(dst)
    files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.name.startswith("manifest.rank"), str(p)))
    for p in files:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(p, part)
        os.replace(part, target)


def upload_checkpoint(checkpoint, dir_name: str):
    """Ray Train ``checkpoint_upload_fn``: persist a reported checkpoint directory into the run's storage with
    :func:`copy_renaming` when the storage is a local (or mounted shared) filesystem; other filesystems (object
    stores, which have no rename) keep Ray's own copy, where the manifests written last still guard readers."""
    import pyarrow.fs
    import ray.train
    from ray.train import Checkpoint

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return storage.persist_current_checkpoint(checkpoint, dir_name)
    dest = storage.build_checkpoint_path_from_name(dir_name)
    copy_renaming(checkpoint.path, dest)
    return Checkpoint(path=dest, filesystem=storage.storage_filesystem)
