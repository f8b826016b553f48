r"""LightGCN: linear propagation of ID embeddings over the user-item graph (He et al., "LightGCN: Simplifying and
Powering Graph Convolution Network for Recommendation", SIGIR 2020, eq. 8-11), the graph backbone of MKD.

With the bipartite adjacency :math:`A = \begin{pmatrix} 0 & R \\ R^\top & 0 \end{pmatrix}` of the train
interactions :math:`R \in \{0,1\}^{U \times I}` and its symmetric normalisation
:math:`\hat A = D^{-1/2} A D^{-1/2}` (``D`` the node degrees; isolated nodes keep a zero row):

.. math::

    E^{(0)} = \begin{pmatrix} E_U \\ E_I \end{pmatrix},\qquad E^{(k+1)} = \hat A E^{(k)},\qquad
    E = \frac{1}{L + 1}\sum_{k=0}^{L} E^{(k)},\qquad s(u, i) = \langle E_u, E_i \rangle

trained with the BPR loss (summed). Set-up as in MKD's code: ``init_std = 0.1``, no edge dropout. Parameters:
``(U + I) · D`` like BPR-MF (the graph is a fixed buffer). The representations every KD method reads
(``user_repr`` / ``item_repr``) are the *propagated* ones; ``user_repr(..., layer=0)`` gives the ID embeddings.

Every forward propagates the whole table (``L`` sparse matmuls ``[U+I, U+I] x [U+I, D]``), as LightGCN does, so
gradients reach every row a batch depends on. The graph is kept in CSR and, being symmetric, is its own transpose:
backward multiplies by the same CSR matrix (torch's COO ``sparse.mm`` transposes and coalesces on every backward;
d=20 on CiteULike-t: 98 -> 26 ms per 3-layer forward + backward, one thread, machine loaded). Inside
:meth:`shared_forward` (a training step's losses, an evaluation pass, the per-epoch student ranking: spans in which
the weights do not change) one propagation serves every lookup, so a distillation step that reads users, items and
scores several times propagates (and back-propagates) once; outside, every call propagates.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayrec.keys import unique_keys
from rayrec.models.base import Recommender, Table, batched_dot, reduce
from rayrec.topk import dot_scores


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> Tensor:
    """:math:`D^{-1/2} A D^{-1/2}` of the bipartite graph as a sparse COO ``[U + I, U + I]`` (duplicates merged)."""
    keys = unique_keys(np.asarray(users, dtype=np.int64) * num_items + np.asarray(items, dtype=np.int64))
    u, i = keys // num_items, keys % num_items
    n = num_users + num_items
    deg = (np.bincount(u, minlength=n) + np.bincount(num_users + i, minlength=n)).astype(np.float64)  # [U + I]
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    w = inv[u] * inv[num_users + i]
    rows = np.concatenate([u, num_users + i])
    cols = np.concatenate([num_users + i, u])
    vals = np.concatenate([w, w]).astype(np.float32)
    return torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals), (n, n)).coalesce()


class SpMM(torch.autograd.Function):
    """``A @ x`` for a sparse CSR ``A`` ``[M, N]`` whose transpose ``At`` ``[N, M]`` (CSR) is kept beside it: the
    backward is ``At @ grad`` (torch's COO ``sparse.mm`` transposes and coalesces on every backward instead). A
    symmetric ``A`` is its own transpose: ``SpMM.apply(A, A, x)``."""

    @staticmethod
    def forward(ctx, A: Tensor, At: Tensor, x: Tensor) -> Tensor:
        ctx.At = At
        return A @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:
        return None, None, ctx.At @ grad


class LightGCN(Recommender):
    """LightGCN over the train graph ``(train_users, train_items)`` with ``layers`` propagation steps."""

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.1, layers: int = 3,
                 train_users: np.ndarray | None = None, train_items: np.ndarray | None = None) -> None:
        super().__init__()
        if layers < 0:
            raise ValueError(f"LightGCN needs layers >= 0, got {layers}")
        self.num_users, self.num_items, self.dim, self.layers = num_users, num_items, dim, layers
        self.user_emb = Table(num_users, dim)
        self.item_emb = Table(num_items, dim)
        nn.init.normal_(self.user_emb.weight, 0.0, init_std)
        nn.init.normal_(self.item_emb.weight, 0.0, init_std)
        if train_users is None:
            train_users = train_items = np.zeros(0, dtype=np.int64)
        # a plain attribute, not a buffer: DDP broadcasts buffers and cannot broadcast sparse tensors; the graph
        # is the same fixed input on every rank and follows the tables' device in propagate()
        self.adj = normalized_adjacency(train_users, train_items, num_users, num_items).to_sparse_csr()
        self._scope = 0  # depth of shared_forward()
        self._cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None

    @contextmanager
    def shared_forward(self) -> Iterator[None]:
        self._scope += 1
        try:
            yield
        finally:
            self._scope -= 1
            if self._scope == 0:
                self._cache = None

    def propagate(self) -> tuple[Tensor, Tensor]:
        """Layer-mean representations ``([U, D], [I, D])`` (one per :meth:`shared_forward` span and grad mode)."""
        wu, wi = self.user_emb.weight, self.item_emb.weight
        key = (torch.is_grad_enabled(), wu.device, wu.dtype)
        if self._scope and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        e = torch.cat([wu, wi])  # [U + I, D]
        if self.adj.device != e.device:
            self.adj = self.adj.to(e.device)
        adj = self.adj if self.adj.dtype == e.dtype else self.adj.to(e.dtype)
        acc = e
        for _ in range(self.layers):
            e = SpMM.apply(adj, adj, e)  # symmetric: its own transpose
            acc = acc + e
        out = acc / (self.layers + 1)
        result = (out[: self.num_users], out[self.num_users :])
        if self._scope:
            self._cache = (key, result)
        return result

    def user_repr(self, users: Tensor, layer: int | None = None) -> dict[str, Tensor]:
        if layer == 0:
            return {"emb": self.user_emb(users)}
        return {"emb": self.propagate()[0][users]}  # [B, D]

    def item_repr(self, items: Tensor, layer: int | None = None) -> dict[str, Tensor]:
        if layer == 0:
            return {"emb": self.item_emb(items)}
        return {"emb": self.propagate()[1][items]}  # [..., D]

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        U, I = self.propagate()
        return batched_dot(U[users], I[items])  # [B, C]

    def dot_tables(self) -> tuple[Tensor, Tensor]:
        return self.propagate()  # [U, D], [I, D] layer means

    def score_all(self, users: Tensor, item_chunk: int = 0) -> Tensor:
        U, I = self.propagate()
        return dot_scores(U[users], I.T)  # [B, I]

    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        s = self.score(users, torch.cat([pos.unsqueeze(1), neg], dim=1))  # [B, 1 + N]
        return reduce(-F.logsigmoid(s[:, :1] - s[:, 1:]), reduction)
