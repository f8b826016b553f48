"""Data path: rows/s Ray Data delivers to the train loop vs reading the same parquet with pyarrow directly.

    RAYREC_DATA=../shared/data .venv/bin/python benchmarks/data_path.py

For each dataset (the prepared CiteULike-t DE-RRD train split; a synthetic split of ``--synthetic-rows``
interactions written as parquet):

- ``pyarrow``: one process reads the split (``pyarrow.parquet.read_table``), then every epoch does what the
  loop's data path does without Ray: chunks of ``train.shuffle_buffer`` rows in a random order, each chunk
  permuted and cut into ``--batch-size`` int64 torch batches.
- ``ray_w1`` / ``ray_w2``: the train loop's own data path through Ray Train with 1 and 2 workers
  (:func:`rayrec.train.fit.train_dataset`, the run's ``DataConfig``, :func:`rayrec.train.loop.epoch_batches` with
  the local shuffle buffer), no model: rows/s summed over the workers, the epoch as long as the slowest worker.

Epoch 0 is a warm-up; rates are over the next ``--epochs`` epochs. ``extra.ray_vs_pyarrow_ratio`` = Ray's rows/s
over pyarrow's. Writes ``benchmarks/results/data_path.json`` + ``.md``; ``--smoke``: 200k synthetic rows, 2 epochs,
1 worker, into ``benchmarks/results/smoke/``. ``--device cuda``: every batch is also copied to the GPU (the Ray
workers get one GPU each), into ``data_path_cuda.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import add_device_arg, command_line, commit, device_of, result_path, write_table_result  # noqa: E402,E501


def pyarrow_rates(train_dir: Path, batch_size: int, epochs: int, chunk: int, seed: int = 0,
                  device: torch.device = torch.device("cpu")) -> dict:
    """The same work as the loop's data path without Ray: chunks of ``chunk`` rows in a new random order each
    epoch, each chunk permuted, cut into ``batch_size`` int64 torch batches (copied to ``device``)."""
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    table = pq.read_table(str(train_dir), columns=["user", "item"])
    users, items = table["user"].to_numpy().astype(np.int64), table["item"].to_numpy().astype(np.int64)
    read_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    times, rows = [], len(users)
    for _ in range(epochs + 1):  # epoch 0: warm-up
        t = time.perf_counter()
        check = 0
        for c in rng.permutation(-(-rows // chunk)):
            order = c * chunk + rng.permutation(min(chunk, rows - c * chunk))
            u, i = torch.from_numpy(users[order]), torch.from_numpy(items[order])
            for a in range(0, len(order), batch_size):
                bu, bi = u[a : a + batch_size].to(device), i[a : a + batch_size].to(device)
                check += int(bi[-1]) + 0 * len(bu)
        times.append(time.perf_counter() - t)
    s = sum(times[1:])
    return {"rows": rows, "read_s": round(read_s, 4), "epoch_s": round(s / epochs, 4),
            "rows_per_s": round(rows * epochs / s, 1)}


def ray_rates(train_dir: Path, batch_size: int, epochs: int, workers: int, train_overrides: list[str],
              use_gpu: bool = False) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayrec.config import RayConfig, TrainConfig, build
    from rayrec.runtime import init_ray, worker_runtime_env
    from rayrec.train.fit import train_data_config, train_dataset
    from rayrec.train.loop import ingest_loop_per_worker

    import dataclasses

    import yaml

    over = {k.removeprefix("train."): yaml.safe_load(v) for k, v in (o.split("=", 1) for o in train_overrides)}
    tc = build(TrainConfig, {"batch_size": batch_size, **over})
    init_ray(RayConfig())
    t0 = time.perf_counter()
    ds = train_dataset(tc, train_dir.parent)
    setup_s = time.perf_counter() - t0
    dc = train_data_config(tc)
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            ingest_loop_per_worker,
            train_loop_config={"train": dataclasses.asdict(tc), "epochs": epochs + 1},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": 1.0}),
            run_config=ray.train.RunConfig(storage_path=storage, worker_runtime_env=worker_runtime_env(),
                                           logging_config=ray.train.LoggingConfig(log_level="WARNING")),
            datasets={"train": ds},
            **({"dataset_config": dc} if dc is not None else {}),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    eps = result.return_value["epochs"]
    s = sum(e["s"] for e in eps[1:])
    rows = eps[1]["rows"]
    return {"rows": rows, "setup_s": round(setup_s, 4), "epoch_s": round(s / epochs, 4),
            "rows_per_s": round(rows * epochs / s, 1), "workers": workers}


def _synthetic(where: Path, rows: int, users: int = 1_000_000, items: int = 1_000_000, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    d = where / "synthetic" / "train"
    d.mkdir(parents=True)
    for part, a in enumerate(range(0, rows, 2_000_000)):
        n = min(2_000_000, rows - a)
        pq.write_table(pa.table({"user": rng.integers(0, users, n), "item": rng.integers(0, items, n)}),
                       d / f"part-{part:05d}.parquet")
    return d


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic-rows", type=int, default=10_000_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-citeulike", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    add_device_arg(ap)
    ap.add_argument("train_overrides", nargs="*", help="train.* fields, e.g. shuffle=none read_blocks=128")
    args = ap.parse_args(argv)
    device = device_of(args.device)
    if args.smoke:
        args.synthetic_rows, args.epochs, args.workers, args.no_citeulike = 200_000, 2, [1], True
    sha = commit()
    out_path = result_path("data_path", args.smoke, args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if not args.no_citeulike:
            from rayrec.config import CONFIG_DIR, load_config
            from rayrec.data.prepared import prepare
            from rayrec.train.fit import prepared_root

            cfg = load_config([CONFIG_DIR / "data/citeulike_t_derrd.yaml"], [])
            sets.append(("citeulike", prepare(cfg.data, prepared_root(cfg), progress=lambda s: None) / "train"))
        sets.append((f"synthetic_{args.synthetic_rows // 1_000_000 or args.synthetic_rows}"
                     f"{'m' if args.synthetic_rows >= 1_000_000 else ''}", _synthetic(Path(tmp), args.synthetic_rows)))
        for name, train_dir in sets:
            from rayrec.config import TrainConfig

            base = pyarrow_rates(train_dir, args.batch_size, args.epochs, TrainConfig().shuffle_buffer, device=device)
            print(f"[data_path] {name} pyarrow: {base['rows_per_s']:,.0f} rows/s", flush=True)
            rows.append({"label": f"{name}_pyarrow", "dataset": name, "world_size": 1,
                         "timing": {"epoch_s": base["epoch_s"], "rows_per_s": base["rows_per_s"],
                                    "read_s": base["read_s"]},
                         "extra": {"rows": base["rows"], "batch_size": args.batch_size, "epochs": args.epochs}})
            for w in args.workers:
                r = ray_rates(train_dir, args.batch_size, args.epochs, w, args.train_overrides,
                              use_gpu=args.device == "cuda")
                assert r["rows"] == base["rows"], (r, base)  # every row delivered once per epoch
                ratio = r["rows_per_s"] / base["rows_per_s"]
                print(f"[data_path] {name} ray x{w}: {r['rows_per_s']:,.0f} rows/s ({ratio:.2f}x pyarrow)", flush=True)
                rows.append({"label": f"{name}_ray_w{w}", "dataset": name, "world_size": w,
                             "timing": {"epoch_s": r["epoch_s"], "rows_per_s": r["rows_per_s"],
                                        "setup_s": r["setup_s"]},
                             "extra": {"rows": r["rows"], "batch_size": args.batch_size, "epochs": args.epochs,
                                       "ray_vs_pyarrow_ratio": round(ratio, 4),
                                       "train_overrides": args.train_overrides}})
    def cells(r):
        ratio = r["extra"].get("ray_vs_pyarrow_ratio")
        return [r["label"], f"{r['timing']['rows_per_s']:,.0f}", f"{r['timing']['epoch_s']:.3f}",
                "" if ratio is None else f"{ratio:.3f}"]

    write_table_result(out_path.stem, rows, command_line(__file__, argv), out_path, sha,
                       ["row", "rows/s", "epoch s", "vs pyarrow"], cells)
    return out_path


if __name__ == "__main__":
    main()
