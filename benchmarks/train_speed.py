"""Training speed: Ray Train throughput vs a plain process, and each method's epoch cost, from the same runs.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/train_speed.py --teacher-checkpoint <ckpt> \
        [--ranking <rank_teacher output with top-500 and 5 user/item neighbours>]

On CiteULike-t's DE-RRD split, a BPR d=20 student with each method (student alone ``none``, ``de``, ``de_bf16`` (DE
with ``distill.de.precision=bf16``), ``de_late`` (DE once its temperature has annealed, see ``VARIANT``), ``rrd``,
``de_rrd``, ``mkd``; the paper-default configs, ``configs/distill/``) distilled from the given sharded BPR teacher,
for ``--epochs`` measured epochs after one warm-up epoch (more, up to 40, where those take less than
``--min-seconds`` in the plain loop: the student alone and RRD), trained three ways:

- ``plain``: :func:`rayrec.train.plain.plain_epochs`, the loop's steps in this process (1 thread, no Ray);
- ``ray_w1``, ``ray_w2``: ``rayrec.train.fit`` through Ray Train with 1 and 2 workers of 1 thread each (Ray Data
  ingest, DDP, the frozen teacher sharded over the workers), timing the training part of each epoch.

Two result files:

- ``throughput.json``: interactions/s per row; ``extra.ray_vs_plain_per_core_ratio`` = (Ray rows/s / workers)
  / plain rows/s (target >= 0.8); ``extra.data_wait_s``: of a measured epoch, the seconds rank 0's loop waited for
  its next batch (``time/data_wait_s``, the Ray Data side of the gap).
- ``method_cost.json``: per method, the 1-worker epoch time / the student-alone epoch time
  (``extra.epoch_ratio``; targets DE <= 6, RRD <= 2); for the DE rows also the experts' forward and backward FLOPs
  per epoch (counted by DE in the plain loop) over this machine's one-thread dense matmul rate (fp32; bf16 for
  ``de_bf16``), as a ratio to the same student epoch (``extra.flop_floor_ratio``: the lowest ratio any code could
  reach here); and ``full_eval``: the full-ranking evaluation of every user
  (test split, Recall/NDCG@20, 1 thread; the median of 3 after a first call, as every epoch of a run evaluates with
  the same data) / one student-alone epoch (``extra.eval_vs_student_epoch_ratio``, target
  <= 1). With ``--workers 0`` (the plain loop only) the method costs are the plain epochs' and ``full_eval``
  evaluates an untrained student of the same shape.

``--device cuda``: the plain loop, the Ray workers (``ray.use_gpu=true``, one GPU each) and the full evaluation on
GPUs, written to ``throughput_cuda.json`` / ``method_cost_cuda.json``. Without ``--ranking`` the teacher is ranked
first (top-500, 5 user and item neighbours, into ``<storage_root>/rankings/speed_teacher``). ``--smoke``: ML-100K,
the given teacher (e.g. the test suite's), 1 measured epoch, ``ray.num_workers`` from ``--workers``, into
``benchmarks/results/smoke/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (add_device_arg, command_line, commit, device_of, result_path,  # noqa: E402
                               synchronize, write_result)
from rayrec.config import CONFIG_DIR, load_config  # noqa: E402

METHODS = ["none", "de", "de_bf16", "de_late", "rrd", "de_rrd", "mkd"]
DISTILL = {"none": "distill/de_rrd", "de": "distill/de_rrd", "de_bf16": "distill/de_rrd", "de_late": "distill/de_rrd",
           "rrd": "distill/de_rrd", "de_rrd": "distill/de_rrd", "mkd": "distill/mkd"}
# a method run with other settings: (method, overrides). de_late: DE (fp32) at the Gumbel temperature its default
# schedule reaches at epoch ~200 of 1000 (1e-2): the selection is one-hot, so only one expert per entity is computed
# (the sparse path); the first epochs (τ near 1) compute all M, as the de row shows.
VARIANT = {"de_bf16": ("de", ["distill.de.precision=bf16"]),
           "de_late": ("de", ["distill.de.schedule=constant", "distill.de.tau_start=0.01"])}


def _config(args, method: str, teacher: dict, ranking: str, overrides: list[str]):
    data = "data/ml100k" if args.smoke else "data/citeulike_t_derrd"
    extra = ["data.num_eval_negatives=99"] if args.smoke else []
    return load_config([CONFIG_DIR / f"{data}.yaml", CONFIG_DIR / "model/bpr_d20.yaml",
                        CONFIG_DIR / f"{DISTILL[method]}.yaml"],
                       [f"name=speed_{method}", f"distill.method={VARIANT.get(method, (method,))[0]}",
                        *VARIANT.get(method, (method, []))[1],
                        f"distill.teacher.checkpoint={teacher['checkpoint']}", f"distill.teacher.ranking={ranking}",
                        f"distill.teacher.name={teacher['name']}", f"distill.teacher.dim={teacher['dim']}",
                        f"train.max_epochs={args.epochs + 1}", "train.patience=1000", "train.threads_per_worker=1",
                        "eval.full=false", *extra, *args.overrides, *overrides])


def _rate(epochs: list[dict]) -> tuple[float, float]:
    """(rows/s, mean epoch s) over the measured epochs (the first is a warm-up)."""
    m = epochs[1:] or epochs
    s = sum(e["s"] for e in m)
    return sum(e["rows"] for e in m) / s, s / len(m)


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-checkpoint", required=True)
    ap.add_argument("--ranking", default=None)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                    help="Ray Train worker counts; 0 alone: the plain loop only (method costs from it)")
    ap.add_argument("--epochs", type=int, default=2, help="measured epochs (after one warm-up epoch)")
    ap.add_argument("--min-seconds", type=float, default=3.0,
                    help="measure more epochs (up to 40) where --epochs plain epochs take less than this")
    ap.add_argument("--smoke", action="store_true")
    add_device_arg(ap)
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. storage_root=/tmp/x")
    args = ap.parse_args(argv)
    device = device_of(args.device)
    if args.device == "cuda":  # one GPU per Ray Train worker
        import torch

        if max(args.workers) > torch.cuda.device_count():
            raise SystemExit(f"error: --workers {max(args.workers)} needs as many GPUs, this machine has "
                             f"{torch.cuda.device_count()}")
        args.overrides = ["ray.use_gpu=true", *args.overrides]
    if args.smoke:
        args.epochs, args.min_seconds = 1, 0.0
    if "none" not in args.methods:
        args.methods = ["none", *args.methods]  # every ratio is against the student alone
    sha = commit()
    import torch

    from rayrec.data.prepared import load_prepared, prepare
    from rayrec.serve import load_dense_model
    from rayrec.train.fit import fit, prepared_root
    from rayrec.train.plain import plain_epochs

    t_summary = json.loads((Path(args.teacher_checkpoint) / "summary.json").read_text())
    teacher = {"checkpoint": args.teacher_checkpoint, "name": t_summary["config"]["model"]["name"],
               "dim": t_summary["config"]["model"]["dim"]}
    ranking = args.ranking
    if ranking is None:
        from rayrec.teacher.rank import rank_teacher

        data = "data/ml100k" if args.smoke else "data/citeulike_t_derrd"
        rcfg = load_config([CONFIG_DIR / f"{data}.yaml", CONFIG_DIR / "teacher/sharded_row_wise.yaml"],
                           ["name=speed_teacher", f"model.name={teacher['name']}", f"model.dim={teacher['dim']}",
                            "rank.top_n=500",
                            "rank.user_neighbors=5", "rank.item_neighbors=5", *args.overrides,
                            *(["data.num_eval_negatives=99", "rank.top_n=100"] if args.smoke else [])])
        ranking = str(rank_teacher(rcfg, args.teacher_checkpoint, resume=True))  # kept when already there
    smoke_mkd = ["distill.cpd.mxK=100", "distill.sld.K=10"] if args.smoke else []
    base_cfg = _config(args, "none", teacher, ranking, [])
    prepared = prepare(base_cfg.data, prepared_root(base_cfg), progress=lambda s: None)
    tput, cost, epoch_s, de_gflop = [], [], {}, {}
    eval_row = None
    for method in args.methods:
        over = smoke_mkd if method == "mkd" else []
        eps = plain_epochs(_config(args, method, teacher, ranking, over), prepared, args.epochs + 1, device=device)
        rows_s, ep = _rate(eps)
        measured = eps[1:] or eps
        if "kd/de_gflop" in measured[0]["metrics"]:  # DE's expert work per epoch: a floor on its epoch time
            de_gflop[method] = sum(e["metrics"]["kd/de_gflop"] for e in measured) / len(measured)
        # a cheap epoch (the student alone: ~0.2 s) is measured over at least --min-seconds of epochs, so the noise of
        # a few epochs right after Ray starts (0.24-0.42 s for the same loop) averages out
        n = min(40, max(args.epochs, math.ceil(args.min_seconds / max(ep, 1e-3))))
        if n > args.epochs:
            rows_s, ep = _rate(plain_epochs(_config(args, method, teacher, ranking, over), prepared, n + 1,
                                            device=device))
        over = [*over, f"train.max_epochs={n + 1}"]
        print(f"[speed] {method} plain: {rows_s:,.0f} rows/s ({ep:.2f} s/epoch)", flush=True)
        tput.append({"label": f"{method}_plain", "model": "bpr", "method": method, "dim": 20, "world_size": 1,
                     "timing": {"rows_per_s": round(rows_s, 1), "epoch_s": round(ep, 4)},
                     "extra": {"threads": 1, "epochs": n}})
        plain_rate = rows_s
        epoch_s[method] = ep  # replaced by the first Ray run's, when there is one
        for w in [w for w in args.workers if w > 0]:
            s = fit(_config(args, method, teacher, ranking, [*over, f"ray.num_workers={w}"]), prepared=prepared,
                    progress=lambda m: None)
            hist = [{"rows": h["train/rows_per_s"] * h["time/train_s"], "s": h["time/train_s"]} for h in s["history"]]
            r_s, r_ep = _rate(hist)
            measured = s["history"][1:] or s["history"]  # as _rate: the first epoch is a warm-up
            wait = sum(h.get("time/data_wait_s", 0.0) for h in measured) / len(measured)  # rank 0's
            ratio = (r_s / max(w, 1)) / plain_rate
            print(f"[speed] {method} ray x{w}: {r_s:,.0f} rows/s ({r_ep:.2f} s/epoch), per core {ratio:.2f}x plain",
                  flush=True)
            tput.append({"label": f"{method}_ray_w{w}", "model": "bpr", "method": method, "dim": 20, "world_size": w,
                         "timing": {"rows_per_s": round(r_s, 1), "epoch_s": round(r_ep, 4)},
                         "extra": {"threads_per_worker": 1, "epochs": n,
                                   "ray_vs_plain_per_core_ratio": round(ratio, 4),
                                   "data_wait_s": round(wait, 4)}})
            if w == min(w for w in args.workers if w > 0):
                epoch_s[method] = r_ep
                if method == "none":  # the full evaluation of every user with this student, 1 thread
                    eval_row = _full_eval(load_dense_model(s["checkpoint"], prepared), prepared, base_cfg, device)
        if method == "none" and not any(w > 0 for w in args.workers):
            # no Ray run to take a trained student from: a fresh one (the evaluation's cost depends on shapes only)
            from rayrec.models import build_model

            pd = load_prepared(prepared)
            torch.manual_seed(0)
            fresh = build_model("bpr", pd.num_users, pd.num_items, 20, base_cfg.model.init_std)
            eval_row = _full_eval(fresh, prepared, base_cfg, device)
            eval_row["extra"]["student"] = "untrained (plain loop only)"
    rates = {}  # one thread's dense matmul rate, as the methods' epochs run on one thread
    for method in args.methods:
        extra = {"epoch_ratio": round(epoch_s[method] / epoch_s["none"], 4),
                 "target_epoch_ratio": {"de": 6.0, "de_bf16": 6.0, "de_late": 6.0, "rrd": 2.0}.get(method)}
        if method in de_gflop:
            # the experts' FLOPs alone at this machine's matmul rate (bf16 for de_bf16): no code reaches below this
            dtype = torch.bfloat16 if method == "de_bf16" else torch.float32
            if dtype not in rates:
                from benchmarks.ranking import matmul_rate

                rates[dtype] = matmul_rate(1, device=device, dtype=dtype)
            floor_s = de_gflop[method] * 1e9 / rates[dtype]
            extra.update(expert_gflop_per_epoch=round(de_gflop[method], 1),
                         matmul_gflop_per_s=round(rates[dtype] / 1e9, 1), matmul_dtype=str(dtype).split(".")[-1],
                         flop_floor_s=round(floor_s, 3), flop_floor_ratio=round(floor_s / epoch_s["none"], 2))
        cost.append({"label": method, "model": "bpr", "method": method, "dim": 20, "world_size": max(1, min(args.workers)),
                     "timing": {"epoch_s": round(epoch_s[method], 4)}, "extra": extra})
    if eval_row is not None:
        eval_row["extra"]["eval_vs_student_epoch_ratio"] = round(eval_row["timing"]["eval_s"] / epoch_s["none"], 4)
        cost.append(eval_row)
    cmd = command_line(__file__, argv)
    paths = []
    for name, rows, md in (("throughput", tput, _md_throughput), ("method_cost", cost, _md_cost)):
        path = result_path(name, args.smoke, args.device)
        p = write_result(path.stem, rows, command=cmd, path=path, commit_sha=sha)
        p.with_suffix(".md").write_text(md(rows))
        print(md(rows))
        paths.append(p)
    return paths[0], paths[1]


def _full_eval(model, prepared, cfg, device, repeats: int = 3) -> dict:
    """The ``full_eval`` row: full-ranking evaluation (test split) of every user with ``model``, 1 thread. As in
    training, where every epoch evaluates with the same ``EvalData``: the first call (which also checks the held-out
    items and exclusions once, ``EvalData.ranker``) is recorded as ``extra.first_eval_s`` and the median of the
    next ``repeats`` calls is the row's time."""
    import torch

    from rayrec.data.prepared import load_prepared
    from rayrec.eval.evaluate import EvalData, evaluate

    model = model.to(device)
    evald = EvalData.from_prepared(load_prepared(prepared))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for _ in range(1 + repeats):
            t0 = time.perf_counter()
            m = evaluate(model, evald, "test", cfg.eval, sampled=False, full=True, device=device)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    eval_s = sorted(times[1:])[len(times[1:]) // 2]
    return {"label": "full_eval", "model": "bpr", "method": "none", "dim": 20, "world_size": 1,
            "metrics": {k: v for k, v in m.items() if k.startswith("full/")}, "timing": {"eval_s": round(eval_s, 4)},
            "extra": {"users": evald.num_users, "items": evald.num_items, "threads": 1,
                      "first_eval_s": round(times[0], 4), "eval_repeats_s": [round(t, 4) for t in times[1:]]}}


def _md_throughput(rows: list[dict]) -> str:
    lines = ["| row | rows/s | epoch s | Ray per core / plain | of which waiting for data s |", "|---|---|---|---|---|"]
    for r in rows:
        ratio, wait = r["extra"].get("ray_vs_plain_per_core_ratio"), r["extra"].get("data_wait_s")
        lines.append(f"| {r['label']} | {r['timing']['rows_per_s']:,.0f} | {r['timing']['epoch_s']:.3f} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} | {'' if wait is None else f'{wait:.3f}'} |")
    return "\n".join(lines) + "\n"


def _md_cost(rows: list[dict]) -> str:
    lines = ["| row | seconds | / student-alone epoch | experts' FLOP floor / student-alone epoch |",
             "|---|---|---|---|"]
    for r in rows:
        t = r["timing"].get("epoch_s", r["timing"].get("eval_s"))
        ratio = r["extra"].get("epoch_ratio", r["extra"].get("eval_vs_student_epoch_ratio"))
        e = r["extra"]
        floor = (f"{e['flop_floor_ratio']:.1f} ({e['expert_gflop_per_epoch']:,.0f} GFLOP at "
                 f"{e['matmul_gflop_per_s']:.0f} GFLOP/s {e['matmul_dtype']})" if "flop_floor_ratio" in e else "-")
        lines.append(f"| {r['label']} | {t:.3f} | {ratio:.3f} | {floor} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
