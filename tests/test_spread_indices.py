"""The one rule for evenly spread indices (checkpoints kept, states evaluated, samples read)."""

import numpy as np
import pytest

from ode_reg.functional.indices import spread_indices


@pytest.mark.parametrize("n", [1, 2, 7, 50, 513])
@pytest.mark.parametrize("num", [2, 3, 9, 33])
def test_spread_indices_match_rounded_linspace(n, num):
    want = sorted(set(np.rint(np.linspace(0, n - 1, min(num, n))).astype(int).tolist()))
    got = spread_indices(n, num)
    assert got == (list(range(n)) if num >= n else want)
    assert got[0] == 0 and got[-1] == n - 1


def test_spread_indices_edges():
    assert spread_indices(5, None) == [0, 1, 2, 3, 4]
    assert spread_indices(5, 1) == [4]
    assert spread_indices(0, 3) == []
    with pytest.raises(ValueError, match="num must be >= 1"):
        spread_indices(5, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        spread_indices(-1, 2)
