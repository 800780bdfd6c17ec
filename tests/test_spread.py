"""Summary spreads: p50/p90 are recorded values (nearest rank on the sorted values, index round(p·(n−1)), ties to
even), as the specification of numpy's "nearest" quantile says."""
import pytest

from avkv.results import spread


@pytest.mark.parametrize("values,p50,p90", [
    ([3.0], 3.0, 3.0),
    ([1.0, 2.0], 1.0, 2.0),                          # index round(0.5) = 0 (to even), round(0.9) = 1
    ([5.0, 1.0, 4.0, 2.0, 3.0], 3.0, 5.0),           # sorted 1..5: index 2 and round(3.6) = 4
    ([10.0, 20.0, 30.0, 40.0], 30.0, 40.0),          # index round(1.5) = 2 (ties to even), round(2.7) = 3
])
def test_percentiles_are_nearest_rank_values(values, p50, p90):
    s = spread(values)
    assert s["p90"] == p90 and s["min"] == min(values) and s["max"] == max(values) and s["n"] == len(values)
    assert s["p50"] == p50
