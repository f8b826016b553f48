"""Flushing subnormal floats on every compute thread (the calling thread and torch's OpenMP team)."""

import pytest
import torch

from rayrec.train.denormal import flush_denormals

TINY = torch.finfo(torch.float32).tiny  # smallest normal float32, 1.18e-38


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    flush_denormals(False)
    torch.set_num_threads(old)


def _subnormal_survivors() -> int:
    # 4M elements: an element-wise op that torch splits over its intra-op threads; with DAZ set a subnormal input
    # reads as 0, so x * 1 is 0 on every thread that was flushed
    x = torch.full((1 << 22,), TINY / 4)
    return int(((x * 1.0) != 0).sum())


def test_flush_reaches_the_openmp_threads(two_threads):
    if not torch.backends.cpu.get_cpu_capability() or not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero control (not x86 with SSE3)")
    flush_denormals()  # as an in-process training loop (ray.num_workers=0) leaves it earlier in the session
    flush_denormals(False)
    assert _subnormal_survivors() == 1 << 22  # nothing flushed: subnormals survive
    # the setting ran on two distinct threads: the calling one and the other thread of the OpenMP team (a team of
    # two; torch.set_flush_denormal alone sets the calling thread only)
    assert flush_denormals() == 2
    assert _subnormal_survivors() == 0
    flush_denormals(False)
    assert _subnormal_survivors() == 1 << 22
