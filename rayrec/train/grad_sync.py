"""Row-sparse gradient sync for the student's embedding tables under DDP (``train.grad_sync=rows``).

DDP all-reduces every gradient densely, so each step a dense student ships its whole ``[N, D]`` tables between
ranks although a step touches only the rows of its batch: CiteULike's d=20 BPR student moves 608k floats
(2.4 MB) a step for ~1.5k touched rows per worker, and a 1M-item student would move 80 MB. This DDP comm hook
exchanges only the touched rows of each table and all-reduces the rest of the bucket as usual:

1. per table gradient ``g [N, D]`` in the bucket, the rows with any non-zero entry (an untouched row's gradient is
   exactly zero, so leaving it out changes no sum);
2. one ``all_gather`` of every rank's row counts together with up to ``C`` of its rows and their ids, ``C`` the
   table's capacity (the last step's largest count + 25%, so the usual step needs this one collective); the
   training loop's per-step "loss not finite" flag rides along, saving its own all-reduce;
3. with the counts, every rank takes the same path for each table: the sparse sum when the largest count ``R``
   satisfies ``world * R <= N`` (each rank then receives ``(W - 1) R (D + 1)`` values, at most about half of a
   ring all-reduce's ``2 (W - 1) / W * N D``), summing the gathered rows with ``index_add_`` in rank order (a
   second gather, of exactly ``R`` rows, when ``R > C``); else the dense all-reduce (e.g. a dense LightGCN
   student, whose propagation touches most rows), and the table's capacity drops to 0;
4. the remaining contiguous pieces of the bucket (dense layers, experts, projectors) all-reduced in place.

Like DDP's default hook, every gradient is divided by the world size first, so the result is the mean over ranks.
With 2 ranks it equals the dense all-reduce exactly (``a/2 + b/2`` in either order); with more, up to float
summation order. A non-finite gradient row is non-zero, so it is exchanged (or the table falls back to dense) and
reaches every rank as with the dense sync.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn


def table_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of the dense embedding tables (``nn.Embedding`` and subclasses, not sparse) in
    ``module``: the parameters whose gradients are row-sparse."""
    out, seen = [], set()
    for m in module.modules():
        if isinstance(m, nn.Embedding) and not m.sparse and m.weight.requires_grad and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


class RowSparseState:
    """The comm hook's state (``ddp.register_comm_hook(RowSparseState(tables), row_sparse_hook)``): the parameters
    in ``tables`` take the row-sparse path, every other one keeps the dense all-reduce. ``capacity`` holds, per
    table, the rows each rank sends blind with the counts (from the last step's largest count, +25%); ``stats``
    counts the tables each path took (steps x tables), the rows exchanged and the steps that needed a second
    gather, for tests and logs. A table that took the dense path ``give_up_after`` steps in a row (a dense LightGCN
    student's tables, which every step touches whole) leaves the row-sparse path for good, so its bucket no longer
    gathers the counts (every rank drops it at the same step: they see the same counts)."""

    def __init__(self, tables: list[nn.Parameter], group=None, give_up_after: int = 8):
        self.tables = {id(p) for p in tables}
        self.group = group
        self.give_up_after = give_up_after
        self.capacity: dict[int, int] = {}
        self.dense_streak: dict[int, int] = {}
        # a per-step float the caller sets before backward (the training loop: 1.0 when this rank's loss is not
        # finite); the first bucket that gathers counts also gathers it, and sets ``flag_sum`` to its sum over ranks
        # (None: no bucket gathered this step; the caller resets it)
        self.flag = 0.0
        self.flag_sum: float | None = None
        self.stats = {"sparse": 0, "dense": 0, "rows": 0, "regathers": 0}


