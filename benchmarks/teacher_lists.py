"""How personal a teacher's top lists are: what RRD (and SLD, CPD) distill is the teacher's top-N per user.

    .venv/bin/python benchmarks/teacher_lists.py --out teacher_lists_derrd \
        bpr=<ranking artifact of the BPR teacher> neumf=<ranking artifact of the NeuMF teacher>

For each ranking artifact (``jobs/rank_teacher.py``'s output) and its first ``--top`` items per user: how many
distinct items appear in any list, the share of all list slots taken by the 100 and the 1,000 most listed items
(``top100_share``, ``top1000_share``: popularity concentration), and the mean overlap of two random users' top-10
lists (``pair_overlap_at_10``, 3,000 pairs). For every pair of artifacts over the same users, the mean per-user
overlap of their top lists. Writes ``results/<out>.json`` + ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, command_line, commit, write_table_result  # noqa: E402
from rayrec.teacher.rank import load_ranking  # noqa: E402


def list_stats(items: np.ndarray, num_items: int, top: int, seed: int = 0) -> dict[str, float]:
    """Concentration and personalisation of ``items`` ``[U, N]`` (``-1`` past a short list), first ``top`` each."""
    lists = items[:, :top]
    listed = lists[lists >= 0]
    counts = np.sort(np.bincount(listed, minlength=num_items))[::-1]
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(items), 3000), rng.integers(0, len(items), 3000)
    keep = a != b
    top10 = items[:, :10]
    overlap = [len(np.intersect1d(top10[i], top10[j])) / 10 for i, j in zip(a[keep], b[keep])]
    return {"distinct_items": int((counts > 0).sum()), "top100_share": float(counts[:100].sum() / counts.sum()),
            "top1000_share": float(counts[:1000].sum() / counts.sum()), "pair_overlap_at_10": float(np.mean(overlap))}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rankings", nargs="+", metavar="LABEL=PATH", help="ranking artifacts to compare")
    ap.add_argument("--top", type=int, default=40, help="list length looked at (RRD's K = 40 interesting items)")
    ap.add_argument("--out", default="teacher_lists")
    args = ap.parse_args(argv)
    sha = commit()
    loaded = {}
    for spec in args.rankings:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"expected LABEL=PATH, got {spec!r}")
        loaded[label] = load_ranking(path)
    rows = []
    for label, r in loaded.items():
        stats = list_stats(r.items, int(r.manifest["num_items"]), args.top)
        rows.append({"label": label, "dataset": Path(r.manifest["prepared"]).name, "model": r.manifest["model"]["name"],
                     "dim": r.manifest["model"]["dim"], "metrics": stats,
                     "extra": {"ranking": str(r.path), "top": args.top, "num_users": int(r.manifest["num_users"])}})
    labels = list(loaded)
    for i, x in enumerate(labels):  # per-user agreement between teachers over the same users
        for y in labels[i + 1:]:
            a, b = loaded[x].items[:, : args.top], loaded[y].items[:, : args.top]
            if a.shape[0] == b.shape[0]:
                same = np.mean([len(np.intersect1d(u, v[v >= 0])) / args.top for u, v in zip(a, b)])
                rows.append({"label": f"{x}_vs_{y}", "metrics": {f"user_overlap_at_{args.top}": float(same)},
                             "extra": {"top": args.top}})
    out = RESULTS / f"{args.out}.json"
    head = ["row", "distinct items", "top-100 share", "top-1000 share", "2-user overlap@10",
            f"same-user overlap@{args.top}"]

    def cells(r: dict) -> list[str]:
        m = r["metrics"]
        f = [m.get(k) for k in ("distinct_items", "top100_share", "top1000_share", "pair_overlap_at_10",
                                f"user_overlap_at_{args.top}")]
        return [r["label"], *("" if v is None else (str(v) if isinstance(v, int) else f"{v:.4f}") for v in f)]

    return write_table_result(args.out, rows, command_line(__file__, argv), out, sha, head, cells)


if __name__ == "__main__":
    main()
