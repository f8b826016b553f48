"""train.prefetch_epoch: the next epoch's stream starts in a background thread during the evaluation; the same
rows in the same order, so the same run."""

import pytest

from _ml100k import ml100k_config

from rayrec.train.fit import config_fingerprint, fit
from rayrec.train.loop import _Prefetched, _Waited


def test_prefetched_yields_the_source_then_raises_its_errors():
    assert list(_Waited(_Prefetched(lambda: iter(range(5)), 1))) == [0, 1, 2, 3, 4]
    assert list(_Prefetched(lambda: iter([]), 1)) == []

    def broken():
        yield 1
        raise ValueError("chunk 2 is corrupt")

    it = iter(_Prefetched(broken, 3))
    assert next(it) == 1
    with pytest.raises(ValueError, match="corrupt"):
        next(it)

    def dead():
        raise OSError("no such shard")

    with pytest.raises(OSError, match="no such shard"):
        list(_Prefetched(dead, 0))


def test_waited_counts_the_first_wait():
    w = _Waited(iter([1, 2]))
    assert list(w) == [1, 2] and w.first_s is not None and w.wait_s >= w.first_s >= 0


@pytest.mark.ray
def test_prefetching_the_next_epoch_trains_the_same_run(ray_session, prepared, tmp_path):
    runs = [fit(ml100k_config(tmp_path / str(p), "name=t", "eval.full_ks=[10]", "train.max_epochs=3",
                              "ray.num_workers=1", f"train.prefetch_epoch={p}"), prepared=prepared)
            for p in ("false", "true")]
    keys = ("train/loss", "valid/H@5")
    assert [[h[k] for k in keys] for h in runs[0]["history"]] == [[h[k] for k in keys] for h in runs[1]["history"]]
    assert all(h["time/data_wait_s"] >= h["time/data_first_s"] >= 0 for r in runs for h in r["history"])
    a, b = (ml100k_config(tmp_path, f"train.prefetch_epoch={p}") for p in ("false", "true"))
    assert config_fingerprint(a) == config_fingerprint(b)  # not part of what a run trains
