"""unique_keys: np.unique's result for integer keys, by a sort."""

import numpy as np

from rayrec.keys import unique_keys


def test_unique_keys_equals_np_unique():
    rng = np.random.default_rng(0)
    for a in [rng.integers(0, 10**12, 5000), rng.integers(0, 5, 50), np.zeros(0, dtype=np.int64), np.array([3]),
              np.array([[4, 1], [4, 2]])]:
        got = unique_keys(a)
        assert np.array_equal(got, np.unique(a)) and got.dtype == np.asarray(a).dtype
