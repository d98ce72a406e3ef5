"""The track record's median stage time from its log-bucket histogram (SQL stage_bucket)."""

from __future__ import annotations

import math

from ainarres_api.server.services.oversight import median_of_buckets


def bucket(seconds: float) -> int:
    """What SQL stage_bucket computes: floor(4 · log2(1 + seconds))."""
    return math.floor(4 * math.log2(1 + max(seconds, 0)))


def test_nothing_counted_is_unknown() -> None:
    assert median_of_buckets({}) is None


def test_the_median_lies_within_its_bucket() -> None:
    for values in ([30.0], [5.0, 30.0, 600.0], [1.0, 2.0, 3.0, 4.0, 1000.0, 2000.0, 3000.0],
                   [0.0, 0.0, 3600.0]):
        hist: dict[int, int] = {}
        for v in values:
            hist[bucket(v)] = hist.get(bucket(v), 0) + 1
        true = sorted(values)[(len(values) - 1) // 2]
        got = median_of_buckets(hist)
        assert got is not None
        # a quarter-log2 bucket spans a factor 2^(1/4) ≈ 1.19 of (1 + seconds)
        assert (1 + got) / 2 ** 0.25 <= 1 + true <= (1 + got) * 2 ** 0.25, (values, got)
