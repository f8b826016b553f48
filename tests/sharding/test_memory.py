"""Per-worker table estimates and the budget refusal (the measured figures are in benchmarks/sharded_teacher.py)."""

import pytest

from rayrec.errors import ConfigError
from rayrec.sharding.memory import check_table_budget, model_tables, table_bytes_per_worker


def test_table_share_falls_with_world_size():
    t = model_tables("bpr", 10_000_000, 10_000_000, 64)  # 20M rows x 64: 4.77 GiB of fp32 weights
    ws1 = table_bytes_per_worker(t, "row_wise", "exact_rowwise_adagrad", 1)
    assert ws1 == 20_000_000 * 65 * 4
    assert table_bytes_per_worker(t, "row_wise", "exact_rowwise_adagrad", 2) == ws1 // 2
    assert table_bytes_per_worker(t, "table_wise", "exact_sgd", 2) == 10_000_000 * 64 * 4  # one table each
    assert table_bytes_per_worker(t, "data_parallel", "exact_sgd", 4) == 20_000_000 * 64 * 4
    assert table_bytes_per_worker(model_tables("neumf", 10, 30, 8), "table_wise", "exact_adagrad", 2) == (30 + 10) * 16 * 4


def test_budget_refuses_one_worker_and_names_the_fix():
    args = ("bpr", 10_000_000, 10_000_000, 64, "row_wise", "exact_rowwise_adagrad")
    with pytest.raises(ConfigError, match=r"4,959.1 MiB per worker .* ray.num_workers=1, .*use ray.num_workers >= 2"):
        check_table_budget(*args, 1, 4096)
    assert check_table_budget(*args, 2, 4096) == 20_000_000 * 65 * 2
    assert check_table_budget(*args, 1, 0) > 0  # 0: no limit
    with pytest.raises(ConfigError, match="no worker count fits"):
        check_table_budget("bpr", 10_000_000, 10_000_000, 64, "data_parallel", "exact_sgd", 1, 4096)
