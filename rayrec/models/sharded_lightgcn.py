r"""LightGCN with its user/item tables sharded by TorchRec: propagation over row blocks, no table ever gathered.

The maths is that of :mod:`rayrec.models.lightgcn` (``E^{(k+1)} = \hat A E^{(k)}``, layer mean over ``0..L``,
BPR summed); only where the rows live differs. TorchRec's row-wise sharding gives rank ``r`` a contiguous block
of user rows ``[u_r, u_r + U_r)`` and of item rows ``[i_r, i_r + I_r)``; together they are its ``n_r = U_r + I_r``
*nodes* (local order: its users, then its items). Stack the ranks' node blocks in rank order ("rank-major"), so
that ``N = U + I = \sum_s n_s``. One propagation step, on rank ``r``:

.. math::

    P^{(r)} = \hat A_{[:, \mathcal N_r]}\, E^{(k)}_{\mathcal N_r} \quad [N, D],\qquad
    E^{(k+1)}_{\mathcal N_s} = \sum_r P^{(r)}_{\mathcal N_s} \quad [n_s, D]

rank ``r`` multiplies the graph's *column block* of its own nodes (a sparse ``[N, n_r]``, built once, split by
destination rank into ``W`` blocks ``[n_s, n_r]``) with its own rows, and the partial sums are reduce-scattered
(:func:`rayrec.sharding.comm.reduce_scatter_rows`: one ``all_to_all`` of row blocks plus a local sum; gloo on
older torch lacks an uneven ``reduce_scatter``). ``exchange="rounds"`` sends the ``W - 1`` destination blocks in
``W - 1`` successive exchanges instead, so the partial sums held at once shrink from ``[N, D]`` to
``[max_s n_s, D]`` (more, smaller collectives). The layer mean ``E = (L + 1)^{-1} \sum_k E^{(k)}`` stays local.

**Autograd reaches the sharded table.** Layer 0 is this rank's own rows *looked up through the collection* (one
KJT of exactly its own ids), so the backward pass ends in TorchRec's lookup and the fused optimizer updates the
rows; the exchanges are differentiable (their backward is the reverse exchange), so a row's gradient collects
the contributions of every rank's loss. TorchRec divides table gradients by ``W`` like DDP (see
:mod:`rayrec.sharding.plan`): with every rank's summed loss scaled by ``W`` (``TrainTask``) one fused
EXACT_SGD step equals dense SGD on the global batch sum.

**Lookups** of propagated rows for arbitrary ids (``user_repr``, ``item_repr``, ``score``) route the requests to
the owner ranks and get back only the requested rows (:func:`rayrec.sharding.comm.fetch_rows`); ``layer=0``
gives the ID embeddings through the collection.

**Per-rank memory** (``n_r`` own nodes, ``nnz_r`` graph entries in the own columns, ``L`` layers): the table
block ``[n_r, D]`` (in TorchRec), the graph column block (``nnz_r`` entries, twice: in CSR and transposed, so that
the backward needs no transpose), ``L + 2`` activations ``[n_r, D]`` kept for backward, and, transiently per layer,
the partial sums ``[N, D]`` and the received ``[W·n_r, D]`` (``exchange="rounds"``: ``[max_s n_s, D]`` and
``[n_r, D]``). Building the graph block once reads the whole edge list and the ``U + I`` degrees (like every
worker's data loader does); nothing of the table beyond the own block.

**Collectives, in lockstep.** Every forward (propagation: ``L`` exchanges, or ``L (W - 1)`` with rounds; each
lookup: three) and its backward is a collective: every rank must make the same calls in the same order, with
batches of its own (empty ones are fine). The first propagation also all-gathers the ``W`` row-block layouts.
In eval mode under ``no_grad`` the propagated block is cached (a frozen teacher answers several lookups per step
from one propagation); the cache is dropped by every ``train()``/``eval()`` call and by :meth:`set_graph`, so
code that changes the weights in eval mode (loading, restoring) must call ``eval()`` again or :meth:`clear_cache`.

Sharding types: ``row_wise`` and ``table_wise`` (a whole table is one contiguous block on one rank); tables that
are replicated (``data_parallel``) or split by columns (``column_wise``) have no row blocks and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from rayrec.distributed import all_gather_stack
from rayrec.distributed import world as _world
from rayrec.keys import unique_keys
from rayrec.models.base import Recommender, reduce
from rayrec.models.lightgcn import SpMM
from rayrec.models.sharded import _embed, _tables
from rayrec.sharding.comm import all_to_all_rows, fetch_rows, reduce_scatter_rows

EXCHANGES = ("all_to_all", "rounds")


@dataclass(frozen=True)
class RowLayout:
    """Where every rank's row blocks lie: rank ``s`` holds users ``[user_start[s], + user_size[s])`` and items
    ``[item_start[s], + item_size[s])``; its nodes are those users then those items (``node_size[s]``)."""

    rank: int
    user_start: Tensor  # [W] int64
    user_size: Tensor  # [W]
    item_start: Tensor  # [W]
    item_size: Tensor  # [W]

    @property
    def world(self) -> int:
        return len(self.user_size)

    @property
    def node_size(self) -> list[int]:
        return (self.user_size + self.item_size).tolist()

    @property
    def n_local(self) -> int:
        return self.node_size[self.rank]

    @staticmethod
    def _owner(ids: Tensor, start: Tensor, size: Tensor) -> Tensor:
        nonempty = torch.nonzero(size > 0).flatten()
        starts, order = torch.sort(start[nonempty])
        ranks = nonempty[order]
        return ranks[torch.searchsorted(starts, ids, right=True) - 1]

    def users(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(owner rank, node index on the owner)`` of user ids ``[M]``."""
        owner = self._owner(ids, self.user_start, self.user_size)
        return owner, ids - self.user_start[owner]

    def items(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(owner rank, node index on the owner)`` of item ids ``[M]`` (after the owner's users)."""
        owner = self._owner(ids, self.item_start, self.item_size)
        return owner, self.user_size[owner] + ids - self.item_start[owner]


def _check_tiles(table: str, start: Tensor, size: Tensor, total: int) -> None:
    keep = size > 0
    s, order = torch.sort(start[keep])
    n = size[keep][order]
    ends = s + n
    if int(n.sum()) != total or (len(s) and (int(s[0]) != 0 or not torch.equal(s[1:], ends[:-1]))):
        raise ValueError(
            f"ShardedLightGCN needs the {table} table split into disjoint contiguous row blocks (row_wise or "
            f"table_wise sharding); got blocks {list(zip(start.tolist(), size.tolist()))} of {total} rows "
            "(data_parallel replicates the table, column_wise splits its columns)")


class ShardedLightGCN(Recommender):
    """LightGCN (``layers`` steps over the train graph ``graph = (users, items)``) with TorchRec tables ``user``
    ``[U, D]`` and ``item`` ``[I, D]`` (see :class:`rayrec.models.lightgcn.LightGCN` and the module docstring)."""

    KEYS = ["user", "item"]
    one_id_per_row = False  # set by shard_model for data_parallel (which this model refuses at its first forward)

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.1, layers: int = 3,
                 graph: tuple[np.ndarray, np.ndarray] | None = None, exchange: str = "all_to_all",
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"LightGCN needs layers >= 0, got {layers}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange {exchange!r} is not one of {EXCHANGES}")
        self.num_users, self.num_items, self.dim, self.layers = num_users, num_items, dim, layers
        self.exchange = exchange  # how partial sums travel (module docstring); may be switched between forwards
        # the same tables (names, keys, init) as ShardedBPR: checkpoints read alike
        self.ec = EmbeddingCollection(tables=_tables("", num_users, num_items, dim, init_std),
                                      device=torch.device(device))
        self._edges: tuple[np.ndarray, np.ndarray] | None = None
        self._layout: RowLayout | None = None
        # [W] (CSR [n_s, n_r], its transpose CSR [n_r, n_s]): rows of rank s, this rank's columns; None if empty
        self._blocks: list[tuple[Tensor, Tensor] | None] | None = None
        self._cache: Tensor | None = None
        if graph is not None:
            self.set_graph(*graph)

    # ------------------------------------------------------------------------------------------- graph, layout
    def set_graph(self, users: np.ndarray, items: np.ndarray, layers: int | None = None) -> None:
        """The train interactions to propagate over (duplicates merged); the column block is built lazily."""
        keys = unique_keys(np.asarray(users, dtype=np.int64) * self.num_items + np.asarray(items, dtype=np.int64))
        self._edges = (keys // self.num_items, keys % self.num_items)  # [E] unique (user, item) edges
        if layers is not None:
            if layers < 0:
                raise ValueError(f"LightGCN needs layers >= 0, got {layers}")
            self.layers = layers
        self._blocks = None
        self._cache = None

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True) -> "ShardedLightGCN":
        self._cache = None
        return super().train(mode)

    def _row_layout(self) -> RowLayout:
        """Every rank's row blocks (collective on the first call: one all-gather of ``[4]`` ints per rank)."""
        if self._layout is not None:
            return self._layout
        from rayrec.sharding.plan import local_row_block

        mine = []
        for table in self.KEYS:
            try:
                rows, offset = local_row_block(self.ec, table)
            except ValueError as e:
                raise ValueError(f"ShardedLightGCN needs row blocks (row_wise or table_wise sharding): {e}") from e
            mine += [offset, rows.shape[0]]
        rank, _ = _world()
        allw = all_gather_stack(torch.tensor(mine, dtype=torch.int64)).view(-1, 4)  # [W, 4]
        layout = RowLayout(rank, allw[:, 0].clone(), allw[:, 1].clone(), allw[:, 2].clone(), allw[:, 3].clone())
        _check_tiles("user", layout.user_start, layout.user_size, self.num_users)
        _check_tiles("item", layout.item_start, layout.item_size, self.num_items)
        self._layout = layout
        return layout

    def _column_blocks(self) -> list[tuple[Tensor, Tensor] | None]:
        """``Â[:, own nodes]`` split by destination rank: ``W`` sparse ``[n_s, n_r]`` (built once), each in CSR
        with its transpose beside it (the backward multiplies by the transpose; ``None`` for an empty block)."""
        if self._blocks is not None:
            return self._blocks
        if self._edges is None:
            raise RuntimeError("ShardedLightGCN has no train graph: pass graph=(users, items) to build_model or "
                               "call set_graph(users, items) before the first forward")
        lay = self._row_layout()
        r, W = lay.rank, lay.world
        u0, Ur = int(lay.user_start[r]), int(lay.user_size[r])
        i0, Ir = int(lay.item_start[r]), int(lay.item_size[r])
        u_np, i_np = self._edges
        du = np.bincount(u_np, minlength=self.num_users).astype(np.float64)  # degrees (every edge end >= 1)
        di = np.bincount(i_np, minlength=self.num_items).astype(np.float64)
        u, i = torch.from_numpy(u_np), torch.from_numpy(i_np)
        w = torch.from_numpy(((1.0 / np.sqrt(du[u_np])) * (1.0 / np.sqrt(di[i_np]))).astype(np.float32))  # [E]
        # entries (row node, own column): user rows in own item columns, item rows in own user columns
        a = (i >= i0) & (i < i0 + Ir)
        b = (u >= u0) & (u < u0 + Ur)
        ro_a, rl_a = lay.users(u[a])
        ro_b, rl_b = lay.items(i[b])
        owner = torch.cat([ro_a, ro_b])
        row = torch.cat([rl_a, rl_b])
        col = torch.cat([Ur + i[a] - i0, u[b] - u0])
        val = torch.cat([w[a], w[b]])
        sizes, n_r = lay.node_size, lay.n_local
        self._blocks = []
        for s in range(W):
            m = owner == s
            if not bool(m.any()):
                self._blocks.append(None)
                continue
            coo = torch.sparse_coo_tensor(torch.stack([row[m], col[m]]), val[m], (sizes[s], n_r),
                                          device=self._device()).coalesce()
            # CSR, with no transpose + coalesce per backward: a CiteULike-sized graph (30k nodes, 214k entries, D 200,
            # one thread, loaded machine): one product 37 -> 16 ms, a 3-layer BPR step (forward + backward, world
            # size 1) 181 -> 127 ms (best of 12) against COO sparse.mm
            self._blocks.append((coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()))
        self._edges = None  # only the own column block is kept
        return self._blocks

    def _device(self) -> torch.device:
        for p in self.ec.parameters():
            return p.device
        return torch.device("cpu")

    # ---------------------------------------------------------------------------------------------- propagation
    def _own_rows(self) -> Tensor:
        """This rank's ID embeddings ``[n_r, D]`` (its users, then its items), looked up through the collection so
        that gradients reach the sharded table (collective: TorchRec's input/output distribution)."""
        lay = self._row_layout()
        r, dev = lay.rank, self._device()
        u0, Ur = int(lay.user_start[r]), int(lay.user_size[r])
        i0, Ir = int(lay.item_start[r]), int(lay.item_size[r])
        kjt = KeyedJaggedTensor(keys=self.KEYS,
                                values=torch.cat([torch.arange(u0, u0 + Ur), torch.arange(i0, i0 + Ir)]).to(dev),
                                lengths=torch.tensor([Ur, Ir], dtype=torch.int32, device=dev))  # one row per key
        out = self.ec(kjt)
        return torch.cat([out["user"].values(), out["item"].values()]).view(Ur + Ir, self.dim)

    @staticmethod
    def _mm(block: tuple[Tensor, Tensor] | None, rows: int, e: Tensor) -> Tensor:
        """``block @ e`` ``[rows, D]`` (zeros for an empty block)."""
        return e.new_zeros(rows, e.shape[1]) if block is None else SpMM.apply(*block, e)

    def _step(self, e: Tensor) -> Tensor:
        """``E^{(k+1)}`` of the own nodes ``[n_r, D]`` from ``E^{(k)}`` of the own nodes (collective)."""
        lay = self._row_layout()
        blocks, sizes, r, W = self._column_blocks(), lay.node_size, lay.rank, lay.world
        if self.exchange == "all_to_all" or W == 1:
            parts = [self._mm(A, n, e) for A, n in zip(blocks, sizes)]
            partial = parts[0] if W == 1 else torch.cat(parts)  # [N, D] rank-major partial sums
            return reduce_scatter_rows(partial, sizes)  # [n_r, D]
        out = self._mm(blocks[r], sizes[r], e)  # [n_r, D] own contribution
        for j in range(1, W):  # round j: send to r + j, receive from r - j (one block in flight at a time)
            d, src = (r + j) % W, (r - j) % W
            ins, outs = [0] * W, [0] * W
            ins[d], outs[src] = sizes[d], sizes[r]
            out = out + all_to_all_rows(self._mm(blocks[d], sizes[d], e), outs, ins)  # [n_d, D] -> [n_r, D]
        return out

    def propagate_local(self) -> Tensor:
        """Layer-mean representations of this rank's nodes ``[n_r, D]`` (its users, then its items). Collective."""
        cache = not self.training and not torch.is_grad_enabled()
        if cache and self._cache is not None:
            return self._cache
        e = self._own_rows()  # [n_r, D]
        acc = e
        for _ in range(self.layers):
            e = self._step(e)
            acc = acc + e
        out = acc / (self.layers + 1)
        if cache:
            self._cache = out
        return out

    def propagated_blocks(self) -> tuple[tuple[Tensor, int], tuple[Tensor, int]]:
        """``((users [U_r, D], u_r), (items [I_r, D], i_r))``: this rank's propagated row blocks and their first
        ids, exactly what the distributed top-N ranks (collective)."""
        out = self.propagate_local()
        lay = self._row_layout()
        r, Ur = lay.rank, int(lay.user_size[lay.rank])
        return (out[:Ur], int(lay.user_start[r])), (out[Ur:], int(lay.item_start[r]))

    def _fetch(self, users: Tensor | None, items: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Propagated rows of ``users`` ``[M_u]`` and ``items`` ``[M_i]`` from their owners, in one routed exchange."""
        own = self.propagate_local()
        lay = self._row_layout()
        owner, index = [], []
        for ids, where, n, kind in ((users, lay.users, self.num_users, "user"),
                                    (items, lay.items, self.num_items, "item")):
            if ids is not None:
                flat = ids.reshape(-1).cpu()
                if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
                    raise IndexError(f"{kind} ids must lie in [0, {n}); got [{int(flat.min())}, {int(flat.max())}]")
                o, i = where(flat)
                owner.append(o)
                index.append(i)
        rows = fetch_rows(own, torch.cat(owner).to(own.device), torch.cat(index).to(own.device))  # [M_u + M_i, D]
        mu = users.numel() if users is not None else 0
        return (rows[:mu] if users is not None else None), (rows[mu:] if items is not None else None)

    # ------------------------------------------------------------------------------------------------ interface
    def _embed(self, groups: dict[str, Tensor]) -> dict[str, Tensor]:
        return _embed(self.ec, groups, self.KEYS, self.one_id_per_row, self.dim)

    def user_repr(self, users: Tensor, layer: int | None = None) -> dict[str, Tensor]:
        if layer == 0:
            return {"emb": self._embed({"user": users.view(-1, 1)})["user"].view(-1, self.dim)}  # [B, D]
        return {"emb": self._fetch(users, None)[0].view(-1, self.dim)}  # [B, D]

    def item_repr(self, items: Tensor, layer: int | None = None) -> dict[str, Tensor]:
        if layer == 0:
            return {"emb": self._embed({"item": items.reshape(-1, 1)})["item"].view(*items.shape, self.dim)}
        return {"emb": self._fetch(None, items)[1].view(*items.shape, self.dim)}  # [..., D]

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        u, v = self._fetch(users, items)
        return torch.einsum("bd,bcd->bc", u.view(-1, self.dim), v.view(*items.shape, self.dim))  # [B, C]

    def score_all(self, users: Tensor, item_chunk: int = 0) -> Tensor:
        raise NotImplementedError("a sharded model has no full item table here; rank with the distributed top-N")

    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        s = self.score(users, torch.cat([pos.unsqueeze(1), neg], dim=1))  # [B, 1 + N]
        return reduce(-F.logsigmoid(s[:, :1] - s[:, 1:]), reduction)
