import numpy as np
import pytest

from d2m_core.outputs.validation import _row_norms


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64])
def test_row_norms_are_the_float64_norms(dtype: type) -> None:
    """The features check's norms: summed in float64 without a float64 copy, as np.linalg.norm of one."""
    rows = (np.random.default_rng(0).standard_normal((300, 64)) * 3).astype(dtype)
    expected = np.linalg.norm(rows.astype(np.float64), axis=1)
    assert np.allclose(_row_norms(rows), expected, rtol=1e-14, atol=0)
