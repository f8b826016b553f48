"""The fused CPU top-k kernel (rayrec/csrc/dot_topk.cpp behind torch.ops.rayrec.dot_topk) against float64 brute
force, its tie rule, its error path, and the exported serving graph that calls it."""

import pytest
import torch

from rayrec import kernels
from rayrec.kernels import dot_topk


def _check(q, kt, k, values, ids):
    """values are the k best of q @ kt per row, best first, and ids point at items that score them."""
    exact = q.double() @ kt.double()  # [B, I]
    want = exact.topk(k, dim=1).values  # [B, k]
    torch.testing.assert_close(values.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact.gather(1, ids), want, rtol=1e-5, atol=1e-5)
    assert all(len(set(r)) == k for r in ids.tolist())  # no item twice
    assert torch.all(values[:, :-1] >= values[:, 1:])  # best first


@pytest.mark.parametrize("B,D,I,k", [(1, 20, 25_182, 20), (3, 6, 64, 5), (5, 1, 65, 1), (67, 20, 1_000, 20),
                                     (9, 33, 63, 63), (6, 200, 9_000, 50), (300, 8, 40_000, 3)])
def test_kernel_matches_float64_brute_force(B, D, I, k, native_kernels):
    native = native_kernels
    g = torch.Generator().manual_seed(B * 7919 + D * 31 + I)
    q, kt = torch.randn(B, D, generator=g), torch.randn(D, I, generator=g)
    values, ids = native.dot_topk(q, kt, k)
    assert values.shape == ids.shape == (B, k) and ids.dtype == torch.long
    _check(q, kt, k, values, ids)
    # a non-contiguous keys_t (the transpose view serving keeps contiguous) gives the same answer
    v2, i2 = native.dot_topk(q, kt.t().contiguous().t(), k)
    assert torch.equal(values, v2) and torch.equal(ids, i2)


@pytest.mark.parametrize("I,threads,k", [(100, 2, 30), (3_000, 1, 30), (3_000, 2, 30), (3_000, 3, 30),
                                         (3_000, 1, 700), (3_000, 2, 700)])
def test_ties_go_to_the_lower_item_id(I, threads, k, native_kernels):
    native = native_kernels
    # every item of a group scores the same: I items hold five values in shuffled positions. 2 users over 3,000
    # items on 2-3 threads: the threads split the items and their lists are merged
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        level = torch.randperm(I, generator=g) % 5  # [I] in 0..4
        kt = level.float().unsqueeze(0)  # [1, I]
        q = torch.tensor([[1.0], [-1.0]])
        values, ids = native.dot_topk(q, kt, k)  # k = 700: the heap
    finally:
        torch.set_num_threads(before)
    for row, sign in enumerate((1.0, -1.0)):
        order = sorted(range(I), key=lambda j: (-sign * float(level[j]), j))[:k]
        assert ids[row].tolist() == order
        assert values[row].tolist() == [sign * float(level[j]) for j in order]


@pytest.mark.parametrize("k,threads", [(100, 1), (500, 2), (500, 1), (30, 2)])
def test_exclusions_and_long_lists_match_brute_force(k, threads, native_kernels):
    # k > 64 keeps a heap per user (ranking's top-500); excluded items (a user's train items) never come back; a
    # user with fewer than k admissible items is padded with -inf / -1 when pad=True, an error otherwise
    native = native_kernels
    g = torch.Generator().manual_seed(k + threads)
    B, D, I = 11, 16, 2_000
    q, kt = torch.randn(B, D, generator=g), torch.randn(D, I, generator=g)
    # row r excludes a random sorted subset; the last row excludes all but k - 3 items
    rows = [torch.randperm(I, generator=g)[: int(torch.randint(0, 300, (1,), generator=g))].sort().values
            for _ in range(B - 1)]
    rows.append(torch.arange(k - 3, I))
    indptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    indices = torch.cat(rows)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, ids = native.dot_topk(q, kt, k, indptr, indices, True)
        with pytest.raises(RuntimeError, match="fewer than k"):
            native.dot_topk(q, kt, k, indptr, indices, False)
    finally:
        torch.set_num_threads(before)
    exact = q.double() @ kt.double()
    for r in range(B):
        exact[r, rows[r]] = -float("inf")
    want = exact.topk(k, dim=1).values
    torch.testing.assert_close(values.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids[-1, k - 3:], torch.full((3,), -1)) and ids[-1, : k - 3].sort().values.tolist() == list(
        range(k - 3))
    ok = ids >= 0
    torch.testing.assert_close(exact.gather(1, ids.clamp(min=0))[ok], values.double()[ok], rtol=1e-5, atol=1e-5)
    assert all(len(set(r) - {-1}) == sum(x >= 0 for x in r) for r in ids.tolist())
    assert torch.all(values[:, :-1] >= values[:, 1:])
    # the fallback (matmul + top-k) gives the same lists
    fv, fi = dot_topk(q.double(), kt.double(), k, indptr, indices, True)
    torch.testing.assert_close(fv.float(), values, rtol=1e-5, atol=1e-5)
    assert torch.equal(fi < 0, ids < 0)


