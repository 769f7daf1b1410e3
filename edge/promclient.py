"""prometheus_client's private parts Kurs uses, all here, for one saving: many observations of a
histogram added in one increment per bucket (`edge.metrics.RequestTally`).

Plain `labels(...).inc()` and `labels(...).observe()` per request made an in-process `/courses`
answer 1.8x slower (21-24 us -> 39-42 us a request, three runs of
`bench/bench_edge_inprocess.py --log-level WARNING [--plain-metrics]`), far above the 5 % this
adapter must save to stay. The names below are those of the version in
`WRITTEN_AGAINST`; `edge/tests/test_metrics.py` fails when another version is installed, so an
upgrade is a deliberate step: check these names against the new `prometheus_client/metrics.py`
(`Histogram._metric_init` and `Histogram.observe`) and move the pin.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

WRITTEN_AGAINST = "0.26.0"
# On a labelled Histogram's child: the bucket bounds ending with +Inf, one value per bucket,
# and the sum.
PRIVATE_NAMES = ("_upper_bounds", "_buckets", "_sum")


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for each value, in one increment per bucket and one of the sum:
    a value goes to the first bound it does not exceed, as `Histogram.observe` does."""
    bounds = histogram._upper_bounds
    per_bucket = [0] * len(bounds)
    for value in values:
        per_bucket[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    for bucket, n in zip(histogram._buckets, per_bucket, strict=True):
        if n:
            bucket.inc(n)
