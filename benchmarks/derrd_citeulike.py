"""DE-RRD's Table 2 on CiteULike-t (DE-RRD's own split): teacher, student alone, RD, CD, DE, RRD, DE-RRD.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/derrd_citeulike.py --models bpr --seeds 0 1 2

Per base model: the teacher is trained as TorchRec tables (BPR: row-wise sharded over 2 Ray Train workers, fused
row-wise Adagrad, ``configs/teacher/sharded_row_wise.yaml``; NeuMF: replicated on 1 worker with the paper's dense
Adam, ``configs/teacher/replicated_adam.yaml``, which says why; ``--teacher-checkpoint`` reuses one,
``--teacher-overrides`` adds dotted overrides to its training and ranking), ranked once with its tables row-wise
sharded (top-500 per user, train items excluded), then every method distills it, row-wise sharded, into a φ = 0.1
student (BPR 200 -> 20, NeuMF 252 -> 25: fbgemm's sharded tables need a multiple of 4, so the NeuMF teacher is
252 wide instead of the paper's 250) with the paper's training set-up, for each seed.
Rows ``<model>_teacher``, ``<model>_<method>``: test metrics at the best valid H@5 epoch (mean over seeds,
``metrics_std``), epoch time (``timing.epoch_s`` the mean, ``epoch_median_s`` the median over every epoch of every
seed, which other work on the machine barely moves), and the paper's numbers in ``extra.paper``. The file (and
``derrd_citeulike.md``) is rewritten after every run with ``extra.complete`` false until the last one, so an
interrupted run keeps what it measured; ``--resume`` (the same command again) keeps every run that finished with the
same config and continues the interrupted one from its newest checkpoint. ``--smoke``: ML-100K, 1 epoch, 1 seed,
tiny teacher, into ``benchmarks/results/smoke/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS, aggregate_parts, command_line, commit, precision_label,  # noqa: E402
                               run_precisions, write_result)
from rayrec.config import CONFIG_DIR, load_config  # noqa: E402

KEYS = ["test/H@5", "test/N@5", "test/H@10", "test/N@10", "test/H@20", "test/N@20", "full/Recall@20", "full/NDCG@20"]
METHODS = ["none", "rd", "cd", "de", "rrd", "de_rrd"]
# DE-RRD Table 2, CiteULike, φ = 0.1 (H@5, N@5, H@10, N@10, H@20, N@20), via ../shared/docs/methods/de_rrd.md §8.1
PAPER = {
    "bpr": {"teacher": (0.5135, 0.3970, 0.6185, 0.4310, 0.7099, 0.4541),
            "none": (0.4441, 0.3319, 0.5541, 0.3691, 0.6557, 0.3906),
            "rd": (0.4533, 0.3395, 0.5601, 0.3740, 0.6633, 0.3993),
            "cd": (0.4550, 0.3404, 0.5607, 0.3746, 0.6650, 0.4011),
            "de": (0.4817, 0.3625, 0.5916, 0.3977, 0.6917, 0.4229),
            "rrd": (0.4622, 0.3461, 0.5703, 0.3809, 0.6746, 0.4074),
            "de_rrd": (0.4843, 0.3632, 0.5966, 0.3989, 0.6991, 0.4251)},
    "neumf": {"teacher": (0.4790, 0.3684, 0.5827, 0.4020, 0.6748, 0.4254),
              "none": (0.3867, 0.2865, 0.4909, 0.3202, 0.5833, 0.3436),
              "rd": (0.4179, 0.3113, 0.5211, 0.3444, 0.6227, 0.3696),
              "cd": (0.4025, 0.2979, 0.5030, 0.3306, 0.6053, 0.3550),
              "de": (0.4079, 0.2986, 0.5139, 0.3328, 0.6238, 0.3607),
              "rrd": (0.4737, 0.3497, 0.5800, 0.3847, 0.6765, 0.4094),
              "de_rrd": (0.4758, 0.3518, 0.5805, 0.3856, 0.6770, 0.4099)},
}
PAPER_KEYS = ["test/H@5", "test/N@5", "test/H@10", "test/N@10", "test/H@20", "test/N@20"]
DIMS = {"bpr": (200, 20), "neumf": (252, 25)}
TEACHER = {"bpr": "teacher/sharded_row_wise.yaml", "neumf": "teacher/replicated_adam.yaml"}
# NeuMF's weights for CiteULike-t are read from its experiment config (which says where they come from: λ_RRD and T
# from the validation search configs/tune/neumf_rrd.yaml, λ_DE = 0.01 since at the paper's Foursquare 1e-4 the DE
# term is 0.2-0.3% of the NeuMF base loss per row, against 13-40% for BPR at 0.01). BPR uses distill/de_rrd as is.
WEIGHTS_FROM = {"neumf": "experiments/citeulike__neumf_d252_to_d25__de_rrd.yaml"}
EXPERTS = {"de": ["de"], "de_rrd": ["de"]}  # the config sections with expert matmuls (distill.de.precision), per method


def model_overrides(model: str) -> list[str]:
    """λ_DE, λ_RRD and T of ``model``'s experiment config as dotted overrides (none for BPR)."""
    if model not in WEIGHTS_FROM:
        return []
    d = yaml.safe_load((CONFIG_DIR / WEIGHTS_FROM[model]).read_text())["distill"]
    return [f"distill.de.lambda_de={d['de']['lambda_de']}", f"distill.rrd.lambda_rrd={d['rrd']['lambda_rrd']}",
            f"distill.rrd.T={d['rrd']['T']}"]


