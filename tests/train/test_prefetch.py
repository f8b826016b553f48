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


class _Shard:
    """A Ray Data shard's ``iter_batches`` over an in-memory stream: consecutive slices, the last one short."""

    def __init__(self, n):
        import numpy as np

        self.user, self.item, self.calls = np.arange(n) % 97, np.arange(n) * 3, []

    def iter_batches(self, batch_size, batch_format):
        assert batch_format == "numpy"
        self.calls.append(batch_size)
        for a in range(0, len(self.user), batch_size):
            yield {"user": self.user[a : a + batch_size], "item": self.item[a : a + batch_size]}


@pytest.mark.parametrize("n,fetch", [(1000, 64), (1000, 1000), (1037, 300), (5, 64), (0, 64)])
def test_fetching_many_chunks_at_once_gives_the_same_batches(n, fetch, monkeypatch):
    import torch

    from rayrec.config import TrainConfig
    from rayrec.train import loop

    tc = TrainConfig(shuffle_buffer=100, shuffle="blocks", seed=3)
    monkeypatch.setattr(loop, "FETCH_ROWS", 100)  # one chunk per fetch: Ray Data's batches are the chunks
    one = list(loop.epoch_batches(_Shard(n), tc, 32, 2))
    monkeypatch.setattr(loop, "FETCH_ROWS", fetch)
    shard = _Shard(n)
    many = list(loop.epoch_batches(shard, tc, 32, 2))
    assert shard.calls == [max(100, fetch // 100 * 100)]
    assert len(one) == len(many) == -(-n // 32)
    for a, b in zip(one, many):
        assert torch.equal(a["user"], b["user"]) and torch.equal(a["item"], b["item"])
    if n:
        assert sorted(torch.cat([b["item"] for b in many]).tolist()) == list(range(0, 3 * n, 3))  # every row once
