"""Export a trained student for serving: a ``torch.export`` program (TorchScript where export fails) that returns
every user's top-K items, plus the id maps (internal id -> raw id) and a manifest with checksums written last.
Experts, projectors and every other training-only part are not in it.

    RAYREC_DATA=../shared/data .venv/bin/python jobs/export.py --checkpoint <student run's final checkpoint> --out runs/exported/bpr_d20
    ray job submit --working-dir . -- python jobs/export.py --checkpoint <checkpoint> --out runs/exported/bpr_d20

``--checkpoint`` is the final checkpoint ``distill`` (or ``train_teacher`` for a small teacher) printed; its
``summary.json`` names the model and the prepared data. Load the result with ``rayrec.serve.load_exported``
(``device=`` where it serves). ``--device cuda`` traces the graph on a GPU, for serving there: every item scored in
one GEMM instead of the CPU's cache-sized chunks (a CPU export still runs on a GPU once loaded there, slower).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rayrec.cli import run_job  # noqa: E402
from rayrec.serve import export_student, load_exported  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a finished run's final checkpoint (with summary.json)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--k", type=int, default=20, help="items returned per user")
    ap.add_argument("--device", default="cpu", help="where the student will serve (cpu, cuda): its graph is traced "
                    "there")
    args = ap.parse_args(argv)
    out = export_student(args.checkpoint, args.out, k=args.k, device=args.device)
    _, m = load_exported(out, device=args.device)
    print(f"\nexported {m['model']['name']} d={m['model']['dim']} ({m['num_parameters']:,} parameters, "
          f"{m['format']}): {out}")
    return out


if __name__ == "__main__":
    run_job(main)
