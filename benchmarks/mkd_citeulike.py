"""MKD on CiteULike-t with the MKD protocol: teacher, student alone, NKD, CPD, SLD, MKD and the baselines.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/mkd_citeulike.py --models bpr lightgcn --seeds 0 1 2

Protocol (``configs/protocol/mkd_citeulike_t.yaml``, ``../shared/docs/methods/mkd.md`` §2-3): users with >= 5
items, per-user 80/10/10 in file order, full ranking over all items, Recall/NDCG@10/20 averaged over all users
(no held-out item: 0), early stopping on valid NDCG@10 (patience 30), test metrics of the best epoch.
Per base model the teacher (d = 200, the paper's "one tenth" claim -> student d = 20) is trained through the
sharded path (2 Ray Train workers, row-wise TorchRec tables; ``--teacher-checkpoint`` reuses one,
``--teacher-overrides`` adds dotted overrides to its training and ranking), ranked once
(top-500 per user, train items excluded, 5 user/item neighbours after PCA), then every method distills it into the
d = 20 student for each seed. Rows ``<model>_teacher``, ``<model>_<method>`` with the mean over seeds
(``metrics_std``), epoch time, best epochs. Written after every run (``extra.complete`` false until the last one),
with a markdown table beside it. ``--resume``: the same command again after an interruption keeps every run that
finished with the same config and continues the interrupted one from its newest checkpoint. ``--smoke``: ML-100K, 1
epoch, 1 seed, tiny teacher, under ``results/smoke/``. ``TUNED`` holds per-model weights, recorded in each row's
``extra.tuned`` (``--no-tuned``: the stand-alone defaults): BPR's SLD as searched here, BPR's CPD and every LightGCN
weight as the authors set them for CiteULike, HTD's λ as HTD's authors report it. The MKD paper gives no numbers
(mkd.md §8.1); its claim is a student that beats its teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, aggregate_parts, command_line, commit, precision_label,  # noqa: E402
                               run_precisions, write_result)
from rayrec.config import CONFIG_DIR, load_config  # noqa: E402

KEYS = ["full/Recall@10", "full/NDCG@10", "full/Recall@20", "full/NDCG@20"]
METHODS = ["none", "nkd", "cpd", "sld", "mkd", "de_rrd", "htd", "unkd"]
METHOD_FILES = {"none": [], "nkd": ["distill/nkd.yaml"], "cpd": ["distill/cpd.yaml"], "sld": ["distill/sld.yaml"],
                "mkd": ["distill/mkd.yaml"], "de_rrd": ["distill/de_rrd.yaml"], "htd": ["distill/htd.yaml"],
                "unkd": ["distill/unkd.yaml"]}
# the config sections whose projector/expert matmuls --precision sets, per method (the others have none)
PROJECTORS = {"nkd": ["nkd"], "cpd": ["cpd"], "mkd": ["nkd", "cpd"], "de_rrd": ["de"], "htd": ["htd"]}
DIMS = {"bpr": (200, 20), "lightgcn": (200, 20)}
# The LightGCN teacher: the spec's init (std 0.1) and no table L2. Propagation looks up every row of the sharded
# tables in every step, so the fused optimizer's weight decay (0.01 in teacher/sharded_row_wise, chosen for BPR,
# where a step touches only its batch's rows) shrinks every row every step: valid NDCG@10 stayed at 0.016 after 4
# epochs, against 0.029 with L2 1e-4 and 0.032 without (row-wise Adagrad lr 0.1; lr 0.02: 0.022 after 8 epochs,
# lr 0.005: 0.015), one probe each, 1 worker.
LIGHTGCN_TEACHER = ["model.init_std=0.1", "model.fused_weight_decay=0"]
# SLD's weights for BPR from two searches over SLD alone on the validation split (configs/tune/sld_weights.yaml and
# sld_weights_2.yaml, reports in results/tune_sld*/): valid NDCG@10 0.0392 at λ_S 2, τ 0.25, K 50 against 0.0377 with
# the authors' λ_S 5, τ 1, K 100 (configs/distill/sld.yaml, kept for LightGCN until it is searched). The sld row
# and MKD's SLD term use them; --no-tuned runs the stand-alone defaults.
SLD_BPR = ["distill.sld.lambda_s=2.0", "distill.sld.tau=0.25", "distill.sld.K=50"]
# MKD's CPD term for BPR: the authors' CiteULike BPR CPD setting (later code, mkd.md §5.5 table: λ_C 0.05, the list
# regulariser only with β 0.1, Q 5 from the teacher's top-100, τ 0.1), not searched here, with the v1 projector (5
# averaged MLPs, cosine). CPD's stand-alone default (λ_C 1, both regularisers, Q 20 from the top-500) pulled MKD down
# (default-weight bpr_mkd seed 0: test NDCG@20 0.0161 against SLD alone's 0.0171, results/superseded/) and costs ~2x
# the epoch time. NKD keeps its default (λ_N 0.5, the authors' CiteULike BPR value).
CPD_BPR_MKD = ["distill.cpd.lambda_c=0.05", "distill.cpd.regularizer=list", "distill.cpd.beta=0.1", "distill.cpd.Q=5",
               "distill.cpd.mxK=100", "distill.cpd.tau=0.1"]
# The cpd row (CPD alone) runs MKD's CPD term: at its stand-alone default (λ_C 1) the feature term dominated the BPR
# loss (seed 0, bf16: valid NDCG@10 0.017 after 58 epochs against ~0.03 for the student alone, stopped there).
# LightGCN, not searched here: the authors' CiteULike LightGCN settings (mkd.md §6.1: SLD λ_S 30, τ 10, K 50, 0.9 of
# the weight on the student's list and 0.1 on the joint list; §5.5 table, HEAD: CPD λ_C 0.005, the list regulariser
# with β 0.05, Q 5 from the teacher's top-500, τ 0.01, here with the v1 projector as for BPR). NKD: λ_N 0.5 (§4.3).
SLD_LIGHTGCN = ["distill.sld.lambda_s=30.0", "distill.sld.tau=10.0", "distill.sld.K=50", "distill.sld.w_t=0.0",
                "distill.sld.w_a=0.1"]
CPD_LIGHTGCN = ["distill.cpd.lambda_c=0.005", "distill.cpd.regularizer=list", "distill.cpd.beta=0.05",
                "distill.cpd.Q=5", "distill.cpd.mxK=500", "distill.cpd.tau=0.01"]
# HTD: λ 1e-3, the HTD authors' value (de_rrd.md §10: "λ_TD≈1e-3"), not KDs' λ 0.5 (configs/distill/htd.yaml; mkd.md,
# KDs baselines): with the topology terms summed over ~10^5 pairs per batch, λ 0.5 drowned the BPR loss (bpr_htd, 3
# seeds: test NDCG@20 0.0079, below the student alone; results/superseded/htd_lambda_0.5/), while a probe at λ 1e-3
# (seed 0, capped at 100 epochs, results/mkd_probes/) reached 0.0149.
HTD_CITEULIKE = ["distill.htd.lambda_htd=0.001"]
# MKD's own weights for BPR: λ_N x λ_C searched on valid with SLD and CPD as above (configs/tune/mkd_weights_2.yaml,
# results/tune_mkd_weights_2/): λ_N 0.5 (NKD's default), λ_C 0.01 (valid NDCG@10 0.0396; the former λ_C 0.05 had
# 0.0387 at epoch 40, SLD alone 0.0392 in tune_sld_2). On test it did no better: NDCG@20 0.0173 ± 0.0001 against
# λ_C 0.05's 0.0175 ± 0.0001 (results/superseded/mkd_lambda_c_0.05/). The cpd row keeps the authors' λ_C 0.05.
MKD_BPR = SLD_BPR + [o for o in CPD_BPR_MKD if not o.startswith("distill.cpd.lambda_c=")] + [
    "distill.cpd.lambda_c=0.01", "distill.nkd.lambda_n=0.5"]
TUNED = {("bpr", "sld"): SLD_BPR, ("bpr", "mkd"): MKD_BPR, ("bpr", "cpd"): CPD_BPR_MKD,
         ("bpr", "htd"): HTD_CITEULIKE, ("lightgcn", "htd"): HTD_CITEULIKE,
         ("lightgcn", "sld"): SLD_LIGHTGCN, ("lightgcn", "mkd"): SLD_LIGHTGCN + CPD_LIGHTGCN,
         ("lightgcn", "cpd"): CPD_LIGHTGCN}
# the distill config sections each method reads (recorded per row as extra.method_config, precision aside: the
# aggregate refuses to merge seeds of one row that ran different weights)
SECTIONS = {"nkd": ["nkd"], "cpd": ["cpd"], "sld": ["sld"], "mkd": ["mkd", "nkd", "cpd", "sld"], "de_rrd": ["de", "rrd"],
            "htd": ["htd"], "unkd": ["unkd"]}


def method_config(run: dict, method: str) -> dict:
    """The distill settings ``method`` ran with in ``run`` (a fit summary), without the projectors' precision."""
    d = run["config"]["distill"]
    return {sec: {k: v for k, v in d[sec].items() if k != "precision"} for sec in SECTIONS.get(method, [])}


