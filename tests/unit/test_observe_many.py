"""metrics.observe_many must expose exactly what one observe() per value would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from app.metrics import LATENCY_BUCKETS, observe_many

amounts = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=500, allow_nan=False),
        st.sampled_from(LATENCY_BUCKETS),  # exactly on a bound: observe() counts it in that bucket
    ),
    max_size=200,
)


def _histogram() -> Histogram:
    return Histogram("latency_seconds", "test", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())


def _samples(histogram: Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in histogram.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


@given(amounts)
def test_observe_many_is_observe_per_value(values: list[float]) -> None:
    one_by_one, at_once = _histogram(), _histogram()
    for value in values:
        one_by_one.observe(value)
    observe_many(at_once, values)
    expected, got = _samples(one_by_one), _samples(at_once)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), key


def test_observe_many_of_nothing_changes_nothing() -> None:
    histogram = _histogram()
    observe_many(histogram, [])
    samples = _samples(histogram)
    assert samples[("latency_seconds_count", ())] == 0
    assert samples[("latency_seconds_sum", ())] == 0