def _row(label: str, model: str, method: str, runs: list[dict], dims: tuple[int, int], world: int) -> dict:
    ms = [{k: r["metrics"][k] for k in KEYS if k in r["metrics"]} for r in runs]
    mean = {k: statistics.fmean(m[k] for m in ms) for k in ms[0]}
    std = {k: (statistics.stdev(m[k] for m in ms) if len(ms) > 1 else 0.0) for k in ms[0]}
    paper = PAPER.get(model, {}).get(method)
    return {
        "label": label, "dataset": "citeulike-t", "split": "derrd_loo_seed0", "model": model, "method": method,
        "dim": dims[1] if method != "teacher" else dims[0], "teacher_dim": dims[0],
        "seeds": [r["config"]["train"]["seed"] for r in runs], "world_size": world,
        "metrics": mean, "metrics_std": std,
        "timing": {"epoch_s": round(statistics.fmean(r["timing"]["epoch_train_s"] for r in runs), 3),
                   # robust to epochs slowed by other work on the machine (the mean is not)
                   "epoch_median_s": round(statistics.median(h["time/train_s"] for r in runs for h in r["history"]), 3),
                   "eval_s": round(statistics.fmean(r["timing"]["epoch_eval_s"] for r in runs), 3)},
        "extra": {"paper": dict(zip(PAPER_KEYS, paper)) if paper else None,
                  "num_parameters": runs[0]["num_parameters"],
                  "best_epochs": [r["best_epoch"] for r in runs], "epochs_run": [r["epochs_run"] for r in runs],
                  "precision": run_precisions(runs, EXPERTS.get(method, [])),  # DE's expert matmuls per seed
                  "per_seed": ms},
    }