def _row(label: str, model: str, method: str, runs: list[dict], dims: tuple[int, int]) -> dict:
    ms = [{k: r["metrics"][k] for k in KEYS if k in r["metrics"]} for r in runs]
    configs = [method_config(r, method) for r in runs]  # {} for the teacher and the student alone
    if any(c != configs[0] for c in configs):
        raise ValueError(f"{label}: the seeds ran different {method} settings")
    mean = {k: statistics.fmean(m[k] for m in ms) for k in ms[0]}
    std = {k: (statistics.stdev(m[k] for m in ms) if len(ms) > 1 else 0.0) for k in ms[0]}
    return {
        "label": label, "dataset": "citeulike-t", "split": "mkd_80_10_10_file_order", "model": model,
        "method": method, "dim": dims[1] if method != "teacher" else dims[0], "teacher_dim": dims[0],
        "seeds": [r["config"]["train"]["seed"] for r in runs], "world_size": runs[0]["world_size"],
        "metrics": mean, "metrics_std": std,
        "timing": {"epoch_s": round(statistics.fmean(r["timing"]["epoch_train_s"] for r in runs), 3),
                   # robust to epochs slowed by other work on the machine (the mean is not)
                   "epoch_median_s": round(statistics.median(h["time/train_s"] for r in runs for h in r["history"]), 3),
                   "eval_s": round(statistics.fmean(r["timing"]["epoch_eval_s"] for r in runs), 3)},
        "extra": {"num_parameters": runs[0]["num_parameters"], "best_epochs": [r["best_epoch"] for r in runs],
                  # the projectors' matmuls of each seed (fp32 | bf16), for the methods that have projectors
                  "precision": run_precisions(runs, PROJECTORS.get(method, [])),
                  "epochs_run": [r["epochs_run"] for r in runs], "per_seed": ms,
                  **({"method_config": configs[0]} if configs[0] else {})},
    }


