"""Base recommenders. ``MODELS`` maps the config key (``model.name``) to the class."""

from __future__ import annotations

from rayrec.models.base import Recommender
from rayrec.models.bpr import BPR
from rayrec.models.lightgcn import LightGCN
from rayrec.models.neumf import NeuMF

MODELS: dict[str, type[Recommender]] = {"bpr": BPR, "neumf": NeuMF, "lightgcn": LightGCN}


def build_model(name: str, num_users: int, num_items: int, dim: int, init_std: float = 0.01,
                sharded: bool = False, layers: int = 3, graph: tuple | None = None) -> Recommender:
    """A dense model, or (``sharded``) its TorchRec twin with tables on the meta device, ready for DMP.
    ``graph``: the train interactions ``(users, items)`` a graph model (LightGCN, ``layers`` steps) propagates over
    (a sharded LightGCN built without one needs ``set_graph`` before its first forward)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if sharded:
        from rayrec.models.sharded import SHARDED_MODELS

        if name == "lightgcn":  # the train graph too; its column blocks are built at the first forward
            from rayrec.models.sharded_lightgcn import ShardedLightGCN

            return ShardedLightGCN(num_users, num_items, dim, init_std=init_std, layers=layers, graph=graph)
        if name not in SHARDED_MODELS:
            raise KeyError(f"no sharded {name!r} model yet; sharded: {sorted(SHARDED_MODELS)}")
        return SHARDED_MODELS[name](num_users=num_users, num_items=num_items, dim=dim, init_std=init_std)
    if name == "lightgcn":
        users, items = graph if graph is not None else (None, None)
        return LightGCN(num_users, num_items, dim, init_std=init_std, layers=layers, train_users=users, train_items=items)
    return MODELS[name](num_users=num_users, num_items=num_items, dim=dim, init_std=init_std)


def expected_num_parameters(name: str, num_users: int, num_items: int, dim: int) -> int:
    """Parameter counts of DE-RRD spec §1: BPR (U+I)·d; NeuMF 2(U+I)·d + (2d·d + d) + (2d + 1)."""
    if name == "bpr":
        return (num_users + num_items) * dim
    if name == "neumf":
        return 2 * (num_users + num_items) * dim + (2 * dim * dim + dim) + (2 * dim + 1)
    if name == "lightgcn":  # the graph is a buffer, not a parameter
        return (num_users + num_items) * dim
    raise KeyError(name)


__all__ = ["MODELS", "BPR", "LightGCN", "NeuMF", "Recommender", "build_model", "expected_num_parameters"]
