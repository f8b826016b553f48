"""The training loop that runs in every Ray Train worker (teacher, student and, later, distillation).

Per epoch: stream this worker's shard of the train interactions from Ray Data (local shuffle), draw fresh
negatives in the worker, step the DDP-wrapped model, evaluate on the validation split (users sharded over
ranks, sums all-reduced), report metrics with a checkpoint, and stop early when ``train.monitor`` has not
improved for ``train.patience`` epochs. At the end the best epoch's weights are evaluated on valid and test with
every configured protocol, reported with a final checkpoint, and returned by rank 0 (``Result.return_value``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rayrec.artifacts import check_checkpoint, upload_checkpoint, write_checkpoint_manifest
from rayrec.config import ExperimentConfig, build
from rayrec.distributed import all_reduce
from rayrec.eval.evaluate import EvalData, evaluate
from rayrec.models import build_model
from rayrec.distill.base import DistillBatch
from rayrec.train.optim import adam
from rayrec.train.sampling import NegativeSampler, epoch_generator
from rayrec.train.task import TrainTask
from rayrec.train.weights import DenseWeights, ShardedWeights


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _allreduce_sum(values: list[float]) -> list[float]:
    return all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def _improved(value: float, best: float | None, mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def early_stopping_step(state: dict, metrics: dict, epoch: int, tc) -> bool:
    """Update ``state`` (best, best_epoch, bad_epochs, best_any) with one epoch's ``metrics``; True when
    ``tc.monitor`` improved (the model to keep). The patience counter restarts when the monitor improves, or when
    any metric of ``tc.patience_any`` improves on its own best (the DE-RRD code's rule with valid H@5/H@10/H@20)."""
    others = state.setdefault("best_any", {})
    waiting = [k for k in tc.patience_any if _improved(metrics.get(k), others.get(k), tc.monitor_mode)]
    others.update({k: metrics[k] for k in waiting})
    value = metrics.get(tc.monitor)
    if _improved(value, state["best"], tc.monitor_mode):
        state.update(best=value, best_epoch=epoch, bad_epochs=0)
        return True
    state["bad_epochs"] = 0 if waiting else state["bad_epochs"] + 1
    return False


def grads_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite. One summing pass per gradient: a sum is finite when every
    element is (NaN and ±inf propagate), so only when a sum is not finite (or overflowed) is that gradient checked
    element by element. ``torch.isfinite(g).all()`` makes four passes (eq, ne, abs, and): 31% of a step of a
    NeuMF teacher with 17M replicated table parameters (py-spy, one thread); on that gradient 0.11 s -> 0.006 s."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    # an overflowing sum only sends its gradient to the exact check
    ok = torch.isfinite(torch.stack([g.sum().float() for g in grads])).tolist()
    return all(bool(torch.isfinite(g).all()) for g, fine in zip(grads, ok) if not fine)


def _nonfinite(rank: int, world: int, epoch: int, step: int, what: str, terms: dict) -> str:
    """The message naming where training went non-finite: epoch, global step and every rank's loss terms."""
    mine = {k: float(v) for k, v in terms.items()}
    per_rank = [mine]
    if world > 1:
        import torch.distributed as dist

        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        if any(not math.isfinite(v) for t in per_rank for v in t.values()):
            what = "loss"  # some rank's loss (its gradients, all-reduced, stopped this rank)
    shown = "; ".join(f"rank {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in t.items()) for r, t in enumerate(per_rank))
    return f"non-finite {what} at epoch {epoch}, step {step} (loss terms {shown})"


def _save_state(d: str, optim, state: dict) -> None:
    if optim is not None:
        torch.save(optim.state_dict(), os.path.join(d, "optim.pt"))
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


def _build_distillation(cfg: ExperimentConfig, pd, evald: EvalData, device, rank: int, ranking: dict | None,
                        stream=None):
    """``(method, frozen teacher)`` for ``cfg.distill`` (``(None, None)`` for ``none``), built in every worker.
    ``stream(name)``: pyarrow batches of a side input (``teacher_topn``, ``teacher_user_nn``, ``teacher_item_nn``);
    default the whole Ray Data dataset of that name (Ray Train workers)."""
    dc = cfg.distill
    if dc.method == "none":
        return None, None
    from rayrec.distill import build_method, needs

    topn = topn_scores = neighbors = None
    if ranking is not None:
        from rayrec.teacher.rank import lists_from_tables

        if (ranking["num_users"], ranking["num_items"]) != (pd.num_users, pd.num_items):
            raise ValueError(f"{ranking['path']}: ranking of {ranking['num_users']} users x {ranking['num_items']} "
                             f"items, data has {pd.num_users} x {pd.num_items} (another prepared dataset?)")

        def ray_stream(name: str):  # [ray] a whole (unsplit) Ray Data dataset, batch by batch
            import ray.train

            return ray.train.get_dataset_shard(name).iter_batches(batch_size=4096, batch_format="pyarrow")

        stream = stream or ray_stream

        if ranking.get("lists", True):
            topn, topn_scores = lists_from_tables(stream("teacher_topn"), "user", "items", pd.num_users,
                                                  ranking["top_n"])
        if ranking.get("neighbors"):
            neighbors = {
                "user": lists_from_tables(stream("teacher_user_nn"), "user", "neighbors", pd.num_users,
                                          ranking["k_user"])[0],
                "item": lists_from_tables(stream("teacher_item_nn"), "item", "neighbors", pd.num_items,
                                          ranking["k_item"])[0],
            }
    method = build_method(dc, student_name=cfg.model.name, student_dim=cfg.model.dim, num_items=pd.num_items,
                          train_csr=(evald.train.indptr.numpy(), evald.train.indices.numpy()), topn=topn,
                          topn_scores=topn_scores, neighbors=neighbors)
    teacher = None
    if needs(dc).checkpoint and method.needs_teacher:
        from rayrec.teacher.frozen import load_frozen_teacher

        teacher = load_frozen_teacher(dc.teacher.checkpoint, name=dc.teacher.name, num_users=pd.num_users,
                                      num_items=pd.num_items, dim=dc.teacher.dim, sharding_type=dc.teacher.sharding,
                                      device=device, layers=dc.teacher.layers, graph=(pd.train_user, pd.train_item))
    n = sum(p.numel() for p in method.parameters())
    _log(rank, f"[distill] {dc.method}: {n:,} training-only parameters"
               f"{'; teacher ' + dc.teacher.name + ' d=' + str(dc.teacher.dim) + ' ' + dc.teacher.sharding if teacher else ''}")
    return method.to(device), teacher


def method_epoch_start(method, teacher, model, epoch: int, seed: int, num_users: int, evald, device) -> None:
    """A distillation method's per-epoch hooks, the same on every rank (collective when they need the student's
    ranking or the teacher): temperature and resampled lists, the current student's top-K for every user (SLD),
    the teacher's scores of lists fixed for the epoch (SLD)."""
    method.on_epoch_start(epoch, epoch_generator(seed + 1, epoch, 0))
    want = method.student_topk_request()
    if want is not None:  # [distill] the current student's top-K for every user, all ranks together
        from rayrec.train.student_rank import student_topk

        method.set_student_topk(student_topk(model, num_users, want[0], evald.train if want[1] else None, device))
    lists = method.epoch_teacher_lists()
    if lists is not None:  # [distill] the teacher scores each list once per epoch, not in every batch
        method.set_teacher_scores(teacher.score_lists(lists, device))


def step_loss(task, method, teacher, sampler, users, pos, num_negatives: int, gen, device):
    """One step's loss for ``users`` ``[B]`` and their positives ``pos`` ``[B]``: fresh negatives ``[B, N]``, the
    teacher's answer to the method's request, the task's forward -> ``(loss, {term: value})``."""
    neg = sampler.sample(users, num_negatives, gen)  # [B, N]
    users, pos, neg = users.to(device), pos.to(device), neg.to(device)
    if method is None:
        return task(users, pos, neg)
    db = DistillBatch(users, pos, neg)
    # [distill] teacher lookups outside the DDP forward, under no_grad (collective: every rank, every step)
    answer = teacher.answer(method.teacher_request(db)) if method.needs_teacher else None
    return task(users, pos, neg, db, answer)


FETCH_ROWS = 262_144  # rows asked of Ray Data at once (~4 MB of ids); cut into the shuffle's chunks locally


def _chunks(shard, chunk: int):
    """The shard's rows as consecutive int64 ``(user, item)`` arrays of ``chunk`` rows (the last one short), fetched
    from Ray Data ``FETCH_ROWS // chunk`` chunks at a time: the rows ``iter_batches(batch_size=chunk)`` gives, cut
    the same way, with Ray Data's per-batch work paid once per fetch. That work runs in threads of this process
    beside the training steps: fetching 16k-row chunks cost a 1-worker student epoch ~0.06 s of 0.25 s."""
    import numpy as np

    fetch = chunk * max(1, FETCH_ROWS // chunk)
    for big in shard.iter_batches(batch_size=fetch, batch_format="numpy"):
        bu, bi = big["user"].astype(np.int64, copy=False), big["item"].astype(np.int64, copy=False)
        for a in range(0, len(bu), chunk):
            yield bu[a : a + chunk], bi[a : a + chunk]


def epoch_batches(shard, tc, per_worker_batch: int, epoch: int):
    """One epoch of this worker's train shard as int64 ``{"user": [B], "item": [B]}`` torch batches.

    The shard is streamed in chunks of ``shuffle_buffer`` rows (numpy, :func:`_chunks`), each chunk's rows
    permuted with a generator seeded by (seed, epoch) when ``shuffle=blocks``, and cut into ``per_worker_batch``
    slices locally; a chunk's remainder is carried into the next, so only the epoch's last batch is short. Asking
    Ray Data for 1k-row torch batches directly cost ~2.5 ms per batch on 2 cores (~0.4M rows/s); chunks amortise it.
    """
    import numpy as np

    rng = np.random.default_rng([tc.seed, 7919, epoch]) if tc.shuffle == "blocks" else None
    carry_u = carry_i = np.zeros(0, dtype=np.int64)
    for u, i in _chunks(shard, max(tc.shuffle_buffer, per_worker_batch)):
        if rng is not None:
            order = rng.permutation(len(u))
            u, i = u[order], i[order]
        if len(carry_u):
            u, i = np.concatenate([carry_u, u]), np.concatenate([carry_i, i])
        full = len(u) // per_worker_batch * per_worker_batch
        tu, ti = torch.from_numpy(np.ascontiguousarray(u[:full])), torch.from_numpy(np.ascontiguousarray(i[:full]))
        for a in range(0, full, per_worker_batch):
            yield {"user": tu[a : a + per_worker_batch], "item": ti[a : a + per_worker_batch]}
        carry_u, carry_i = u[full:], i[full:]
    if len(carry_u):
        yield {"user": torch.from_numpy(np.ascontiguousarray(carry_u)), "item": torch.from_numpy(np.ascontiguousarray(carry_i))}


class _Prefetched:
    """The iterator ``make()`` started in a background thread now: the thread takes its first item (for an epoch's
    batches: Ray Data's start-up of the epoch's stream and its first chunk); iterating joins the thread, yields that
    item, then the rest in the caller's thread. Errors surface when iterated."""

    def __init__(self, make, epoch: int) -> None:
        import threading

        self.epoch, self._box = epoch, {}

        def run() -> None:
            try:
                self._box["it"] = iter(make())
                self._box["first"] = next(self._box["it"])
            except StopIteration:
                pass
            except BaseException as e:  # noqa: BLE001 -- re-raised in the consuming thread
                self._box["error"] = e

        self._thread = threading.Thread(target=run, name=f"rayrec-epoch-{epoch}-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        if "first" in self._box:
            yield self._box["first"]
            yield from self._box["it"]


class _Waited:
    """An iterator's items, with the seconds spent waiting in ``next()`` summed in ``wait_s`` (the train loop's data
    wait: when it is a large share of an epoch, the loader, not the model, bounds the epoch) and the wait for the
    first item in ``first_s`` (a stream's start-up)."""

    def __init__(self, it) -> None:
        self.it, self.wait_s, self.first_s = iter(it), 0.0, None

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            waited = time.perf_counter() - t0
            self.wait_s += waited
            if self.first_s is None:
                self.first_s = waited


def ingest_loop_per_worker(config: dict) -> dict:
    """The train loop's data path alone (benchmarks/data_path.py): ``epochs`` epochs of :func:`epoch_batches`,
    touching every batch, with no model; returns each epoch's rows and seconds on this rank."""
    import ray.train
    import ray.train.torch

    from rayrec.config import TrainConfig

    tc = build(TrainConfig, config["train"])
    world = ray.train.get_context().get_world_size()
    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = max(1, tc.batch_size // max(world, 1))
    device = ray.train.torch.get_device()  # the worker's GPU when use_gpu, else the CPU
    epochs = []
    for epoch in range(config["epochs"]):
        t0, rows, check = time.perf_counter(), 0, 0
        for batch in epoch_batches(shard, tc, per_worker_batch, epoch):
            users, items = batch["user"].to(device), batch["item"].to(device)
            rows += len(users)
            check += int(items[-1])  # the tensors are real (and on the device), not lazily skipped
        took = time.perf_counter() - t0
        # every rank's rows; the epoch lasts as long as its slowest rank
        epochs.append({"rows": int(_allreduce_sum([rows])[0]), "check": int(_allreduce_sum([check])[0]),
                       "s": float(all_reduce(torch.tensor([took], dtype=torch.float64), op=dist.ReduceOp.MAX)[0])})
    ray.train.report({"epochs": len(epochs)})
    return {"world_size": world, "epochs": epochs}


def train_loop_per_worker(config: dict) -> dict | None:
    import ray.train
    import ray.train.torch

    from rayrec.data.prepared import load_prepared
    from rayrec.runtime import quiet_ray_loggers
    from rayrec.train.denormal import flush_denormals

    quiet_ray_loggers()
    cfg: ExperimentConfig = build(ExperimentConfig, config["cfg"])
    tc, ec = cfg.train, cfg.eval
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = tc.threads_per_worker or max(1, (os.cpu_count() or 1) // max(world, 1))
    torch.set_num_threads(threads)
    if tc.flush_denormal:
        flush_denormals()
    device = ray.train.torch.get_device()

    # [data] prepared split: eval sets + train CSR for negative rejection (each worker loads it once)
    pd = load_prepared(config["prepared"])
    evald = EvalData.from_prepared(pd)
    sampler = NegativeSampler(evald.train.indptr.numpy(), evald.train.indices.numpy(), pd.num_items)

    torch.manual_seed(tc.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    sharded = cfg.model.sharding != "none"
    sync = None  # the row-sparse gradient sync's state, when DDP uses it (train.grad_sync=rows)
    model = build_model(cfg.model.name, pd.num_users, pd.num_items, cfg.model.dim, cfg.model.init_std, sharded=sharded,
                        layers=cfg.model.layers, graph=(pd.train_user, pd.train_item))
    # [distill] the method (with its own parameters) and the frozen teacher, still sharded over these workers
    method, teacher = _build_distillation(cfg, pd, evald, device, rank, config.get("ranking"))
    task = TrainTask(model, reduction=tc.loss_reduction, world_size=world, method=method)
    if sharded:
        # [ray] TorchRec: tables sharded over Ray's process group, fused optimizer in backward, dense layers DDP
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from rayrec.sharding import shard_model

        mc = cfg.model
        task = shard_model(task, sharding_type=mc.sharding, optimizer=mc.fused_optimizer,
                           lr=tc.lr if mc.fused_lr is None else mc.fused_lr,
                           weight_decay=tc.weight_decay if mc.fused_weight_decay is None else mc.fused_weight_decay,
                           device=device)
        model = task.module.model
        dense_params = [p for _, p in in_backward_optimizer_filter(task.named_parameters())]
        weights = ShardedWeights(task)
    else:
        # [ray] wrap in DDP (gloo on CPU, nccl on GPU) and move to this worker's device
        task = ray.train.torch.prepare_model(task) if world > 1 else task.to(device)
        if world > 1 and tc.grad_sync == "rows":
            from rayrec.train.grad_sync import RowSparseState, row_sparse_hook, table_parameters

            tables = table_parameters(task.module)
            if tables:  # [ray] DDP ships only the table rows each step touched
                sync = RowSparseState(tables)
                task.register_comm_hook(sync, row_sparse_hook)
        model = task.module.model if hasattr(task, "module") else task.model
        dense_params = list(task.parameters())  # student + the method's parameters (experts, selection nets)
        weights = DenseWeights(model, method)
    optim = adam(dense_params, lr=tc.lr, weight_decay=tc.weight_decay) if dense_params else None
    # plain DDP over dense parameters: a non-finite loss reaches every rank through the gradients' all-reduce, so the
    # per-step finite check needs no collective of its own (gloo: ~1.7 ms a call on 2 cores, about a student step)
    ddp_carries_flags = world > 1 and not sharded and sync is None and optim is not None

    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights = None
    # [ray] resume: this run's latest checkpoint (worker restart) or an explicit one passed by the driver
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint(config["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            check_checkpoint(d, "the training job without resuming")
            best_weights = weights.load(d, device)
            if optim is not None and os.path.exists(os.path.join(d, "optim.pt")):
                optim.load_state_dict(torch.load(os.path.join(d, "optim.pt"), map_location=device))
            with open(os.path.join(d, "state.json")) as f:
                state = {"step": 0, **json.load(f)}
        state["resumed_at"] = [*state.get("resumed_at", []), state["epoch"]]
        _log(rank, f"[train] resumed at epoch {state['epoch']} (best {tc.monitor}={state['best']})")

    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = max(1, tc.batch_size // max(world, 1))
    if ckpt is not None and state["epoch"] > 0 and tc.shuffle != "none":
        # [ray] Ray Data reseeds the block order (or global shuffle) per execution of the dataset, and a restarted
        # worker group starts counting from 0 again: stream the epochs already trained once, without training, so
        # epoch e sees the same rows in the same order as in an uninterrupted run
        t_replay = time.perf_counter()
        for _ in range(state["epoch"]):
            for _ in shard.iter_batches(batch_size=65_536, batch_format="pyarrow"):
                pass
        _log(rank, f"[train] replayed the data order of {state['epoch']} epoch(s) in "
                   f"{time.perf_counter() - t_replay:.1f}s")
    row_shard = weights.item_row_shard() if sharded else None

    def eval_shard(full: bool):
        """The item rows this rank scores in distributed evaluation (collective): the table's row block (BPR);
        NeuMF's split-head keys, recomputed from the current MLP weights; for a full ranking of a sharded
        LightGCN, its propagated item block, recomputed from the current weights."""
        if not sharded:
            return None
        if full and hasattr(model, "propagated_blocks"):
            from rayrec.eval.evaluate import RowShard

            model.eval()
            model.clear_cache()
            with torch.no_grad():
                _, (items, offset) = model.propagated_blocks()
            return RowShard(items, offset)
        if row_shard is not None and row_shard.rebuild_each_eval:
            return weights.item_row_shard()
        return row_shard
    _log(rank, f"[train] {cfg.model.name} d={cfg.model.dim} params={weights.num_parameters():,} "
               f"{'sharded ' + cfg.model.sharding + ' ' if sharded else ''}"
               f"workers={world} batch/worker={per_worker_batch} threads/worker={threads}")

    error = None  # set when a non-finite loss or gradient stops the run (every rank agrees on it)
    nxt = None  # the next epoch's batches, started in the background (train.prefetch_epoch)
    while state["epoch"] < tc.max_epochs and state["bad_epochs"] < tc.patience:
        epoch = state["epoch"]
        gen = epoch_generator(tc.seed, epoch, rank)
        t0 = time.perf_counter()
        if method is not None:
            method_epoch_start(method, teacher, model, epoch, tc.seed, pd.num_users, evald, device)
        sums: dict[str, float] = {}
        rows, steps = 0, 0
        synced = dict(sync.stats) if sync is not None else None
        task.train()
        # [ray] this worker's shard, re-streamed and locally shuffled every epoch (its start possibly prefetched
        # during the last epoch's evaluation)
        source = nxt if nxt is not None and nxt.epoch == epoch else epoch_batches(shard, tc, per_worker_batch, epoch)
        nxt = None
        batches = _Waited(source)
        for batch in batches:
            users = batch["user"]  # [B]
            loss, terms = step_loss(task, method, teacher, sampler, users, batch["item"], tc.num_negatives, gen,
                                    device)
            if optim is not None:
                optim.zero_grad(set_to_none=True)
            if tc.fault_step == state["step"] and rank == tc.fault_rank and not os.path.exists(config["fault_marker"]):
                Path(config["fault_marker"]).parent.mkdir(parents=True, exist_ok=True)
                what = {"exit": "exited", "nan": "got a NaN loss", "inf": "got an inf loss"}[tc.fault_kind]
                Path(config["fault_marker"]).write_text(f"rank {rank} {what} at step {state['step']}\n")
                print(f"[train] fault injection: rank {rank} {what} at step {state['step']} (epoch {epoch})", flush=True)
                if tc.fault_kind == "exit":
                    os._exit(1)  # a hard worker death (no exception, no clean-up): Ray Train restarts the group
                if tc.fault_kind == "nan":
                    loss, terms = loss * float("nan"), {**terms, "base": terms["base"] * float("nan")}
                else:  # inf: the gradients stay finite
                    loss, terms = loss + float("inf"), {**terms, "base": terms["base"] + float("inf")}
            loss_bad = float(tc.check_finite and not bool(torch.isfinite(loss)))
            if sync is not None:
                sync.flag, sync.flag_sum = loss_bad, None
            if loss_bad and ddp_carries_flags:
                loss = loss * float("nan")  # every gradient NaN: DDP's all-reduce carries this rank's bad loss
            loss.backward()  # sharded tables are updated here by their fused optimizer
            if tc.check_finite:
                # the loss on this rank, then the (all-reduced) dense gradients: every rank must stop at the same
                # step or none (a rank leaving alone would hang the others). With plain DDP the reduced gradients
                # are the same on every rank and a bad loss anywhere made them NaN (above): no collective. With the
                # row-sparse sync the loss flags came with its gather. Otherwise the flags are summed over ranks
                bad = [loss_bad, float(optim is not None and not grads_finite(dense_params))]
                if world > 1 and sync is not None and sync.flag_sum is not None:
                    bad[0] = sync.flag_sum
                elif world > 1 and not ddp_carries_flags:
                    bad = _allreduce_sum(bad)
                if bad[0] or bad[1]:
                    error = _nonfinite(rank, world, epoch, state["step"], "loss" if bad[0] else "gradient", terms)
                    break
            if optim is not None:
                optim.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            rows += len(users)
            steps += 1
            state["step"] += 1
        if error is not None:
            _log(rank, f"[train] stopped: {error}")
            break
        train_s = time.perf_counter() - t0
        if tc.prefetch_epoch and epoch + 1 < tc.max_epochs:  # [ray] the next epoch's stream starts during the eval
            nxt = _Prefetched(lambda e=epoch + 1: epoch_batches(shard, tc, per_worker_batch, e), epoch + 1)
        names = sorted(sums) if sums else ["base"]
        totals = _allreduce_sum([sums.get(k, 0.0) for k in names] + [rows, steps])
        rows, steps = totals[-2], totals[-1]
        term_sums = dict(zip(names, totals[:-2]))
        metrics = evaluate(model, evald, "valid", ec, sampled=ec.sampled, full=ec.full_each_epoch, device=device,
                           shard=eval_shard(ec.full_each_epoch), lockstep=sharded)
        eval_s = time.perf_counter() - t0 - train_s
        metrics.update({
            "epoch": epoch,
            "train/loss": term_sums["base"] / max(rows, 1),
            # each distillation term (weighted, as added to the loss) per training row, e.g. train/kd/de
            **{f"train/{k}": v / max(rows, 1) for k, v in term_sums.items() if k != "base"},
            **(method.epoch_metrics() if method is not None else {}),
            # row-sparse gradient sync: table rows each rank sent per step (padded), and tables that fell back to dense
            **({"train/sync_rows_per_step": (sync.stats["rows"] - synced["rows"]) / max(steps / world, 1),
                "train/sync_dense_tables": sync.stats["dense"] - synced["dense"]} if sync is not None else {}),
            "train/rows_per_s": rows / max(train_s, 1e-9),
            "time/train_s": train_s,
            "time/data_wait_s": batches.wait_s,  # of train_s: this rank waiting for its next batch (Ray Data)
            "time/data_first_s": batches.first_s or 0.0,  # of that, the wait for the epoch's first batch
            "time/eval_s": eval_s,
        })
        value = metrics.get(tc.monitor)
        if early_stopping_step(state, metrics, epoch, tc):
            best_weights = weights.snapshot()
        state["epoch"] = epoch + 1
        state["history"].append({k: v for k, v in metrics.items()})
        metrics["best/" + tc.monitor] = state["best"]
        kd = "".join(f" {k[6:]} {v:.4f}" for k, v in metrics.items() if k.startswith("train/kd/"))
        _log(rank, f"[train] epoch {epoch:4d} | loss {metrics['train/loss']:.4f}{kd} | {tc.monitor} {value:.4f} "
                   f"(best {state['best']:.4f} @ {state['best_epoch']}) | {metrics['train/rows_per_s']:,.0f} rows/s "
                   f"| train {train_s:.1f}s eval {eval_s:.1f}s")
        stop = state["bad_epochs"] >= tc.patience or state["epoch"] >= tc.max_epochs
        # [ray] report (a barrier on every rank) with a checkpoint: rank 0's files, plus every rank's shards
        # when the tables are sharded (Ray merges the ranks' directories)
        if (epoch + 1) % tc.checkpoint_every == 0 or stop:
            with tempfile.TemporaryDirectory() as d:
                weights.save(d, rank, best_weights)  # sharded: every rank writes its own shards
                if rank == 0:
                    _save_state(d, optim, state)
                writes = rank == 0 or sharded
                if writes:  # this rank's file list with checksums, last: a reader refuses a partial checkpoint
                    write_checkpoint_manifest(d, rank, world if sharded else 1, {"epoch": epoch})
                # [ray] persisted file by file under temporary names, renamed into place, manifests last
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if writes else None,
                                 checkpoint_upload_fn=upload_checkpoint)
        else:
            ray.train.report(metrics)

    if error is not None:  # no final evaluation or checkpoint: the last epoch's checkpoint is the last good one
        return {"error": error} if rank == 0 else None
    # Final: the best epoch's weights on valid and test, every configured protocol.
    if best_weights is not None:
        weights.restore(best_weights)
    final = {}
    shard = eval_shard(ec.full)  # after the restore: a LightGCN propagates the best weights
    for split in ("valid", "test"):
        final.update(evaluate(model, evald, split, ec, device=device, shard=shard, lockstep=sharded))
    summary = {
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "resumed_at": state.get("resumed_at", []),  # epochs this run restarted at from a checkpoint
        "stopped_early": state["bad_epochs"] >= tc.patience,
        "monitor": tc.monitor,
        "best_monitor": state["best"],
        "metrics": final,
        "num_parameters": weights.num_parameters(),
        "world_size": world,
        "timing": {
            "epoch_train_s": sum(h["time/train_s"] for h in state["history"]) / max(len(state["history"]), 1),
            "epoch_eval_s": sum(h["time/eval_s"] for h in state["history"]) / max(len(state["history"]), 1),
            "rows_per_s": sum(h["train/rows_per_s"] for h in state["history"]) / max(len(state["history"]), 1),
        },
        "history": state["history"],
        "config": cfg.to_dict(),
        "prepared": str(config["prepared"]),
    }
    with tempfile.TemporaryDirectory() as d:
        weights.save(d, rank, None)  # the best epoch's weights (restored above) as the final model
        if rank == 0:
            Path(d, "summary.json").write_text(json.dumps(summary, indent=1))
        final_metrics = {**{f"final/{k}": v for k, v in final.items()}, "epoch": state["epoch"], "final": 1,
                         tc.monitor: final.get(tc.monitor, state["best"]),  # Tune: every report has the metrics
                         **{k: v for k, v in final.items() if k.startswith(("valid/", "full_valid/"))}}
        writes = rank == 0 or sharded
        if writes:
            write_checkpoint_manifest(d, rank, world if sharded else 1, {"final": True})
        ray.train.report(final_metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if writes else None,
                         checkpoint_upload_fn=upload_checkpoint)
    return summary if rank == 0 else None
