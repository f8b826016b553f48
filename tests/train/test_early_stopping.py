"""Early stopping and model selection rules of the training loop (pure state updates, no Ray)."""

import pytest

from rayrec.config import TrainConfig, load_config
from rayrec.errors import ConfigError
from rayrec.train.fit import validate
from rayrec.train.loop import early_stopping_step


def _run(tc: TrainConfig, history: list[dict]) -> tuple[dict, list[int]]:
    """Feed the per-epoch metrics; returns the final state and the epochs at which training would stop."""
    state = {"best": None, "best_epoch": -1, "bad_epochs": 0}
    stops = []
    for epoch, metrics in enumerate(history):
        early_stopping_step(state, metrics, epoch, tc)
        if state["bad_epochs"] >= tc.patience:
            stops.append(epoch)
    return state, stops


H = [  # valid H@5 peaks at epoch 1; H@10 keeps improving until epoch 4; H@20 never moves after epoch 0
    {"valid/H@5": 0.40, "valid/H@10": 0.50, "valid/H@20": 0.60},
    {"valid/H@5": 0.45, "valid/H@10": 0.51, "valid/H@20": 0.60},
    {"valid/H@5": 0.44, "valid/H@10": 0.52, "valid/H@20": 0.60},
    {"valid/H@5": 0.44, "valid/H@10": 0.53, "valid/H@20": 0.60},
    {"valid/H@5": 0.43, "valid/H@10": 0.54, "valid/H@20": 0.60},
    {"valid/H@5": 0.43, "valid/H@10": 0.54, "valid/H@20": 0.60},
    {"valid/H@5": 0.43, "valid/H@10": 0.54, "valid/H@20": 0.59},
]


def test_monitor_alone_stops_after_patience_epochs_without_improvement():
    state, stops = _run(TrainConfig(patience=2), H)
    assert state["best"] == 0.45 and state["best_epoch"] == 1
    assert stops[0] == 3  # epochs 2 and 3 did not improve H@5


def test_patience_any_waits_while_another_cut_off_improves_but_selects_on_the_monitor():
    tc = TrainConfig(patience=2, patience_any=["valid/H@10", "valid/H@20"])
    state, stops = _run(tc, H)
    assert stops[0] == 6  # H@10 improved up to epoch 4: the counter restarts there, then epochs 5 and 6
    assert state["best"] == 0.45 and state["best_epoch"] == 1  # the kept model is still the best H@5 epoch
    assert state["best_any"] == {"valid/H@10": 0.54, "valid/H@20": 0.60}  # an equal value is no improvement


def test_patience_any_names_metrics_computed_every_epoch(tmp_path):
    cfg = load_config(None, [f"storage_root={tmp_path}", "train.patience_any=[valid/H@50]"])
    with pytest.raises(ConfigError, match=r"train.patience_any names \['valid/H@50'\]"):
        validate(cfg)
    validate(load_config(None, [f"storage_root={tmp_path}", "train.patience_any=[valid/H@10,valid/H@20]"]))


def test_grads_finite_finds_nan_inf_and_survives_an_overflowing_sum():
    import torch

    from rayrec.train.loop import grads_finite

    big, p, none = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 1000, 2))
    big.grad = torch.full((3,), 3e38)  # finite, but its float32 sum overflows: the exact check clears it
    p.grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert grads_finite([big, p, none]) and grads_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        p.grad[17] = bad
        assert not grads_finite([big, p, none])
    p.grad[17] = 0.0
    big.grad[1] = float("-inf")
    assert not grads_finite([big, p])
