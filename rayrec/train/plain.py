"""The train loop's steps in one plain PyTorch process: no Ray Train, no Ray Data, no DDP.

The reference the Ray path is measured against (``benchmarks/train_speed.py``): the same model, distillation
method, frozen sharded teacher (TorchRec over a 1-rank gloo group), negative sampler and per-step work
(:func:`rayrec.train.loop.step_loss`), with the train rows permuted in memory each epoch. No evaluation,
checkpoints or early stopping: :func:`plain_epochs` returns each epoch's rows and seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from rayrec.config import ExperimentConfig


def _parquet_stream(path: Path):
    import pyarrow.parquet as pq

    return [pq.read_table(str(path))]  # one pyarrow table, as Ray Data's batch_format="pyarrow" batches are


def plain_epochs(cfg: ExperimentConfig, prepared: str | Path, epochs: int, threads: int = 1,
                 device: torch.device | str = "cpu") -> list[dict]:
    """Train ``cfg`` for ``epochs`` epochs in this process with ``threads`` torch threads on ``device`` (the
    teacher's 1-rank group is nccl on CUDA); per epoch ``{"rows", "s", "loss", "metrics"}`` (the mean base loss per
    row; the method's ``epoch_metrics()``)."""
    from rayrec.data.prepared import load_prepared
    from rayrec.eval.evaluate import EvalData
    from rayrec.models import build_model
    from rayrec.train.fit import _ranking_for
    from rayrec.train.loop import _build_distillation, method_epoch_start, step_loss
    from rayrec.train.optim import adam
    from rayrec.train.sampling import NegativeSampler, epoch_generator
    from rayrec.train.task import TrainTask

    if cfg.model.sharding != "none":
        raise ValueError("plain_epochs trains a dense student (model.sharding=none)")
    import torch.distributed as dist

    from rayrec.distributed import ensure_process_group

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    if cfg.train.flush_denormal:  # as the Ray loop does
        from rayrec.train.denormal import flush_denormals

        flush_denormals()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = (ensure_process_group("nccl" if device.type == "cuda" else "gloo")
                 if cfg.distill.method != "none" else False)
    try:
        tc = cfg.train
        pd = load_prepared(prepared)
        evald = EvalData.from_prepared(pd)
        sampler = NegativeSampler(evald.train.indptr.numpy(), evald.train.indices.numpy(), pd.num_items)
        torch.manual_seed(tc.seed)
        model = build_model(cfg.model.name, pd.num_users, pd.num_items, cfg.model.dim, cfg.model.init_std,
                            layers=cfg.model.layers, graph=(pd.train_user, pd.train_item)).to(device)
        ranking = _ranking_for(cfg)
        root = Path(ranking["path"]) if ranking else None
        names = {"teacher_topn": "topn", "teacher_user_nn": "user_neighbors", "teacher_item_nn": "item_neighbors"}
        method, teacher = _build_distillation(cfg, pd, evald, device, 0, ranking,
                                              stream=lambda name: _parquet_stream(root / names[name]))
        task = TrainTask(model, reduction=tc.loss_reduction, world_size=1, method=method).to(device)
        optim = adam(task.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        users = torch.from_numpy(np.asarray(pd.train_user, dtype=np.int64))
        items = torch.from_numpy(np.asarray(pd.train_item, dtype=np.int64))
        out = []
        for epoch in range(epochs):
            gen = epoch_generator(tc.seed, epoch, 0)
            sync()
            t0 = time.perf_counter()
            if method is not None:
                method_epoch_start(method, teacher, model, epoch, tc.seed, pd.num_users, evald, device)
            task.train()
            order = torch.randperm(len(users), generator=torch.Generator().manual_seed(tc.seed * 7919 + epoch))
            total = 0.0
            for a in range(0, len(order), tc.batch_size):
                idx = order[a : a + tc.batch_size]
                loss, terms = step_loss(task, method, teacher, sampler, users[idx], items[idx], tc.num_negatives,
                                        gen, device)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += float(terms["base"])
            sync()
            out.append({"rows": len(order), "s": time.perf_counter() - t0, "loss": total / len(order),
                        "metrics": method.epoch_metrics() if method is not None else {}})
        return out
    finally:
        torch.set_num_threads(old_threads)
        if own_group:
            dist.destroy_process_group()
