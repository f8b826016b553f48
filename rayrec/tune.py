"""Ray Tune over distillation runs: a YAML search space keyed by dotted config paths, one full Ray Train
distillation per trial, ASHA early stopping on per-epoch validation metrics, an optional Optuna searcher, resume
after interruption, and a report (``report.md``, ``results.csv``, PNG plots, ``best.yaml``).

Search file (``configs/tune/*.yaml``, typed by :class:`TuneSpec`; unknown keys and bad spaces are refused before
Ray starts)::

    name: citeulike_de_rrd
    config: [experiments/citeulike__bpr_d200_to_d20__de_rrd]   # experiment layers of every trial
    overrides: [train.max_epochs=20]
    metric: valid/H@5
    mode: max
    num_samples: 12
    space:
      distill.de.M: {choice: [5, 10, 20, 30]}
      distill.de.tau_start: {loguniform: [0.1, 1.0]}
      distill.rrd.T: {uniform: [1.0, 20.0]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}

Each trial is a function trainable that runs :func:`rayrec.train.fit.fit` (a ``TorchTrainer``) with Tune's
``TuneReportCallback``, so every epoch's report (with ``epoch``) reaches ASHA. Trials share the prepared data and
the teacher artifacts (``distill.teacher.checkpoint`` / ``ranking`` in the overrides); nothing retrains the teacher.
``best.yaml`` is the best trial's whole experiment config, which ``jobs/distill.py --config best.yaml`` accepts.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from rayrec.config import CONFIG_DIR, build, dump_config, load_config, resolve_storage_root
from rayrec.errors import ConfigError

KINDS = ("choice", "uniform", "loguniform", "randint", "quniform")


@dataclass
class TuneSpec:
    name: str = "tune"
    config: list[str] = field(default_factory=list)  # experiment config files (relative to configs/)
    overrides: list[str] = field(default_factory=list)  # dotted overrides of every trial
    metric: str = "valid/H@5"
    mode: str = "max"
    num_samples: int = 12
    max_concurrent: int = 1  # trials at once (each runs ray.num_workers Train workers)
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2
    searcher: str = "random"  # random | optuna (learns from past trials; needs `pip install optuna`)
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {kind: args}
    cli_overrides: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"tune.mode must be max or min, got {self.mode!r}")
        if self.scheduler not in ("asha", "fifo") or self.searcher not in ("random", "optuna"):
            raise ConfigError("tune.scheduler must be asha|fifo and tune.searcher random|optuna")
        if self.num_samples < 1 or self.max_concurrent < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("tune needs num_samples, max_concurrent, grace_period >= 1 and reduction_factor >= 2")
        if not self.space:
            raise ConfigError("invalid search space: tune.space is empty")


def _files(names: list[str]) -> list[Path]:
    out = []
    for n in names:
        f = Path(n) if Path(n).is_absolute() else CONFIG_DIR / (n if n.endswith(".yaml") else n + ".yaml")
        if not f.exists():
            raise ConfigError(f"config file not found: {f}")
        out.append(f)
    return out


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"search file not found: {p}")
    spec = build(TuneSpec, yaml.safe_load(p.read_text()) or {}, prefix="tune")
    spec.cli_overrides = list(overrides or [])
    check_space(spec)
    return spec


def _domain(key: str, entry: Any):
    """``{kind: args}`` -> a Tune domain (and a representative value for validation)."""
    from ray import tune

    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in KINDS:
        raise ConfigError(f"invalid search space: {key}: expected one of {{{', '.join(KINDS)}: ...}}, got {entry!r}")
    kind, args = next(iter(entry.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"invalid search space: {key}: choice needs a non-empty list")
        return tune.choice(args), args
    if not isinstance(args, list) or len(args) != (3 if kind == "quniform" else 2):
        raise ConfigError(f"invalid search space: {key}: {kind} needs [low, high{', q' if kind == 'quniform' else ''}]")
    try:
        low, high = float(args[0]), float(args[1])
    except (TypeError, ValueError):
        raise ConfigError(f"invalid search space: {key}: {kind} bounds must be numbers, got {args}") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"invalid search space: {key}: {kind} needs 0 < low < high (log) or low < high, got {args}")
    if kind == "randint":
        return tune.randint(int(low), int(high)), [int(low), int(high) - 1]
    if kind == "quniform":
        return tune.quniform(low, high, float(args[2])), [low, high]
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(low, high), [low, high]


def trial_config(spec: TuneSpec, params: dict[str, Any], extra: list[str] | None = None):
    over = [*spec.overrides, *spec.cli_overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()), *(extra or [])]
    return load_config(_files(spec.config), over)


def check_space(spec: TuneSpec) -> dict[str, Any]:
    """Tune domains of ``spec.space``; every key must be a config key and every value valid there (each
    representative value is applied to the trial config, so a typo or a type error fails here, in one line)."""
    domains = {}
    for key, entry in spec.space.items():
        dom, samples = _domain(key, entry)
        for v in samples:
            try:
                cfg = trial_config(spec, {key: v})
            except ConfigError as e:
                raise ConfigError(f"invalid search space: {key}={v!r}: {e}") from None
        domains[key] = dom
    from rayrec.train.fit import per_epoch_metric_keys, validate

    validate(cfg)
    keys = {k for k in per_epoch_metric_keys(cfg) if k.startswith(("valid/", "full_valid/"))}
    if spec.metric not in keys:
        raise ConfigError(f"tune.metric={spec.metric!r} is not a validation metric reported every epoch; choose one of {sorted(keys)}")
    return domains


def distinct_choices(space: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]] | None:
    """For a space of ``choice`` entries only: ``n`` distinct combinations drawn without replacement (seeded; every
    combination, in a seeded order, when the space has fewer than ``n``). None when any entry is continuous.

    Ray's random generator samples each trial independently and repeats itself: ``BasicVariantGenerator`` (seed 0)
    drew 8 distinct configurations in 12 trials from the 4 x 4 x 2 x 3 = 96 of ``configs/tune/sld_weights.yaml``
    (independent draws would repeat about once in 12 there; it repeated four times), so a third of that search reran
    trials it had already run."""
    if not all(next(iter(e)) == "choice" for e in space.values()):
        return None
    import numpy as np

    keys = list(space)
    sizes = [len(space[k]["choice"]) for k in keys]
    total = math.prod(sizes)
    rng = np.random.default_rng(seed)
    if total <= 1_000_000:
        picks = rng.permutation(total)[: min(n, total)].tolist()
    else:  # too many to permute: rejection sampling (collisions are rare in a space this large)
        seen: dict[int, None] = {}
        while len(seen) < n:
            seen.setdefault(int(rng.integers(total)), None)
        picks = list(seen)
    points = []
    for idx in picks:  # mixed-radix digits of idx -> one value per key
        point = {}
        for k, size in zip(reversed(keys), reversed(sizes)):
            idx, digit = divmod(idx, size)
            point[k] = space[k]["choice"][digit]
        points.append({k: point[k] for k in keys})
    return points


def _flat(params: dict) -> dict:
    return {k: v for k, v in params.items()}


def _absolute_paths(cfg) -> list[str]:
    """Overrides pinning every path of ``cfg`` to the driver's absolute one: Tune runs each trial in its own
    working directory, where a relative ``storage_root`` or teacher artifact would not resolve."""
    out = [f"storage_root={resolve_storage_root(cfg)}"]
    for key, value in (("data.root", cfg.data.root), ("data.prepared_root", cfg.data.prepared_root),
                       ("distill.teacher.checkpoint", cfg.distill.teacher.checkpoint),
                       ("distill.teacher.ranking", cfg.distill.teacher.ranking)):
        if value:
            out.append(f"{key}={Path(os.path.expanduser(value)).resolve()}")
    return out


def _trial(params: dict, spec_dict: dict) -> None:
    """One trial: a full Ray Train distillation run reporting every epoch to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayrec.train.fit import fit

    spec = build(TuneSpec, {k: v for k, v in spec_dict.items() if k not in ("cli_overrides", "prepared")})
    spec.cli_overrides = spec_dict.get("cli_overrides", [])
    import ray.tune

    trial = ray.tune.get_context().get_trial_id()
    cfg = trial_config(spec, params, [f"name={spec.name}_{trial}"])
    fit(cfg, prepared=spec_dict["prepared"], callbacks=[TuneReportCallback()], progress=lambda s: None)


