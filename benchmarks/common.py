"""Helpers shared by benchmark scripts: machine description, commit, result file writing.

Result files follow ``../shared/docs/results.md``: ``benchmark, command, commit, created, machine, rows``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted code), or ``RAYREC_COMMIT`` where set: a copy of the tree
    on another machine may carry no ``.git``, or a stale one."""
    if os.environ.get("RAYREC_COMMIT"):
        return os.environ["RAYREC_COMMIT"]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "rayrec", "jobs", "configs", "benchmarks/*.py"], cwd=REPO, text=True).strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout (e.g. a copy of the tree on a GPU machine)
        return "unknown"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for mod in ("torchrec", "ray"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a result: ``script`` with ``argv`` (default: this process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["RAYREC_DATA=../shared/data", ".venv/bin/python",
                                               os.path.relpath(script, REPO), *args])


def write_result(name: str, rows: list[dict], command: str, path: Path | None = None,
                 commit_sha: str | None = None) -> Path:
    """Write a result file atomically. Pass ``commit_sha`` captured when the run *started*."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "command": command,
        "commit": commit_sha or commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rows": rows,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_table_result(name: str, rows: list[dict], command: str, path: Path, commit_sha: str, header: list[str],
                       cells, footer: str = "") -> Path:
    """:func:`write_result` plus the markdown beside it (``path`` with ``.md``): a table of ``header`` with one
    line of ``cells(row)`` per row, then ``footer``; the table is also printed."""
    write_result(name, rows, command=command, path=path, commit_sha=commit_sha)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    text = "\n".join(lines) + "\n" + (f"\n{footer}\n" if footer else "")
    path.with_suffix(".md").write_text(text)
    print(text)
    return path


def run_precisions(runs: list[dict], sections: list[str]) -> list[list[str]] | None:
    """Per run (seed), the precisions (``fp32`` | ``bf16``) of the projector/expert matmuls of the config sections
    ``sections`` (e.g. ``["nkd", "cpd"]``); None for a method without any."""
    if not sections:
        return None
    return [sorted({r["config"].get("distill", {}).get(k, {}).get("precision", "fp32") for k in sections})
            for r in runs]


def precision_label(row: dict, has_projectors: bool = False) -> str:
    """A row's projector precision over its seeds: ``fp32``, ``bf16``, ``fp32 (seed 0), bf16 (seeds 1, 2)``. Seeds
    (or a whole row) recorded before the key existed ran in fp32; empty for a method without projectors."""
    per_seed = row["extra"].get("precision")
    if not per_seed:
        return "fp32" if has_projectors else ""
    by: dict[str, list[int]] = {}
    for seed, p in zip(row["seeds"], per_seed):
        by.setdefault("+".join(p or ["fp32"]), []).append(seed)
    if len(by) == 1:
        return next(iter(by))
    return ", ".join(f"{p} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})"
                     for p, v in by.items())


def _refuse_mixed(name: str, docs: list[dict], key, what: str, hint: str) -> None:
    """ValueError naming the parts if rows of one label give different ``key(row)`` values (None: not compared)."""
    groups: dict[str, dict[str, list[str]]] = {}  # label -> key value (as JSON) -> parts
    for d in docs:
        for r in d["rows"]:
            if (value := key(r)) is not None:
                groups.setdefault(r["label"], {}).setdefault(json.dumps(value, sort_keys=True), []).append(d["_file"])
    mixed = {label: list(v.values()) for label, v in groups.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"{name}: {what}, e.g. " + "; ".join(
            f"{label}: " + " vs ".join(str(g) for g in parts) for label, parts in mixed.items()) + f". {hint}")


def _drop_unread_teachers(docs: list[dict]) -> None:
    """Leave out the teacher rows of parts whose student rows are all ``method: none`` (they read no teacher) where
    other parts carry that teacher row; record the dropped labels in ``d["_unused"]`` (see :func:`aggregate_parts`)."""
    def teacher_free(d: dict) -> bool:
        students = [r for r in d["rows"] if not r["label"].endswith("_teacher")]
        return bool(students) and all(r.get("method") == "none" for r in students)

    read = {r["label"] for d in docs if not teacher_free(d) for r in d["rows"] if r["label"].endswith("_teacher")}
    for d in docs:
        if teacher_free(d) and (unused := [r["label"] for r in d["rows"] if r["label"] in read]):
            d["rows"] = [r for r in d["rows"] if r["label"] not in read]
            d["_unused"] = unused


def aggregate_parts(name: str, keys: list[str], markdown, command: str, expected: list[str], min_seeds: int = 3) -> Path:
    """Merge the rows of every part file ``results/<name>_*.json`` (runs of one benchmark made by separate
    commands, e.g. one seed or method per session) into ``results/<name>.json`` + ``.md``.

    Rows with the same label are combined seed by seed from their ``extra.per_seed`` metrics (a seed measured in
    several parts: the newest part wins); ``metrics``/``metrics_std`` are recomputed over the seeds, timings
    averaged weighted by seeds. ``parts`` lists every part with its command and commit, so each number still
    points at the command that measured it. Rows follow ``expected`` (labels); ``missing`` names the expected rows
    absent or with fewer than ``min_seeds`` seeds (the teacher: one; ``extra.complete`` per row).

    Every part distilled the teacher of its ``<model>_teacher`` row: parts whose teacher rows differ in any metric
    are refused (ValueError naming them), since their students would be compared across different teachers. A
    teacher retrained bit for bit (same commit, seed and world size) has the same metrics and passes. Likewise, parts
    whose rows of one label record different ``extra.method_config`` (the method's weights) are refused; parts from
    before that key are merged unchecked.

    One exception: a part whose student rows are all the student alone (``method: none``) read no teacher; when
    other parts carry a ``<model>_teacher`` row, its own teacher row of that model is left out (neither compared nor
    merged; ``parts`` marks it ``teacher_row_unused``), so a retrained teacher needs no rerun of the student alone."""
    import statistics

    parts = sorted(p for p in RESULTS.glob(f"{name}_*.json"))
    docs = sorted((json.loads(p.read_text()) | {"_file": p.name} for p in parts), key=lambda d: d["created"])
    _drop_unread_teachers(docs)
    # every part distilled the same teacher (teacher rows equal) and ran each row with the same weights
    _refuse_mixed(name, docs, lambda r: (r["extra"].get("per_seed") or r["metrics"]) if r["label"].endswith("_teacher")
                  else None, "parts distilled different teachers (teacher rows differ)",
                  "Move the parts of the other teacher out of benchmarks/results/ (e.g. to superseded/)")
    _refuse_mixed(name, docs, lambda r: r["extra"].get("method_config"),
                  "parts ran one row with different method settings (extra.method_config)",
                  "Move the parts of the other setting to superseded/")
    merged: dict[str, dict] = {}
    for d in docs:
        for r in d["rows"]:
            m = merged.setdefault(r["label"], {"row": r, "seeds": {}, "timing": {}, "extra": {}})
            per_seed = r["extra"].get("per_seed") or [r["metrics"]]
            for i, (seed, ms) in enumerate(zip(r["seeds"], per_seed)):
                best = r["extra"].get("best_epochs", [None] * len(r["seeds"]))[i]
                prec = (r["extra"].get("precision") or [None] * len(r["seeds"]))[i]  # a part may predate the key
                m["seeds"][seed] = {"metrics": ms, "timing": r["timing"], "best_epoch": best, "part": d["_file"],
                                    "precision": prec}
            m["row"] = r  # newest row's descriptive fields
    rows = []
    for label, m in merged.items():
        seeds = sorted(m["seeds"])
        runs = [m["seeds"][s] for s in seeds]
        ks = [k for k in keys if all(k in run["metrics"] for run in runs)]
        row = dict(m["row"])
        row["seeds"] = seeds
        row["metrics"] = {k: statistics.fmean(run["metrics"][k] for run in runs) for k in ks}
        row["metrics_std"] = {k: (statistics.stdev(run["metrics"][k] for run in runs) if len(runs) > 1 else 0.0)
                              for k in ks}
        # every timing any seed's part recorded (older parts may lack a newer key), averaged over the seeds that have it
        names = dict.fromkeys(t for run in runs for t in run["timing"])
        row["timing"] = {t: round(statistics.fmean(run["timing"][t] for run in runs if t in run["timing"]), 3)
                         for t in names}
        row["extra"] = {**m["row"]["extra"], "per_seed": [run["metrics"] for run in runs],
                        "best_epochs": [run["best_epoch"] for run in runs],
                        "parts_of_seeds": [run["part"] for run in runs],
                        **({"precision": [run["precision"] for run in runs]}
                           if any(run["precision"] for run in runs) else {}),
                        "complete": len(seeds) >= (1 if label.endswith("_teacher") else min_seeds)}
        row["extra"].pop("epochs_run", None)
        rows.append(row)
    rank = {label: i for i, label in enumerate(expected)}
    rows.sort(key=lambda r: rank.get(r["label"], len(rank)))
    out = write_result(name, rows, command=command, commit_sha=commit())
    doc = json.loads(out.read_text())
    have = {r["label"]: len(r["seeds"]) for r in rows}
    need = {label: 1 if label.endswith("_teacher") else min_seeds for label in expected}  # one teacher for all
    doc["missing"] = [f"{label} ({have.get(label, 0)}/{need[label]} seeds)" for label in expected
                      if have.get(label, 0) < need[label]]
    doc["parts"] = [{"file": d["_file"], "command": d["command"], "commit": d["commit"], "created": d["created"],
                     **({"teacher_row_unused": d["_unused"]} if d.get("_unused") else {})} for d in docs]
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows) + "\nParts (each with the command that measured it):\n\n" +
                                      "".join(f"- `{d['_file']}`: `{d['command']}`" + (
                                          f" (its {', '.join(d['_unused'])} row not used: the student alone reads no "
                                          "teacher)" if d.get("_unused") else "") + "\n" for d in docs) +
                                      (f"\nMissing or short of seeds: {', '.join(doc['missing'])}\n"
                                       if doc["missing"] else ""))
    return out


def add_device_arg(ap) -> None:
    """``--device cpu|cuda``: where the benchmark runs; CUDA results go to ``<name>_cuda.json`` beside the CPU ones."""
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="run on this device (cuda: results written to <name>_cuda.json)")


def device_of(name: str):
    """The torch device for ``--device``; a clear error when CUDA is asked for and absent."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device on this machine")
    return torch.device(name)


def result_path(name: str, smoke: bool, device: str = "cpu") -> Path:
    """``benchmarks/results/[smoke/]<name>[_cuda].json``."""
    return (RESULTS / "smoke" if smoke else RESULTS) / f"{name}{'' if device == 'cpu' else '_' + device}.json"


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings cover it."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()
