"""Data: raw readers, the dataset registry, preprocessing, splits, prepared datasets and synthetic data.

Pipeline (``prepare``)::

    registry.locate ─> readers.READERS[...] ─> preprocess: binarise ─> dedup ─> kcore ─> remap
        ─> splits: leave_one_out | ratio_split | load_derrd_split ─> sample_eval_negatives
        ─> <prepared_root>/<dataset>__<split>__<hash>/  (parquet + manifest.json)  ─> load_prepared

Only this package reads raw files; everything downstream reads prepared directories.
"""

from rayrec.data.prepared import PreparedData, load_prepared, prepare
from rayrec.data.preprocess import binarise, dedup, kcore, remap
from rayrec.data.readers import (
    READERS,
    Interactions,
    read_csv_table,
    read_movielens_dcolon,
    read_movielens_tab,
    read_parquet_table,
    read_table,
    read_tsv_pairs,
    read_users_dat,
)
from rayrec.data.registry import DATASETS, DatasetSpec, locate, resolve_data_root
from rayrec.data.splits import (
    Split,
    leave_one_out,
    load_derrd_split,
    ratio_split,
    sample_eval_negatives,
    user_items_csr,
)
from rayrec.data.synthetic import generate_synthetic

__all__ = [
    "DATASETS",
    "READERS",
    "DatasetSpec",
    "Interactions",
    "PreparedData",
    "Split",
    "binarise",
    "dedup",
    "generate_synthetic",
    "kcore",
    "leave_one_out",
    "load_derrd_split",
    "load_prepared",
    "locate",
    "prepare",
    "ratio_split",
    "read_csv_table",
    "read_movielens_dcolon",
    "read_movielens_tab",
    "read_parquet_table",
    "read_table",
    "read_tsv_pairs",
    "read_users_dat",
    "remap",
    "resolve_data_root",
    "sample_eval_negatives",
    "user_items_csr",
]