def test_splitting_users_or_items_over_threads_gives_the_same_answer(native_kernels):
    native = native_kernels
    g = torch.Generator().manual_seed(1)
    q, kt = torch.randn(13, 20, generator=g), torch.randn(20, 7_001, generator=g)
    before = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2, 3):  # 13 users: one range on 1 thread, split by items on 2 and 3 (13 < 2 * 4 * T)
            torch.set_num_threads(threads)
            got[threads] = native.dot_topk(q, kt, 20)
            got[threads, 1] = native.dot_topk(q[:1], kt, 20)
    finally:
        torch.set_num_threads(before)
    for key in got:
        assert torch.equal(got[key][0], got[1 if key in (1, 2, 3) else (1, 1)][0])
        assert torch.equal(got[key][1], got[1 if key in (1, 2, 3) else (1, 1)][1])
    _check(q, kt, 20, *got[2])


def test_errors_are_clear(native_kernels):
    native = native_kernels
    with pytest.raises(RuntimeError, match="k must be in"):
        native.dot_topk(torch.randn(2, 4), torch.randn(4, 10), 11)
    with pytest.raises(RuntimeError, match="queries"):
        native.dot_topk(torch.randn(2, 3), torch.randn(4, 10), 5)
    kt = torch.randn(4, 10)
    kt[:, 3:] = float("nan")  # 3 finite scores for k = 5
    with pytest.raises(RuntimeError, match="fewer than k finite scores"):
        native.dot_topk(torch.randn(2, 4), kt, 5)


def test_the_op_runs_the_kernel_on_cpu_float32_and_matmul_topk_elsewhere(monkeypatch, native_kernels):
    native = native_kernels
    torch.manual_seed(0)
    q, kt = torch.randn(40, 20), torch.randn(20, 3_000)
    calls = []
    monkeypatch.setattr(kernels, "native", lambda: calls.append(1) or native)
    v, i = torch.ops.rayrec.dot_topk(q, kt, 20)
    assert calls and torch.equal(i, native.dot_topk(q, kt, 20)[1])
    # float64 inputs take the fallback (matmul + rayrec.topk.sorted_topk): same items, float64 values
    v64, i64 = dot_topk(q.double(), kt.double(), 20)
    assert v64.dtype == torch.float64 and torch.equal(i64, i)
    torch.testing.assert_close(v64.float(), v, rtol=1e-5, atol=1e-5)
    # and without a kernel the op still answers
    monkeypatch.setattr(kernels, "native", lambda: None)
    vf, i_f = torch.ops.rayrec.dot_topk(q, kt, 20)
    assert torch.equal(i_f, i)
    torch.testing.assert_close(vf, v, rtol=1e-5, atol=1e-5)


def test_a_copy_of_the_package_elsewhere_loads_the_build_without_compiling(tmp_path, native_kernels):
    """`ray job submit --working-dir` runs every job from a new copy of the package: it must load the existing build,
    not recompile (ninja rebuilds when a source path changes: ~40 s per job, then again for the original path).
    Here a rebuild cannot happen (no compiler), so the copy either loads the very same module file or has none."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copytree(Path(kernels.__file__).parent, tmp_path / "rayrec", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from rayrec import kernels; m = kernels.native(); print(kernels.__file__); "
            "print(m.__file__ if m else kernels.native_error())")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CXX": "/bin/false", "CC": "/bin/false"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(tmp_path / "rayrec" / "kernels.py"), native_kernels.__file__], p.stderr[-2000:]


def test_the_build_is_keyed_by_the_sources_bytes(tmp_path, monkeypatch):
    from pathlib import Path

    copies = []
    for p in kernels._SOURCES:
        (tmp_path / p.name).write_bytes(p.read_bytes())
        copies.append(tmp_path / p.name)
    key = kernels._build_key()
    monkeypatch.setattr(kernels, "_SOURCES", copies)
    assert kernels._build_key() == key  # where the files lie does not matter
    Path(copies[1]).write_bytes(copies[1].read_bytes() + b"// changed\n")
    assert kernels._build_key() != key  # their bytes do: a changed kernel never loads a stale build


def test_a_narrow_student_exports_with_the_fused_op_and_serves_any_batch(tmp_path, native_kernels):
    from rayrec.models import BPR
    from rayrec.serve import serving_module

    torch.manual_seed(0)
    model = BPR(50, 5_000, 20, init_std=0.5)
    module = serving_module(model, k=20)
    assert module.inner.fused and module.block == 0  # one fused op, threads split the users
    ep = torch.export.export(module.inner, (torch.arange(2),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert any(n.target is torch.ops.rayrec.dot_topk.default for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "student.pt2")
    served = torch.export.load(tmp_path / "student.pt2").module()
    with torch.no_grad():
        for b in (1, 3, 50):
            users = torch.arange(b).flip(0)
            values, items = served(users)
            scores = model.score_all(users).double()  # [b, I]
            _check(model.user_emb.weight[users].detach(), model.item_emb.weight.detach().t(), 20, values, items)
            torch.testing.assert_close(scores.gather(1, items), values.double(), rtol=1e-5, atol=1e-5)


def test_every_dot_model_serves_fused_and_non_finite_tables_are_refused(monkeypatch, native_kernels):
    from rayrec import serve
    from rayrec.models import BPR
    from rayrec.serve import serving_module

    for dim in (20, 200):  # the student and the teacher: the same kernel
        module = serving_module(BPR(4, 1_000, dim))
        assert module.inner.fused and module.block == 0
    monkeypatch.setattr(serve, "fused_serving", lambda: False)  # no compiler: the blocked GEMM path
    assert not serving_module(BPR(4, 1_000, 200)).inner.fused
    model = BPR(4, 1_000, 20)
    with torch.no_grad():
        model.item_emb.weight[7, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite embeddings"):
        serving_module(model)
