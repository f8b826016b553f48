"""TorchRec versions of the base models: user/item tables in an ``EmbeddingCollection`` that
``DistributedModelParallel`` shards across workers (the teacher path, ``rayrec.sharding``).

The maths is that of :mod:`rayrec.models.bpr` and :mod:`rayrec.models.neumf`; only the table lookup differs: ids
go in as one ``KeyedJaggedTensor`` (one id per user row, ``C`` ids per item row)::

    #            row 0         row 1        ...  row B-1
    # "user"     [u_0]         [u_1]             [u_{B-1}]
    # "item"     [i_00..i_0C]  [i_10..i_1C]      [...]          (C candidates per row)

Tables are built on the ``meta`` device (no memory) and materialised shard by shard by DMP, initialised
N(0, ``init_std``) like the dense models. A sharded model never materialises a full table, so it has no
``score_all``: full ranking goes through the distributed top-N of the teacher ranking step.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from rayrec.models.base import Recommender, reduce


def _kjt(groups: dict[str, Tensor], keys: list[str]) -> KeyedJaggedTensor:
    """``{feature: ids [B, C_f]}`` -> KJT over every feature in ``keys`` (absent ones get empty rows), ``B`` rows
    per feature, ``C_f`` ids per row. The sharded collection always sees the same keys in the same order."""
    B = next(iter(groups.values())).shape[0]
    device = next(iter(groups.values())).device
    values, lengths = [], []
    for k in keys:
        ids = groups.get(k)
        if ids is None:
            lengths.append(torch.zeros(B, dtype=torch.int32, device=device))
            continue
        values.append(ids.reshape(-1))
        lengths.append(torch.full((B,), ids.shape[1], dtype=torch.int32, device=device))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def _embed(ec: EmbeddingCollection, groups: dict[str, Tensor], keys: list[str], one_id_per_row: bool,
           dim: int) -> dict[str, Tensor]:
    """Look up ``{feature: ids [B, C_f]}`` -> ``{feature: [B, C_f, D]}`` through the (sharded) collection.

    ``one_id_per_row``: feed a KJT in which every feature has exactly one id in each of ``n = max_f B·C_f`` rows
    (narrower features repeated, absent ones padded with id 0 and dropped). TorchRec 1.8's data-parallel "dense"
    kernel on CPU pools: it returns ``[rows, F·D]`` whatever the lengths, so only this layout is read correctly;
    :func:`rayrec.sharding.shard_model` turns it on for ``data_parallel``.
    """
    if not one_id_per_row:
        out = ec(_kjt(groups, keys))
        return {k: out[k].values().view(*ids.shape, dim) for k, ids in groups.items()}
    n = max(ids.numel() for ids in groups.values())
    device = next(iter(groups.values())).device
    flat, reps = {}, {}
    for k in keys:
        ids = groups.get(k)
        if ids is None:
            flat[k] = torch.zeros(n, 1, dtype=torch.int64, device=device)
            continue
        reps[k] = n // ids.numel()
        flat[k] = ids.reshape(-1).repeat_interleave(reps[k]).view(n, 1)
    out = ec(_kjt(flat, keys))
    # the kernel's [n, F·D] output (row-major: row r holds every feature's vector) comes back split as if it were
    # [F·n, D] feature-major; put the F blocks back together and read feature f of every row
    order = getattr(ec, "_embedding_names_per_sharding", [keys])[0]
    rows = torch.cat([out[k].values() for k in order]).view(n, len(order), dim)  # [n, F, D]
    return {k: rows[:: reps[k], order.index(k)].reshape(*ids.shape, dim) for k, ids in groups.items()}


def _tables(prefix: str, num_users: int, num_items: int, dim: int, init_std: float) -> list[EmbeddingConfig]:
    init = partial(nn.init.normal_, mean=0.0, std=init_std)
    return [
        EmbeddingConfig(name=f"{prefix}user", embedding_dim=dim, num_embeddings=num_users,
                        feature_names=[f"{prefix}user"], init_fn=init),
        EmbeddingConfig(name=f"{prefix}item", embedding_dim=dim, num_embeddings=num_items,
                        feature_names=[f"{prefix}item"], init_fn=init),
    ]


class ShardedBPR(Recommender):
    """BPR-MF with TorchRec tables ``user`` ``[U, D]`` and ``item`` ``[I, D]`` (see :class:`rayrec.models.bpr.BPR`)."""

    KEYS = ["user", "item"]
    one_id_per_row = False  # set by shard_model for data_parallel (see _embed)
    # score = user row . item row: evaluation may score a rank's own item rows locally (rayrec.eval.evaluate)
    shard_rows = True

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.01,
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.ec = EmbeddingCollection(tables=_tables("", num_users, num_items, dim, init_std), device=torch.device(device))

    def _embed(self, groups: dict[str, Tensor]) -> dict[str, Tensor]:
        return _embed(self.ec, groups, self.KEYS, self.one_id_per_row, self.dim)

    def _lookup(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        B, C = items.shape
        out = self._embed({"user": users.view(B, 1), "item": items})
        return out["user"].view(B, self.dim), out["item"]  # [B, D], [B, C, D]

    def user_repr(self, users: Tensor) -> dict[str, Tensor]:
        return {"emb": self._embed({"user": users.view(-1, 1)})["user"].view(-1, self.dim)}  # [B, D]

    def item_repr(self, items: Tensor) -> dict[str, Tensor]:
        flat = items.reshape(-1, 1)
        return {"emb": self._embed({"item": flat})["item"].view(*items.shape, self.dim)}

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        u, v = self._lookup(users, items)
        return torch.einsum("bd,bcd->bc", u, v)  # [B, C]

    def score_all(self, users: Tensor, item_chunk: int = 0) -> Tensor:
        raise NotImplementedError("a sharded model has no full item table here; rank with the distributed top-N")

    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        s = self.score(users, torch.cat([pos.unsqueeze(1), neg], dim=1))  # [B, 1 + N]
        return reduce(-F.logsigmoid(s[:, :1] - s[:, 1:]), reduction)


class ShardedNeuMF(Recommender):
    """NeuMF with TorchRec tables ``gmf_user, gmf_item, mlp_user, mlp_item`` (each ``D`` wide); the MLP and the
    prediction layer are dense and data-parallel (see :class:`rayrec.models.neumf.NeuMF`)."""

    KEYS = ["gmf_user", "gmf_item", "mlp_user", "mlp_item"]
    one_id_per_row = False  # set by shard_model for data_parallel (see _embed)
    # evaluation may score a rank's own item rows locally, through the split head (rayrec.models.neumf.SplitHead)
    shard_rows = True

    def __init__(self, num_users: int, num_items: int, dim: int, init_std: float = 0.01,
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        self.num_users, self.num_items, self.dim = num_users, num_items, dim
        self.ec = EmbeddingCollection(
            tables=_tables("gmf_", num_users, num_items, dim, init_std) + _tables("mlp_", num_users, num_items, dim, init_std),
            device=torch.device(device),
        )
        self.mlp = nn.Linear(2 * dim, dim)
        self.predict = nn.Linear(2 * dim, 1)
        nn.init.xavier_uniform_(self.mlp.weight)
        nn.init.kaiming_uniform_(self.predict.weight, a=1)
        nn.init.zeros_(self.mlp.bias)
        nn.init.zeros_(self.predict.bias)

    def _embed(self, groups: dict[str, Tensor]) -> dict[str, Tensor]:
        return _embed(self.ec, groups, self.KEYS, self.one_id_per_row, self.dim)

    def _lookup(self, users: Tensor, items: Tensor) -> dict[str, Tensor]:
        B, C = items.shape
        u = users.view(B, 1)
        return self._embed({"gmf_user": u, "gmf_item": items, "mlp_user": u, "mlp_item": items})  # [B, 1|C, D]

    def user_repr(self, users: Tensor) -> dict[str, Tensor]:
        u = users.view(-1, 1)
        out = self._embed({"gmf_user": u, "mlp_user": u})
        return {"gmf": out["gmf_user"].view(-1, self.dim), "mlp": out["mlp_user"].view(-1, self.dim)}  # [B, D]

    def item_repr(self, items: Tensor) -> dict[str, Tensor]:
        flat = items.reshape(-1, 1)
        out = self._embed({"gmf_item": flat, "mlp_item": flat})
        return {k.split("_")[0]: out[k].view(*items.shape, self.dim) for k in ("gmf_item", "mlp_item")}

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        e = self._lookup(users, items)  # user parts [B, 1, D], item parts [B, C, D]
        gmf = e["gmf_user"] * e["gmf_item"]  # [B, C, D]
        D = self.dim  # the MLP's user half once per row (see NeuMF._fuse)
        mlp = F.relu(F.linear(e["mlp_user"], self.mlp.weight[:, :D], self.mlp.bias)
                     + F.linear(e["mlp_item"], self.mlp.weight[:, D:]))  # [B, C, D]
        return self.predict(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)  # [B, C]

    def score_all(self, users: Tensor, item_chunk: int = 0) -> Tensor:
        raise NotImplementedError("a sharded model has no full item table here; rank with the distributed top-N")

    def base_loss(self, users: Tensor, pos: Tensor, neg: Tensor, reduction: str = "sum") -> Tensor:
        logits = self.score(users, torch.cat([pos.unsqueeze(1), neg], dim=1))  # [B, 1 + N]
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return reduce(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"), reduction)


SHARDED_MODELS: dict[str, type[Recommender]] = {"bpr": ShardedBPR, "neumf": ShardedNeuMF}