def _history_callback(path: Path):
    """A Tune callback appending every trial result (params, epoch, metrics) to ``history.jsonl``: the report's
    source, independent of Tune's optional loggers, and kept across ``--resume``."""
    from ray import tune

    class History(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            row = {"trial": trial.trial_id, "config": trial.config,
                   **{k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not k.startswith("config/")}}
            with open(path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    return History()


def _searcher(spec: TuneSpec, progress: Callable[[str], None] = print):
    """The search algorithm of ``spec.searcher`` and the number of trials it will run."""
    num_samples = spec.num_samples
    if spec.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise ConfigError(f"tune.searcher=optuna needs optuna (pip install optuna): {e}") from None
        return OptunaSearch(seed=spec.seed), num_samples
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a finite space: distinct points (each replaces one of num_samples), never a repeated trial
    points = distinct_choices(spec.space, spec.num_samples, spec.seed)
    if points is not None and len(points) < num_samples:
        progress(f"[tune] {spec.name}: the space has only {len(points)} combinations: {len(points)} trials, "
                 f"not {num_samples}")
        num_samples = len(points)
    # the generator limits concurrency itself (Tune ignores max_concurrent_trials for it, and 12 trials
    # started at once each wait for Train workers that never fit: WorkerGroupStartupTimeoutError)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent,
                                 points_to_evaluate=points), num_samples


def run_tune(spec: TuneSpec, resume: bool = False, progress: Callable[[str], None] = print,
             report_dir: str | Path | None = None, command: str | None = None) -> Path:
    """Run (or with ``resume`` continue) the search; write the report (into ``report_dir``, default
    ``<storage_root>/tune/<name>/report``; ``command`` is quoted in it); return the report directory."""
    domains = check_space(spec)
    base = trial_config(spec, {})
    from ray import tune

    from rayrec.data.prepared import prepare
    from rayrec.runtime import init_ray
    from rayrec.train.fit import _validate_distill, prepared_root

    _validate_distill(base)  # the shared teacher artifacts exist before any trial starts
    root = resolve_storage_root(base) / "tune"
    exp_dir = root / spec.name
    init_ray(base.ray)
    prepared = prepare(base.data, prepared_root(base), progress=progress)  # once, shared by every trial
    spec_dict = {**{k: getattr(spec, k) for k in TuneSpec.__dataclass_fields__}, "prepared": str(prepared)}
    spec_dict["cli_overrides"] = [*spec.cli_overrides, *_absolute_paths(base)]  # trials run in their own cwd
    trainable = tune.with_parameters(_trial, spec_dict=spec_dict)
    trainable = tune.with_resources(trainable, {"CPU": 0.1})  # the trial actor only waits on its TorchTrainer
    num_samples = spec.num_samples
    if resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise ConfigError(f"--resume: no Tune experiment to restore at {exp_dir}")
        progress(f"[tune] resuming {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="epoch", max_t=max(base.train.max_epochs, spec.grace_period + 1),
                                      grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
        search, num_samples = _searcher(spec, progress)
        tuner = tune.Tuner(
            trainable, param_space=domains,
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=num_samples,
                                        scheduler=scheduler, search_alg=search,
                                        max_concurrent_trials=spec.max_concurrent if spec.searcher == "optuna" else None),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(root), verbose=1,
                                      callbacks=[_history_callback(root / f"{spec.name}.history.jsonl")]),
        )
    progress(f"[tune] {spec.name}: {num_samples} trials over {list(domains)} ({spec.scheduler}, "
             f"{spec.searcher}), metric {spec.metric} ({spec.mode}) -> {exp_dir}")
    t0 = time.perf_counter()
    grid = tuner.fit()
    out = write_report(grid, spec, Path(report_dir) if report_dir else exp_dir / "report",
                       root / f"{spec.name}.history.jsonl", command)
    progress(f"[tune] done in {time.perf_counter() - t0:.0f}s: {out / 'report.md'}")
    if not (out / "best.yaml").exists():
        first = next((r.error for r in grid if r.error is not None), None)
        raise RuntimeError(f"tune {spec.name}: no trial reported {spec.metric} ({grid.num_errors} of {len(grid)} "
                           f"failed; first error: {first!r:.500})")
    return out


