"""The whole distillation pipeline in one call: prepare -> sharded teacher -> rank -> students -> compare report.

A pipeline file (``configs/pipelines/*.yaml``, typed by :class:`PipelineConfig`, unknown keys rejected) names the
experiment config layers of each stage; every stage is an ordinary :func:`rayrec.train.fit.fit` /
:func:`rayrec.teacher.rank.rank_teacher` run on the same prepared data, and each stage reads the previous stage's
artifact by the path the previous stage recorded (the prepared data's manifest, the teacher's ``summary.json``
checkpoint, the ranking's manifest). ``pipeline.json`` under ``<storage_root>/pipelines/<name>/`` records every
artifact path and is written last, beside the compare report (:func:`rayrec.report.compare_report`).

Resume (``jobs/main.py --resume``): ``<storage_root>/pipelines/<name>.stages.json`` records, atomically, each
training stage's config fingerprint when it starts and its summary when it ends. A resumed pipeline keeps the
prepared data (always reused when its manifest matches), every finished stage whose checkpoint is still complete,
and the ranking when it is complete and of the same teacher and config; the stage that was cut short continues
from its newest checkpoint written since it started (``fit(resume_from=...)``), or starts over when it wrote none.
Once a stage is trained again, every later stage runs from scratch (it would read the new teacher). A stage whose
config changed since the interrupted run is refused (the fingerprint leaves out ``ray.*``, ``storage_root``, ``name``
and the fault-injection and retry keys, which do not change what is trained).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from rayrec.config import CONFIG_DIR, ExperimentConfig, build, load_config, resolve_storage_root
from rayrec.errors import ArtifactError, ConfigError


@dataclass
class StageSpec:
    """Config layers of one stage: files (relative to ``configs/``, ``.yaml`` optional) then dotted overrides."""

    files: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)


@dataclass
class StudentSpec(StageSpec):
    label: str = ""  # the row name in the report, e.g. bpr_de_rrd


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    storage_root: str = "runs"
    base: list[str] = field(default_factory=list)  # config files under every stage (data, protocol)
    overrides: list[str] = field(default_factory=list)  # dotted overrides for every stage (e.g. ray.*)
    teacher: StageSpec = field(default_factory=StageSpec)
    rank: StageSpec = field(default_factory=StageSpec)
    student: StageSpec = field(default_factory=StageSpec)  # layers shared by every student (size, budget)
    students: list[StudentSpec] = field(default_factory=list)
    latency_users: int = 64  # batch of users for the compare report's top-20 latency
    cli_overrides: list[str] = field(default_factory=list, init=False)  # command-line overrides: applied last

    def __post_init__(self) -> None:
        if not self.students:
            raise ConfigError("pipeline.students: name at least one student (e.g. label: bpr_none)")
        labels = [s.label for s in self.students]
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise ConfigError(f"pipeline.students need distinct non-empty labels, got {labels}")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML; ``overrides`` (dotted, e.g. ``ray.num_workers=1``) go to every stage."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"pipeline file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or "students" not in raw:
        raise ConfigError(f"{p} is not a pipeline file (no 'students:'); pipelines live in configs/pipelines/")
    cfg = build(PipelineConfig, raw, prefix="pipeline")
    cfg.cli_overrides = list(overrides or [])
    return cfg


def _files(names: list[str]) -> list[Path]:
    out = []
    for n in names:
        f = CONFIG_DIR / (n if n.endswith(".yaml") else n + ".yaml")
        if not f.exists():
            raise ConfigError(f"config file not found: {f}")
        out.append(f)
    return out


def stage_config(pc: PipelineConfig, *specs: StageSpec, extra: list[str] | None = None) -> ExperimentConfig:
    files = _files([*pc.base, *(f for s in specs for f in s.files)])
    over = [f"storage_root={pc.storage_root}", *pc.overrides, *(o for s in specs for o in s.overrides),
            *pc.cli_overrides, *(extra or [])]
    return load_config(files, over)


class _Stages:
    """The stage record ``<storage_root>/pipelines/<name>.stages.json``, rewritten atomically on every change."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if resume and path.exists():
            try:
                self.done = json.loads(path.read_text())
            except ValueError:
                raise ArtifactError(f"{path}: unreadable stage record; run jobs/main.py without --resume") from None
        self.rerun = not resume  # set once a stage trains again: every later stage then starts from scratch

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(f".{self.path.name}.part-{os.getpid()}")
        part.write_text(json.dumps(self.done, indent=1))
        os.replace(part, self.path)

    def fit(self, key: str, cfg: ExperimentConfig, prepared: Path, progress: Callable[[str], None]) -> dict:
        """Run (or keep, or continue) the training stage ``key``; return its summary."""
        from rayrec.artifacts import check_checkpoint
        from rayrec.train.fit import config_fingerprint, fit, latest_checkpoint

        fp, rec = config_fingerprint(cfg), self.done.get(key)
        if not self.rerun and rec is not None:
            # recomputed from the recorded config, so an option added since (at its default) is no change
            if (config_fingerprint(rec["config"]) if "config" in rec else rec["fingerprint"]) != fp:
                raise ConfigError(f"--resume: the {key} stage's config changed since the interrupted run; rerun "
                                  f"jobs/main.py without --resume (or with another pipeline name)")
            if rec.get("summary"):
                try:
                    summary = json.loads(Path(rec["summary"]).read_text())
                    check_checkpoint(summary["checkpoint"], "")
                    progress(f"[pipeline] {key}: finished before, kept ({summary['checkpoint']})")
                    return summary
                except (OSError, ValueError, KeyError, TypeError, ArtifactError) as e:
                    progress(f"[pipeline] {key}: training again, its result is gone or incomplete ({e})")
            else:
                try:
                    ckpt = latest_checkpoint(cfg, since=rec["since"])
                except ArtifactError:
                    ckpt = None
                    progress(f"[pipeline] {key}: cut short before its first checkpoint, starting over")
                if ckpt is not None:  # later stages were not trained yet: they keep self.rerun as it is
                    progress(f"[pipeline] {key}: continuing from {ckpt}")
                    return self._finish(key, fit(cfg, prepared=prepared, resume_from=str(ckpt), progress=progress))
        self.rerun = True
        self._record(key, cfg, fp, time.strftime("%Y%m%d-%H%M%S"))
        return self._finish(key, fit(cfg, prepared=prepared, progress=progress))

    def artifact(self, key: str, path: Path, kind: str) -> None:
        """Record the committed artifact at ``path``; one that differs from the recorded one reruns what follows."""
        from rayrec.artifacts import read_manifest

        m = read_manifest(path, kind, "jobs/main.py")
        ident = hashlib.sha256(json.dumps([m.get("created"), m.get("files")], sort_keys=True).encode()).hexdigest()
        if self.done.get(key, {}).get("identity") != ident:
            self.rerun = True
        self.done[key] = {"identity": ident, "path": str(path)}
        self._write()

    def _record(self, key: str, cfg: ExperimentConfig, fp: str, since: str) -> None:
        self.done[key] = {"fingerprint": fp, "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
                          "since": since}
        self._write()

    def _finish(self, key: str, summary: dict) -> dict:
        self.done[key]["summary"] = str(Path(summary["run_dir"]) / "summary.json")
        self._write()
        return summary