def row_sparse_hook(state: RowSparseState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's mean gradient over ranks, its tables' touched rows exchanged sparsely."""
    group = state.group
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    buf.div_(world)
    grads, params = bucket.gradients(), bucket.parameters()
    picked = [i for i, p in enumerate(params)
              if id(p) in state.tables and grads[i].dim() == 2 and grads[i].dtype == torch.float32]
    sparse: list[int] = []
    if picked:
        gs, keys = [grads[i] for i in picked], [id(params[i]) for i in picked]
        # a row is touched iff its |g| sum is non-zero (NaN and inf rows count as touched)
        rows = [(g.abs().sum(1) != 0).nonzero().squeeze(1) for g in gs]  # [R_t] per table
        caps = [state.capacity.get(k, 0) for k in keys]
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=buf.device)  # [T]
        flag = torch.tensor([state.flag], dtype=torch.float32, device=buf.device)
        # one gather: every rank's counts and flag, and up to caps[t] rows of each table
        got = _gather(torch.cat([counts.view(torch.float32), flag, _pack(gs, rows, caps)]), world, group)
        top = got[:, :len(gs)].contiguous().view(torch.int32).max(0).values.tolist()  # [T] largest count
        if state.flag_sum is None:
            state.flag_sum = float(got[:, len(gs)].sum())
        limit = [g.shape[0] // world for g in gs]  # more rows than this: the dense all-reduce moves less
        keep = [j for j in range(len(gs)) if top[j] <= limit[j]]
        late = [j for j in keep if top[j] > caps[j]]  # sent truncated: gather these tables again, whole
        if late:
            again = _gather(_pack([gs[j] for j in late], [rows[j] for j in late], [top[j] for j in late]), world,
                            group)
            state.stats["regathers"] += 1
        sources = _layout(got, len(gs) + 1, [gs[j].shape[1] for j in range(len(gs))], caps)
        if late:
            redo = _layout(again, 0, [gs[j].shape[1] for j in late], [top[j] for j in late])
            sources.update({j: redo[n] for n, j in enumerate(late)})
        for j in keep:
            ids, vals = sources[j]  # [W, C] row ids (-1 = padding), [W, C, D]
            gs[j].zero_()
            for w in range(world):  # rank order: the same sum on every rank
                n = int((ids[w] >= 0).sum())
                gs[j].index_add_(0, ids[w, :n], vals[w, :n])
            state.stats["rows"] += top[j]
        for j, k in enumerate(keys):
            state.capacity[k] = 0 if top[j] > limit[j] else min(limit[j], top[j] + (top[j] + 3) // 4)
            state.dense_streak[k] = state.dense_streak.get(k, 0) + 1 if top[j] > limit[j] else 0
            if state.dense_streak[k] >= state.give_up_after:
                state.tables.discard(k)
        sparse = [picked[j] for j in keep]
        state.stats["sparse"] += len(keep)
        state.stats["dense"] += len(gs) - len(keep)
    # the rest of the bucket, as contiguous slices of its flat buffer, all-reduced in place
    skip = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in (grads[i] for i in sparse))
    start, elem, base = 0, buf.element_size(), buf.data_ptr()
    for lo, hi in skip:
        a, b = (lo - base) // elem, (hi - base) // elem
        if a > start:
            dist.all_reduce(buf[start:a], group=group)
        start = b
    if start < buf.numel():
        dist.all_reduce(buf[start:], group=group)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut


_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


def _gather(t: Tensor, world: int, group) -> Tensor:
    """``t`` ``[n]`` from every rank -> ``[W, n]`` (one collective into a flat buffer, as gloo wants)."""
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    _GATHER(out, t, group=group)
    return out.view(world, t.numel())


def _pack(gs: list[Tensor], rows: list[Tensor], caps: list[int]) -> Tensor:
    """Per table ``t``: ``caps[t]`` row ids (int32 bit patterns in float32 slots, -1 = padding: a gather copies
    bytes and adds nothing) then those rows ``[caps[t], D_t]`` (zero padding); rows past ``caps[t]`` are left
    out."""
    parts = []
    for g, r, c in zip(gs, rows, caps):
        r = r[:c]
        ids = torch.full((c,), -1, dtype=torch.int32, device=g.device)
        ids[:len(r)] = r
        vals = torch.zeros(c, g.shape[1], dtype=g.dtype, device=g.device)
        vals[:len(r)] = g.index_select(0, r)
        parts += [ids.view(torch.float32), vals.reshape(-1)]
    return torch.cat(parts) if parts else torch.zeros(0)


def _layout(got: Tensor, head: int, dims: list[int], caps: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """Split a gathered ``[W, head + sum C_t (1 + D_t)]`` back into per-table ``(ids [W, C_t], rows [W, C_t, D_t])``."""
    out, off = {}, head
    for t, (d, c) in enumerate(zip(dims, caps)):
        ids = got[:, off:off + c].contiguous().view(torch.int32)
        vals = got[:, off + c:off + c + c * d].reshape(got.shape[0], c, d)
        out[t] = (ids, vals)
        off += c + c * d
    return out
