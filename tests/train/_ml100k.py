"""The small real run the train tests share: MovieLens-100K, BPR d=20, batch 512, 99 evaluation negatives."""

from rayrec.config import CONFIG_DIR, load_config


def ml100k_config(tmp, *overrides):
    return load_config(
        [CONFIG_DIR / "data/ml100k.yaml", CONFIG_DIR / "model/bpr_d20.yaml"],
        [f"storage_root={tmp}", "train.batch_size=512", "train.lr=0.01", "data.num_eval_negatives=99", *overrides],
    )
