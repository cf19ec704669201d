"""The top-fraction threshold: exactly DataComp's value, by passes over the pool instead of one big sort."""

import numpy as np
import pytest

from d2m_core.subsets import threshold


def _datacomp(columns: list[np.ndarray], fraction: float) -> float:
    scores = np.concatenate(columns)
    return -np.sort(-scores)[int(len(scores) * fraction)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("collect_limit", [1, 1 << 22])
def test_exact_kth_largest(dtype, fraction: float, collect_limit: int) -> None:
    rng = np.random.default_rng(3)
    columns = [rng.normal(0.3, 0.05, size).astype(dtype) for size in (1000, 0, 2500, 7)]
    columns.append(np.full(600, columns[0][0], dtype))  # heavy ties
    columns.append(np.array([-0.0, 0.0, -1.0, 1.0, -0.25], dtype))
    sel = threshold.kth_largest(lambda: iter(columns), lambda n: threshold.fraction_rank(n, fraction),
                                collect_limit=collect_limit)
    assert sel.value == _datacomp(columns, fraction)
    assert sel.count == sum(map(len, columns))
    if collect_limit == 1:
        assert sel.passes >= 2


def test_fraction_one_keeps_everything_and_empty_pool_is_an_error() -> None:
    cols = [np.array([0.1, 0.2], np.float32)]
    assert threshold.kth_largest(lambda: iter(cols), lambda n: threshold.fraction_rank(n, 1.0)).value == float("-inf")
    with pytest.raises(ValueError, match="no scores"):
        threshold.kth_largest(lambda: iter([]), 0)
