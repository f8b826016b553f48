"""Base recommenders. ``MODELS`` maps the config key (``model.name``) to the class."""

from __future__ import annotations

from rayrec.models.base import Recommender
from rayrec.models.bpr import BPR
from rayrec.models.neumf import NeuMF

MODELS: dict[str, type[Recommender]] = {"bpr": BPR, "neumf": NeuMF}


def build_model(name: str, num_users: int, num_items: int, dim: int, init_std: float = 0.01,
                sharded: bool = False) -> Recommender:
    """A dense model, or (``sharded``) its TorchRec twin with tables on the meta device, ready for DMP."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if sharded:
        from rayrec.models.sharded import SHARDED_MODELS

        return SHARDED_MODELS[name](num_users=num_users, num_items=num_items, dim=dim, init_std=init_std)
    return MODELS[name](num_users=num_users, num_items=num_items, dim=dim, init_std=init_std)


def expected_num_parameters(name: str, num_users: int, num_items: int, dim: int) -> int:
    """Parameter counts of DE-RRD spec §1: BPR (U+I)·d; NeuMF 2(U+I)·d + (2d·d + d) + (2d + 1)."""
    if name == "bpr":
        return (num_users + num_items) * dim
    if name == "neumf":
        return 2 * (num_users + num_items) * dim + (2 * dim * dim + dim) + (2 * dim + 1)
    raise KeyError(name)


__all__ = ["MODELS", "BPR", "NeuMF", "Recommender", "build_model", "expected_num_parameters"]
