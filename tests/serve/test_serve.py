"""Serving modules, the exported student and the evaluate job, on a small trained-looking run (no Ray)."""

import json

import numpy as np
import pytest
import torch

from rayrec.artifacts import check_checkpoint, write_checkpoint_manifest
from rayrec.config import CONFIG_DIR, load_config
from rayrec.errors import ArtifactError
from rayrec.models import BPR, LightGCN, NeuMF
from rayrec.serve import export_student, latency, load_dense_model, load_exported, serving_module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fake finished run: ML-100K prepared, a BPR d=8 model.pt and its summary.json."""
    from rayrec.data.prepared import load_prepared, prepare

    tmp = tmp_path_factory.mktemp("run")
    cfg = load_config([CONFIG_DIR / "data/ml100k.yaml", CONFIG_DIR / "model/bpr_d20.yaml"],
                      [f"storage_root={tmp}", "model.dim=8", "data.num_eval_negatives=99", "eval.full_ks=[10]"])
    prepared = prepare(cfg.data, tmp / "prepared", progress=lambda s: None)
    pd = load_prepared(prepared)
    torch.manual_seed(0)
    model = BPR(pd.num_users, pd.num_items, 8, init_std=0.5)
    ck = tmp / "checkpoint"
    ck.mkdir()
    torch.save(model.state_dict(), ck / "model.pt")
    (ck / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "prepared": str(prepared)}))
    write_checkpoint_manifest(ck, 0, 1)  # as the training loop does, last
    return ck, model, pd


def test_incomplete_checkpoints_are_refused_with_what_to_rerun(run, tmp_path):
    import shutil

    ck, _, _ = run
    bad = tmp_path / "ck"
    shutil.copytree(ck, bad)
    (bad / "manifest.rank0.json").unlink()  # cut short before its manifest was written
    with pytest.raises(ArtifactError, match=r"no manifest.rank\*.json, so not a complete checkpoint.*run the training"):
        load_dense_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(ck, bad)
    (bad / "model.pt").write_bytes((bad / "model.pt").read_bytes()[:100])  # truncated after the manifest
    with pytest.raises(ArtifactError, match=r"model.pt: missing or changed since rank 0 wrote the checkpoint"):
        load_dense_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(ck, bad)
    m = json.loads((bad / "manifest.rank0.json").read_text())
    (bad / "manifest.rank0.json").write_text(json.dumps({**m, "writers": 2}))  # a sharded one missing rank 1
    with pytest.raises(ArtifactError, match=r"manifests of 1 of its 2 writing ranks"):
        check_checkpoint(bad, "x")
    assert check_checkpoint(ck, "x", verify=True)[0]["files"]  # the intact one passes, checksums included


def test_checkpoints_are_persisted_under_temporary_names_then_renamed_manifests_last(run, tmp_path, monkeypatch):
    """What the training loop's ``checkpoint_upload_fn`` does on a local (or shared) filesystem, for two writing
    ranks merging into one checkpoint directory, as sharded tables do."""
    import os
    from pathlib import Path

    from rayrec.artifacts import copy_renaming

    import shutil

    ck, _, _ = run
    rank0 = tmp_path / "rank0"
    shutil.copytree(ck, rank0)
    (rank0 / "manifest.rank0.json").unlink()
    write_checkpoint_manifest(rank0, 0, 2)
    rank1 = tmp_path / "rank1"
    (rank1 / "model").mkdir(parents=True)
    (rank1 / "model" / "__1_0.distcp").write_bytes(b"shard of rank 1")
    write_checkpoint_manifest(rank1, 1, 2)
    renames = []
    real_replace = os.replace

    def replace(a, b):
        assert not Path(b).exists() or Path(b).name.startswith("manifest"), b
        assert Path(a).name.startswith(f".{Path(b).name}.part-") and Path(a).parent == Path(b).parent, (a, b)
        renames.append(Path(b).name)
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    dest = tmp_path / "storage" / "checkpoint_000"
    copy_renaming(rank0, dest)
    with pytest.raises(ArtifactError, match="manifests of 1 of its 2 writing ranks"):  # rank 1 has not landed yet
        check_checkpoint(dest, "x")
    copy_renaming(rank1, dest)
    assert renames == ["model.pt", "summary.json", "manifest.rank0.json", "__1_0.distcp", "manifest.rank1.json"]
    assert sorted(p.name for p in dest.rglob("*")) == sorted(
        ["model.pt", "summary.json", "manifest.rank0.json", "model", "__1_0.distcp", "manifest.rank1.json"])
    assert [m["rank"] for m in check_checkpoint(dest, "x", verify=True)] == [0, 1]


@pytest.mark.parametrize("kind", ["bpr", "lightgcn", "neumf"])
def test_serving_module_ranks_like_the_model(kind):
    torch.manual_seed(0)
    U, I = 12, 40
    users_g, items_g = np.arange(U).repeat(3), np.arange(3 * U) % I
    model = {"bpr": lambda: BPR(U, I, 6, init_std=0.5),
             "lightgcn": lambda: LightGCN(U, I, 6, layers=2, train_users=users_g, train_items=items_g),
             "neumf": lambda: NeuMF(U, I, 6)}[kind]()
    top = serving_module(model, k=5)
    users = torch.tensor([0, 3, 11])
    with torch.no_grad():
        want = model.score_all(users).topk(5, dim=1)
    values, indices = top(users)
    torch.testing.assert_close(values, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, want.indices)
    assert not any(b.requires_grad for b in top.buffers()) and not list(top.parameters())


@pytest.mark.parametrize("item_chunk", [1 << 18, 1000, 1700])
def test_grouped_chunked_blocked_topk_equals_one_topk(item_chunk):
    # 3000 items: two-level block top-k (k=5), item chunks merged, users in blocks of 3
    from rayrec.serve import BlockedTopK, TopK
    from rayrec.topk import sorted_topk

    torch.manual_seed(0)
    U, I, D = 10, 3000, 6
    tensors = {"user": torch.randn(U, D), "item": torch.randn(I, D)}
    top = TopK("dot", tensors, k=5, item_chunk=item_chunk)
    assert len(top.chunks) == -(-I // item_chunk)
    users = torch.tensor([9, 0, 3, 3, 7, 1, 2])
    want = (tensors["user"][users] @ tensors["item"].t()).topk(5, dim=1)
    for module in (top, BlockedTopK(top, 3)):
        values, items = module(users)
        torch.testing.assert_close(values, want.values)
        assert torch.equal(items, want.indices)
    # the best items all in one group ({7, 7 + 66, ...}: k = 5 over 530 items makes g = 8 groups of stride 66); the
    # best item in the 2 leftover columns
    s = torch.full((2, 530), -1.0)
    s[0, torch.arange(5) * 66 + 7] = torch.arange(5.0)
    s[1, 529] = 9.0
    v, i = sorted_topk(s, 5)
    assert i[0].tolist() == [271, 205, 139, 73, 7] and int(i[1, 0]) == 529 and float(v[1, 0]) == 9.0


def test_serving_blocks_narrow_tables_smaller_and_splits_batches_evenly(monkeypatch):
    # without the fused kernel (no C++ compiler): a narrow (d < 64) dot model is bound by its score traffic: 6 MiB
    # blocks; a wide one 16 MiB
    from rayrec import serve
    from rayrec.models import BPR
    from rayrec.serve import serving_module

    monkeypatch.setattr(serve, "fused_serving", lambda: False)

    assert serving_module(BPR(4, 25_182, 20)).block == 62
    assert serving_module(BPR(4, 25_182, 200)).block == 166
    module = serving_module(BPR(70, 25_182, 20))
    seen = []
    module.inner.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].shape[0])))
    values, items = module(torch.arange(64))
    assert seen == [32, 32] and items.shape == (64, 20)  # not 62 + 2
    # a batch on a GPU: blocks sized by memory only (4 GiB of scores: 42,639 users of 25k items), so 1024 users
    # make one call there while the CPU keeps its cache-sized blocks
    assert module.gpu_block == 42_639 and module.block_for(torch.device("cuda")) == 42_639
    assert module.block_for(torch.device("cpu")) == 62
    assert serving_module(BPR(4, 2_000_000, 20)).gpu_block == 536  # every item in one GEMM there


def test_a_wide_table_over_many_items_exports_for_any_batch_size():
    # d >= 64 over > 4,096 items: scores in 2,048-item GEMMs (rayrec.topk.dot_scores), which must not pin the
    # exported batch size (a branch on the batch size did: "16 <= batch" guard)
    from rayrec.serve import TopK

    torch.manual_seed(0)
    tensors = {"user": torch.randn(50, 64), "item": torch.randn(5000, 64)}
    top = TopK("dot", tensors, k=20)
    ep = torch.export.export(top, (torch.arange(20),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    for b in (1, 3, 40):
        users = torch.arange(b)
        want = (tensors["user"][users] @ tensors["item"].t()).topk(20, dim=1)
        values, items = ep.module()(users)
        torch.testing.assert_close(values, want.values)
        assert torch.equal(items, want.indices)


@pytest.mark.parametrize("fused", [True, False])
def test_export_roundtrip_and_id_maps(run, tmp_path, monkeypatch, fused):
    # fused: the exported graph calls torch.ops.rayrec.dot_topk (rayrec.kernels) over every item; else (no C++
    # compiler) it scores in item chunks and user blocks
    from rayrec import kernels, serve

    if fused and kernels.native() is None:
        pytest.skip(f"the fused kernel did not build: {kernels.native_error()}")
    monkeypatch.setattr(serve, "fused_serving", lambda: fused)
    ck, model, pd = run
    out = export_student(ck, tmp_path / "exported", k=10)
    module, m = load_exported(out)
    assert m["num_parameters"] == (pd.num_users + pd.num_items) * 8 and m["k"] == 10
    assert m["format"] == "torch.export", m["export_fallback_reason"]
    assert (module.block, module.gpu_block) == (m["user_block"], m["gpu_user_block"])
    assert m["fused_topk"] is fused
    calls = [n for n in module.inner.graph.nodes if n.target is torch.ops.rayrec.dot_topk.default]
    assert len(calls) == fused
    assert m["gpu_user_block"] >= m["user_block"] > 0 if not fused else m["user_block"] == 0
    users = torch.arange(7)
    scores, items = module(users)
    with torch.no_grad():
        want = model.score_all(users).topk(10, dim=1)
    assert torch.equal(items, want.indices) and scores.shape == (7, 10)
    if fused:  # the op moves with the graph (off the CPU it runs matmul + top-k); "meta" stands in for a GPU
        moved, _ = load_exported(out, device="meta")
        assert moved(torch.arange(7, device="meta"))[1].shape == (7, 10)
        return

    # loaded onto another device, the tensors the graph creates (the block top-k's arange) move too; module.to()
    # leaves them on the CPU (a CUDA batch then fails). "meta" stands in for a GPU here.
    def devices(mod):
        return {str(n.kwargs["device"]) for n in mod.inner.graph.nodes if n.kwargs.get("device") is not None}

    assert devices(module) == {"cpu"}
    moved, _ = load_exported(out, device="meta")
    assert devices(moved) == {"meta"}
    assert moved(torch.arange(7, device="meta"))[1].shape == (7, 10)
    if not torch.cuda.is_available():  # asking for a GPU this machine lacks fails early, saying so
        with pytest.raises(ValueError, match="no CUDA device"):
            load_exported(out, device="cuda")
        with pytest.raises(ValueError, match="no CUDA device"):
            export_student(ck, tmp_path / "gpu", device="cuda")
        assert not (tmp_path / "gpu").exists()
    import pyarrow.parquet as pq

    im = pq.read_table(out / "item_map.parquet").to_pandas()
    assert len(im) == pd.num_items and (im["raw_id"].to_numpy() == pd.item_raw()).all()
    (out / "manifest.json").unlink()  # an export without its manifest is refused, saying what to rerun
    with pytest.raises(ArtifactError, match="export"):
        load_exported(out)


def test_load_dense_model_and_latency(run):
    ck, model, _ = run
    loaded = load_dense_model(ck)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    lat = latency(serving_module(loaded), torch.arange(16), warmup=1, repeats=5)
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    with pytest.raises(ArtifactError, match="not a complete checkpoint"):
        load_dense_model(ck.parent)


def test_evaluate_job_on_a_checkpoint(run, tmp_path, capsys):
    from jobs.evaluate import main

    ck, _, _ = run
    m = main(["--checkpoint", str(ck), "--out", str(tmp_path / "ev.json"), "eval.full_ks=[5,10]"])
    assert {"test/H@10", "full/Recall@5", "full/NDCG@10"} <= set(m)
    assert json.loads((tmp_path / "ev.json").read_text()) == m
    assert "metrics:" in capsys.readouterr().out
    from rayrec.errors import ConfigError

    with pytest.raises(ConfigError, match="eval"):
        main(["--checkpoint", str(ck), "train.lr=1"])