def _markdown(rows: list[dict]) -> str:
    head = ["row", "Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "vs teacher NDCG@20", "epoch s", "median", "seeds",
            "projectors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher = {r["model"]: r["metrics"].get("full/NDCG@20") for r in rows if r["method"] == "teacher"}
    for r in rows:
        m, s = r["metrics"], r["metrics_std"]
        cell = [f"{m[k]:.4f}" + (f" ± {s[k]:.4f}" if len(r["seeds"]) > 1 else "") if k in m else "" for k in KEYS]
        t = teacher.get(r["model"])
        ratio = f"{m['full/NDCG@20'] / t:.3f}" if t and "full/NDCG@20" in m else ""
        lines.append("| " + " | ".join([r["label"], *cell, ratio, f"{r['timing']['epoch_s']:.2f}",
                                        f"{r['timing']['epoch_median_s']:.2f}" if "epoch_median_s" in r["timing"] else "",
                                        str(len(r["seeds"])), precision_label(r, r["method"] in PROJECTORS)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bpr", "lightgcn"], choices=list(DIMS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--teacher-checkpoint", default=None, help="reuse a trained sharded teacher (one model only)")
    ap.add_argument("--teacher-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="dotted overrides for training and ranking the teacher, e.g. ray.num_workers=1 "
                    "(it takes every word after it: put it last, after the students' overrides)")
    ap.add_argument("--out", default=None, help="part name: benchmarks/results/<out>.json (+ .md); default "
                    "mkd_citeulike_<models>_<methods>_s<seeds> (merge the parts with --aggregate)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep every run (teacher, ranking, student seed) that finished before with the same config, "
                    "continue an interrupted one from its newest checkpoint, run the rest")
    ap.add_argument("--aggregate", action="store_true",
                    help="run nothing: merge every part file results/<name>_*.json into results/<name>.json")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="the projectors' and experts' matmuls of the methods that have them (nkd, cpd, mkd, de_rrd, "
                    "htd); bf16 autocast is ~2.4x faster on AVX512-BF16 CPUs. The other methods are unchanged")
    ap.add_argument("--no-tuned", dest="tuned", action="store_false",
                    help="run every method with its stand-alone defaults, not the per-model weights of TUNED")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every student run")
    args = ap.parse_args(argv)
    if args.aggregate:
        out = aggregate_parts("mkd_citeulike", KEYS, _markdown, command_line(__file__, argv),
                              [f"{m}_{x}" for m in ("bpr", "lightgcn") for x in ["teacher", *METHODS]])
        print(out.with_suffix(".md").read_text())
        return out
    sha = commit()
    if args.out is None:
        args.out = "mkd_citeulike" if args.smoke else "_".join(
            ["mkd_citeulike", "-".join(args.models), "-".join(args.methods), "s" + "-".join(map(str, args.seeds))])
    if args.out == "mkd_citeulike" and not args.smoke:
        raise SystemExit("--out mkd_citeulike is the aggregate of the parts (--aggregate); name the part differently")
    from rayrec.teacher.rank import rank_teacher
    from rayrec.train.fit import fit, fit_or_resume

    train = fit_or_resume if args.resume else fit

    out_path = RESULTS / "smoke" / f"{args.out}.json" if args.smoke else RESULTS / f"{args.out}.json"
    protocol = CONFIG_DIR / "protocol/mkd_citeulike_t.yaml"
    common = ["storage_root=runs/smoke", "train.max_epochs=1", "data.dataset=ml-100k", "data.min_user_interactions=0",
              "distill.cpd.mxK=50", "distill.sld.K=20", "distill.rrd.K=10", "distill.rrd.L=10"] if args.smoke else []
    top_n = 50 if args.smoke else 500
    rows: list[dict] = []
    total = len(args.models) * len(args.methods) * len(args.seeds)
    done = 0

    def flush(complete: bool) -> None:
        for r in rows:
            r["extra"]["complete"] = complete
        write_result(args.out, rows, command=command_line(__file__, argv), path=out_path, commit_sha=sha)
        out_path.with_suffix(".md").write_text(_markdown(rows))

    def tuned(model: str, method: str) -> list[str]:
        return TUNED.get((model, method), []) if args.tuned and not args.smoke else []  # set for CiteULike

    for model in args.models:
        t_dim, s_dim = DIMS[model] if not args.smoke else (16, 8)
        teacher_files = [protocol, CONFIG_DIR / "teacher/sharded_row_wise.yaml"]
        teacher_over = [f"name=mkd_{model}_teacher", f"model.name={model}", f"model.dim={t_dim}",
                        *(LIGHTGCN_TEACHER if model == "lightgcn" else []), *common]
        teacher_over = [o for o in teacher_over if not o.startswith("distill.")] + args.teacher_overrides
        if args.teacher_checkpoint:
            ckpt = args.teacher_checkpoint
            t = json.loads((Path(ckpt) / "summary.json").read_text())
        else:
            t = train(load_config(teacher_files, teacher_over))
            ckpt = t["checkpoint"]
        rows.append(_row(f"{model}_teacher", model, "teacher", [t], (t_dim, s_dim)))
        rows[-1]["extra"]["checkpoint"] = str(ckpt)
        flush(False)
        ranking = rank_teacher(load_config(teacher_files, [*teacher_over, f"rank.top_n={top_n}",
                                                           "rank.user_neighbors=5", "rank.item_neighbors=5"]), ckpt,
                               resume=args.resume)
        teacher_ref = [f"distill.teacher.checkpoint={ckpt}", f"distill.teacher.ranking={ranking}",
                       f"distill.teacher.name={model}", f"distill.teacher.dim={t_dim}"]
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                done += 1
                print(f"[bench] {model} {method} seed {seed} ({done}/{total})", flush=True)
                files = [protocol, *(CONFIG_DIR / f for f in METHOD_FILES[method])]
                over = [f"name=mkd_{model}_{method}_s{seed}", f"model.name={model}", f"model.dim={s_dim}",
                        f"train.seed={seed}", *(["model.init_std=0.1"] if model == "lightgcn" else []),
                        *(teacher_ref if method != "none" else []), *tuned(model, method), *common,
                        *(f"distill.{k}.precision={args.precision}" for k in PROJECTORS.get(method, [])
                          if args.precision != "fp32"), *args.overrides]
                runs.append(train(load_config(files, over)))
                # after every seed: an interrupted run keeps the seeds it finished (the aggregate merges by seed)
                rows[len(rows) - (len(runs) > 1):] = [_row(f"{model}_{method}", model, method, runs, (t_dim, s_dim))]
                rows[-1]["extra"]["tuned"] = tuned(model, method)  # the per-model weights this row ran with
                flush(False)
    flush(True)
    print(_markdown(rows))
    print(f"wrote {out_path}")
    return out_path


if __name__ == "__main__":
    main()