def write_report(grid, spec: TuneSpec, out: Path, history: Path, command: str | None = None) -> Path:
    """``report.md``, ``results.csv``, plots and ``best.yaml`` from a Tune ``ResultGrid`` and the per-epoch
    ``history`` (JSON lines) of every trial, written into a temporary directory beside ``out`` and committed with
    a checksummed ``manifest.json`` (rayrec.artifacts): ``out`` holds the previous report or the new one, whole."""
    from rayrec.artifacts import write_dir

    return write_dir(out, "tune_report", {"name": spec.name, "metric": spec.metric, "command": command},
                     lambda tmp: _write_report_files(grid, spec, tmp, history, command))


def _write_report_files(grid, spec: TuneSpec, out: Path, history: Path, command: str | None) -> None:
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = list(spec.space)
    sign = 1 if spec.mode == "max" else -1
    rows = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    hist_all = pd.DataFrame(rows)
    errors = {(r.metrics or {}).get("trial_id"): type(r.error).__name__ for r in grid if r.error is not None}
    trials = []
    for tid, h in (hist_all.groupby("trial", sort=False) if len(hist_all) else []):
        epochs = h[h["final"].isna()] if "final" in h else h  # the per-epoch reports (not the final one)
        epochs = epochs[epochs[spec.metric].notna()] if spec.metric in epochs else epochs.iloc[0:0]
        best = float(sign * (sign * epochs[spec.metric]).max()) if len(epochs) else math.nan
        params = h.iloc[0]["config"]
        trials.append({"trial": tid, "params": {k: params.get(k) for k in keys}, "best": best,
                       "epochs": int(len(epochs)), "error": errors.get(tid, ""), "history": epochs})
    ok = [t for t in trials if not math.isnan(t["best"])]
    ok.sort(key=lambda t: -sign * t["best"])
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *keys, spec.metric, "epochs", "error"])
        for t in sorted(trials, key=lambda t: (math.isnan(t["best"]), -sign * (0 if math.isnan(t["best"]) else t["best"]))):
            w.writerow([t["trial"], *(t["params"][k] for k in keys), t["best"], t["epochs"], t["error"]])
    plots = []
    for k in keys:  # metric vs each searched parameter
        fig, ax = plt.subplots(figsize=(4, 3))
        xs = [t["params"][k] for t in ok]
        ax.scatter(xs, [t["best"] for t in ok], s=18)
        if ok and all(isinstance(x, (int, float)) for x in xs) and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(f"best {spec.metric}")
        fig.tight_layout()
        name = f"param_{k.replace('.', '_')}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        plots.append(name)
    fig, ax = plt.subplots(figsize=(5, 3.2))  # learning curves of the top trials
    for t in ok[:5]:
        ax.plot(t["history"]["epoch"], t["history"][spec.metric], label=t["trial"][-12:])
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    if ok:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=100)
    plt.close(fig)
    plots.append("learning_curves.png")
    md = [f"# Tune report: {spec.name}\n", f"{len(grid)} trials ({len(ok)} with results, {grid.num_errors} failed), "
          f"metric `{spec.metric}` "
          f"({spec.mode}), scheduler {spec.scheduler}, searcher {spec.searcher}. Experiment config: "
          f"{', '.join(spec.config)}; overrides: {' '.join(spec.overrides + spec.cli_overrides) or 'none'}.\n",
          *([f"Produced by:\n\n```bash\n{command}\n```\n"] if command else [])]
    if ok:
        best = ok[0]
        h = best["history"]
        terms = [c for c in h.columns if c.startswith("train/kd/") or c == "train/loss"]
        if terms:  # the best trial's per-term losses
            fig, ax = plt.subplots(figsize=(5, 3.2))
            for c in terms:
                ax.plot(h["epoch"], h[c], label=c[6:])
            ax.set_xlabel("epoch")
            ax.set_ylabel("per training row")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / "best_terms.png", dpi=100)
            plt.close(fig)
            plots.append("best_terms.png")
        cfg = trial_config(spec, best["params"], [f"name={spec.name}_best"])
        (out / "best.yaml").write_text(f"# best trial {best['trial']} of tune search {spec.name}: "
                                       f"{spec.metric} = {best['best']:.4f}\n" + dump_config(cfg))
        md += [f"Best: `{best['trial']}` with {spec.metric} = {best['best']:.4f} after {best['epochs']} epochs; its "
               f"whole config is `best.yaml` (`jobs/distill.py --config best.yaml` runs it).\n",
               "| rank | trial | " + " | ".join(keys) + f" | {spec.metric} | epochs |",
               "|" + "---|" * (len(keys) + 4)]
        for i, t in enumerate(ok, 1):
            vals = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (t["params"][k] for k in keys)]
            md.append(f"| {i} | {t['trial'][-20:]} | " + " | ".join(vals) + f" | {t['best']:.4f} | {t['epochs']} |")
    md += ["", *(f"![{p}]({p})" for p in plots), ""]
    (out / "report.md").write_text("\n".join(md))
