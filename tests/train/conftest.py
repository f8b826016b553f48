"""Fixtures of the train tests."""

import pytest
from _ml100k import ml100k_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """ML-100K prepared once per test module (leave-one-out by time, 99 negatives)."""
    from rayrec.data.prepared import prepare
    from rayrec.train.fit import prepared_root

    cfg = ml100k_config(tmp_path_factory.mktemp("prep"))
    return prepare(cfg.data, prepared_root(cfg), progress=lambda s: None)