def _markdown(rows: list[dict]) -> str:
    head = ["row", "H@5", "N@5", "H@10", "N@10", "H@20", "N@20", "Recall@20", "NDCG@20", "paper H@5", "epoch s",
            "median", "seeds", "experts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, s = r["metrics"], r["metrics_std"]
        cell = [f"{m[k]:.4f}" + (f" ± {s[k]:.4f}" if len(r["seeds"]) > 1 else "") if k in m else "" for k in KEYS]
        paper = r["extra"]["paper"]["test/H@5"] if r["extra"].get("paper") else None
        lines.append("| " + " | ".join([r["label"], *cell, f"{paper:.4f}" if paper else "", f"{r['timing']['epoch_s']:.2f}",
                                        f"{r['timing']['epoch_median_s']:.2f}" if "epoch_median_s" in r["timing"] else "",
                                        str(len(r["seeds"])), precision_label(r, r["method"] in EXPERTS)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bpr", "neumf"], choices=["bpr", "neumf"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--teacher-checkpoint", default=None, help="reuse a trained sharded teacher (one model only)")
    ap.add_argument("--teacher-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="dotted overrides for training and ranking the teacher, e.g. train.threads_per_worker=1 "
                    "(it takes every word after it: put it last, after the students' overrides)")
    ap.add_argument("--out", default=None, help="part name: benchmarks/results/<out>.json (+ .md); default "
                    "derrd_citeulike_<models>_<methods>_s<seeds> (merge the parts with --aggregate)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep every run (teacher, ranking, student seed) that finished before with the same config, "
                    "continue an interrupted one from its newest checkpoint, run the rest")
    ap.add_argument("--aggregate", action="store_true",
                    help="run nothing: merge every part file results/<name>_*.json into results/<name>.json")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every student run")
    args = ap.parse_args(argv)
    if args.aggregate:
        out = aggregate_parts("derrd_citeulike", KEYS, _markdown, command_line(__file__, argv),
                              [f"{m}_{x}" for m in ("bpr", "neumf") for x in ["teacher", *METHODS]])
        print(out.with_suffix(".md").read_text())
        return out
    sha = commit()
    if args.out is None:
        args.out = "derrd_citeulike" if args.smoke else "_".join(
            ["derrd_citeulike", "-".join(args.models), "-".join(args.methods), "s" + "-".join(map(str, args.seeds))])
    if args.out == "derrd_citeulike" and not args.smoke:
        raise SystemExit("--out derrd_citeulike is the aggregate of the parts (--aggregate); name the part differently")
    from rayrec.teacher.rank import rank_teacher
    from rayrec.train.fit import fit, fit_or_resume

    train = fit_or_resume if args.resume else fit

    out_path = RESULTS / "smoke" / f"{args.out}.json" if args.smoke else RESULTS / f"{args.out}.json"
    common = ["storage_root=runs/smoke", "train.max_epochs=1", "data.num_eval_negatives=99"] if args.smoke else []
    data = "data/ml100k" if args.smoke else "data/citeulike_t_derrd"
    rows: list[dict] = []
    total = len(args.models) * len(args.methods) * len(args.seeds)
    done = 0

    def flush(complete: bool) -> None:
        for r in rows:
            r["extra"]["complete"] = complete
        write_result(args.out, rows, command=command_line(__file__, argv), path=out_path, commit_sha=sha)
        out_path.with_suffix(".md").write_text(_markdown(rows))

    for model in args.models:
        t_dim, s_dim = DIMS[model] if not args.smoke else (20 if model == "bpr" else 24, 8)
        teacher_files = [CONFIG_DIR / f"{data}.yaml", CONFIG_DIR / TEACHER[model]]
        teacher_over = [f"name=derrd_{model}_teacher", f"model.name={model}", f"model.dim={t_dim}", *common,
                        *args.teacher_overrides]
        if args.teacher_checkpoint:  # its row comes from the summary the training run left in the checkpoint
            ckpt = args.teacher_checkpoint
            t = json.loads((Path(ckpt) / "summary.json").read_text())
            t.setdefault("config", {"train": {"seed": 0}})  # summaries written before they carried the config
        else:
            t = train(load_config(teacher_files, teacher_over))
            ckpt = t["checkpoint"]
        rows.append(_row(f"{model}_teacher", model, "teacher", [t], (t_dim, s_dim), t["world_size"]))
        rows[-1]["extra"]["checkpoint"] = str(ckpt)
        flush(False)
        ranking = rank_teacher(load_config(teacher_files, [*teacher_over, "rank.top_n=500"]), ckpt,
                               resume=args.resume)
        teacher_ref = [f"distill.teacher.checkpoint={ckpt}", f"distill.teacher.ranking={ranking}",
                       f"distill.teacher.name={model}", f"distill.teacher.dim={t_dim}"]
        for method in args.methods:
            runs = []
            for seed in args.seeds:
                done += 1
                print(f"[bench] {model} {method} seed {seed} ({done}/{total})", flush=True)
                cfg = load_config([CONFIG_DIR / f"{data}.yaml", CONFIG_DIR / "distill/de_rrd.yaml"],
                                  [f"name=derrd_{model}_{method}_s{seed}", f"model.name={model}", f"model.dim={s_dim}",
                                   f"distill.method={method}", f"train.seed={seed}", *teacher_ref,
                                   *model_overrides(model), *common, *args.overrides])
                runs.append(train(cfg))
                # after every seed: an interrupted run keeps the seeds it finished (the aggregate merges by seed)
                row = _row(f"{model}_{method}", model, method, runs, (t_dim, s_dim), runs[0]["world_size"])
                rows[len(rows) - (len(runs) > 1):] = [row]
                flush(False)
    flush(True)
    print(_markdown(rows))
    print(f"wrote {out_path}")
    return out_path


if __name__ == "__main__":
    main()