def run_pipeline(pc: PipelineConfig, progress: Callable[[str], None] = print, resume: bool = False) -> Path:
    """Run every stage; return the report directory (``compare.md``, ``compare.png``, ``pipeline.json``).
    ``resume``: keep what an interrupted run of the same pipeline finished and continue the stage it cut short
    (see the module docstring)."""
    from rayrec.data.prepared import prepare
    from rayrec.report import compare_report
    from rayrec.teacher.rank import rank_teacher
    from rayrec.train.fit import prepared_root, validate

    t0 = time.perf_counter()
    t_cfg = stage_config(pc, pc.teacher, extra=[f"name={pc.name}_teacher"])
    r_cfg = stage_config(pc, pc.teacher, pc.rank, extra=[f"name={pc.name}_teacher"])
    s_cfgs = {s.label: stage_config(pc, pc.student, s, extra=[f"name={pc.name}_{s.label}"]) for s in pc.students}
    validate(t_cfg)  # every stage's config is checked before any work (the teacher's artifacts come later)
    for label, c in s_cfgs.items():
        validate(stage_config(pc, pc.student, next(s for s in pc.students if s.label == label),
                              extra=["distill.method=none"]))
    if t_cfg.model.sharding == "none":
        raise ConfigError("pipeline.teacher: the teacher trains sharded (layer teacher/sharded_row_wise)")
    out = resolve_storage_root(t_cfg) / "pipelines" / pc.name
    state = out.parent / f"{pc.name}.stages.json"
    if resume and not state.exists():
        raise ArtifactError(f"--resume: no stage record of a pipeline named {pc.name!r} at {state}; run jobs/main.py "
                            f"without --resume to start (or set storage_root= to the interrupted run's)")
    stages = _Stages(state, resume)
    progress(f"[pipeline] {pc.name}: prepare -> teacher {t_cfg.model.name} d={t_cfg.model.dim} (sharded "
             f"{t_cfg.model.sharding}) -> rank -> {len(s_cfgs)} students ({', '.join(s_cfgs)}) -> {out}"
             + (" (resumed)" if resume else ""))

    prepared = prepare(t_cfg.data, prepared_root(t_cfg), progress=progress)
    teacher = stages.fit("teacher", t_cfg, prepared, progress)
    ranking = rank_teacher(r_cfg, teacher["checkpoint"], prepared=prepared, resume=not stages.rerun,
                           progress=progress)
    stages.artifact("ranking", ranking, "teacher_ranking")  # ranked again: every student starts from scratch
    ref = [f"distill.teacher.checkpoint={teacher['checkpoint']}", f"distill.teacher.ranking={ranking}",
           f"distill.teacher.name={t_cfg.model.name}", f"distill.teacher.dim={t_cfg.model.dim}",
           f"distill.teacher.sharding={t_cfg.model.sharding}", f"distill.teacher.layers={t_cfg.model.layers}"]
    summaries = {f"{t_cfg.model.name}_teacher": teacher}
    for s in pc.students:
        cfg = s_cfgs[s.label]
        if cfg.distill.method != "none":
            cfg = stage_config(pc, pc.student, s, extra=[f"name={pc.name}_{s.label}", *ref])
        progress(f"[pipeline] student {s.label}: {cfg.model.name} d={cfg.model.dim}, distill.method="
                 f"{cfg.distill.method}")
        summaries[s.label] = stages.fit(f"student {s.label}", cfg, prepared, progress)
    # the report directory is written beside its target and committed whole with a checksummed manifest
    from rayrec.artifacts import write_dir

    def write(tmp: Path) -> None:
        compare_report(summaries, tmp, latency_users=pc.latency_users,
                       progress=lambda s: progress(s.replace(str(tmp), str(out))))
        manifest = {
            "name": pc.name, "prepared": str(prepared), "teacher_checkpoint": str(teacher["checkpoint"]),
            "ranking": str(ranking), "students": {k: v.get("checkpoint") for k, v in summaries.items()},
            "report": str(out / "compare.md"), "total_s": round(time.perf_counter() - t0, 1),
            "resumed": resume,
        }
        (tmp / "pipeline.json").write_text(json.dumps(manifest, indent=1))

    return write_dir(out, "pipeline_report", {"name": pc.name}, write)
