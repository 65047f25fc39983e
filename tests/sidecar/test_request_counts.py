"""The lock-free request counts export what prometheus-client's own Counter and Histogram
would: the same families, names, labels, values and `_created` series, for the same calls."""

from __future__ import annotations

import re
import threading

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sidecar.request_counts import (
    DURATION_BUCKETS_S,
    AttemptCounts,
    RequestCollector,
    RequestSeries,
)

OK, UNAVAILABLE, NOT_FOUND = (
    grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
)  # fmt: skip
# (model, version, method, code, seconds, routed, hit): durations on bucket bounds, between
# them, zero and past the last bound; two versions of one model share its counters.
CALLS = [
    ("echo", "default", "infer", OK, 0.001, True, True),
    ("echo", "default", "infer", OK, 0.0011, True, True),
    ("echo", "default", "infer", UNAVAILABLE, 0.0, True, False),
    ("echo", "2", "infer", OK, 30.0, True, True),
    ("echo", "2", "infer", NOT_FOUND, 31.0, False, False),
    ("echo", "default", "stream", OK, 0.3, True, True),
    ("_unknown", "_unknown", "infer", NOT_FOUND, 0.0002, False, False),
]
ATTEMPTS = [("10.0.0.1:8001", OK), ("10.0.0.1:8001", OK), ("10.0.0.2:8001", UNAVAILABLE),
            ("10.0.0.2:8001", OK)]  # fmt: skip


def stock_exposition() -> str:
    """The calls recorded as the sidecar did before, with prometheus-client's classes."""
    registry = CollectorRegistry()
    duration = Histogram(
        "pointsman_sidecar_request_duration_seconds",
        "Time from a ModelInfer call (or a whole ModelStreamInfer stream) arriving to its "
        "answer, whatever the status; version is the requested one, 'default' if none",
        ("model", "version", "method"), buckets=DURATION_BUCKETS_S, registry=registry,
    )  # fmt: skip
    requests = Counter(
        "pointsman_sidecar_requests",
        "ModelInfer calls and ModelStreamInfer streams answered, by gRPC status",
        ("model", "method", "code"), registry=registry,
    )  # fmt: skip
    routed = Counter(
        "pointsman_sidecar_routed",
        "Requests sent to an instance chosen by route table or router pick",
        ("model",), registry=registry,
    )  # fmt: skip
    hits = Counter(
        "pointsman_sidecar_affinity_hits",
        "Routed requests whose chosen instance had the model (and version) ready",
        ("model",), registry=registry,
    )  # fmt: skip
    attempts = Counter(
        "pointsman_sidecar_upstream_attempts",
        "Inference calls and streams sent to a Triton instance, by the status it answered",
        ("instance", "code"), registry=registry,
    )  # fmt: skip
    for model, version, method, code, seconds, was_routed, hit in CALLS:
        routed.labels(model), hits.labels(model)  # a series made both children
        if was_routed:
            routed.labels(model).inc()
        if hit:
            hits.labels(model).inc()
        duration.labels(model, version, method).observe(seconds)
        requests.labels(model, method, code.name).inc()
    for address, code in ATTEMPTS:
        attempts.labels(address, code.name).inc()
    return generate_latest(registry).decode()


def lock_free_exposition() -> str:
    registry = CollectorRegistry()
    rare = Counter("rare", "the rare counts stay prometheus-client's", ("model",), registry=None)
    series: dict[tuple[str, str, str], RequestSeries] = {}
    attempts = AttemptCounts()
    registry.register(RequestCollector(series.values, attempts))
    for model, version, method, code, seconds, was_routed, hit in CALLS:
        one = series.get((model, version, method))
        if one is None:
            child = rare.labels(model)
            one = series[(model, version, method)] = RequestSeries(
                model, version, method, child, child, child
            )
        one.routed += was_routed
        one.hits += hit
        one.done(code, seconds)
    for address, code in ATTEMPTS:
        attempts.add(address, code)
    return generate_latest(registry).decode()


def normalized(exposition: str) -> list[str]:
    """Its lines, sorted, with the `_created` timestamps (which differ) blanked."""
    blanked = (re.sub(r"(_created\{.*\}) \S+$", r"\1 T", line) for line in exposition.splitlines())
    return sorted(blanked)


def test_the_same_families_names_labels_and_values_as_prometheus_client() -> None:
    stock, ours = stock_exposition(), lock_free_exposition()
    assert "pointsman_sidecar_request_duration_seconds_created" in stock
    assert normalized(ours) == normalized(stock)


def test_a_scrape_from_another_thread_while_calls_are_counted() -> None:
    series: dict[tuple[str, str, str], RequestSeries] = {}
    attempts = AttemptCounts()
    registry = CollectorRegistry()
    registry.register(RequestCollector(series.values, attempts))
    rare = Counter("rare", "rare", ("model",), registry=None)
    stop = threading.Event()
    scrapes: list[str] = []

    def scrape() -> None:
        while not stop.is_set():
            scrapes.append(generate_latest(registry).decode())

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):  # new series and new codes keep appearing meanwhile
            key = (f"m{i % 50}", "default", "infer")
            if key not in series:
                series[key] = RequestSeries(*key, rare, rare, rare)
            series[key].done(OK if i % 3 else UNAVAILABLE, 0.002)
            attempts.add(f"10.0.0.{i % 40}:8001", OK if i % 5 else NOT_FOUND)
    finally:
        stop.set()
        scraper.join()
    assert scrapes
    final = generate_latest(registry).decode()
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in final.splitlines()
        if line.startswith("pointsman_sidecar_requests_total")
    )
    assert total == 20_000
