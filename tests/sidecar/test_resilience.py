"""Table tests of the sidecar's failover rules (sidecar.resilience) and their config: pure
logic, an injected clock, no servers."""

from __future__ import annotations

import argparse
import random
from collections import Counter

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from pointsman.errors import ConfigError
from sidecar.admission import UNCLASSED
from sidecar.balancer import CandidateSet, pick_avoiding
from sidecar.config import SidecarConfig, config_from_mapping
from sidecar.decide import Decision, queue_timeout_us, sets_queue_timeout
from sidecar.main import add_arguments, build_config
from sidecar.resilience import (
    EjectionPolicy,
    OutlierDetector,
    RetryBudget,
    counts_against_instance,
    retryable,
)
from sidecar.upstream import GrpcUpstream
from tests.support.fakes import FakeClock

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "details", "retry", "instance_fault"),
    [
        (S.UNAVAILABLE, "failed to connect to all addresses; connection refused", True, True),
        (S.UNAVAILABLE, "Socket closed", True, True),
        (S.UNAVAILABLE, "Connection reset by peer", True, True),
        (S.UNAVAILABLE, "Exceeds maximum queue size", True, False),
        # Triton's queue timeout is the caller's deadline (or its own timeout): not retried.
        (S.UNAVAILABLE, "Request timeout expired", False, False),
        (S.NOT_FOUND, "Request for unknown model: 'echo' is not found", True, False),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded", False, False),
        (S.INVALID_ARGUMENT, "unexpected shape", False, False),
        (S.INTERNAL, "boom", False, False),
        (S.CANCELLED, "", False, False),
        (S.UNIMPLEMENTED, "decoupled", False, False),
        (S.RESOURCE_EXHAUSTED, "", False, False),
        (None, "", False, False),
    ],
)
def test_retryable_and_instance_fault(
    code: grpc.StatusCode | None, details: str, retry: bool, instance_fault: bool
) -> None:
    assert retryable(code, details) is retry
    assert counts_against_instance(code, details) is instance_fault


def test_retry_budget_floor_then_ratio() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_retries=2, window_s=10.0, clock=clock)
    # No traffic yet: only the floor.
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    for _ in range(30):
        budget.record_request()
    # 2 + 0.1 * 30 = 5 allowed in the window, 2 spent.
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_retry_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_retries=1, window_s=10.0, buckets=10, clock=clock)
    assert budget.try_spend()
    assert not budget.try_spend()
    clock.now += 9.5  # still inside the window of the first retry
    assert not budget.try_spend()
    clock.now += 1.0  # the first retry's slot has left the window
    assert budget.try_spend()
    assert not budget.try_spend()


def test_retry_budget_keeps_retries_near_ratio_under_steady_failure() -> None:
    """Every request fails: retries stay near ratio * requests (+ floor) per window."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_retries=3, window_s=10.0, clock=clock)
    spent = 0
    for _ in range(1000):  # 100 requests/s for 10 s
        clock.now += 0.01
        budget.record_request()
        spent += budget.try_spend()
    assert 100 <= spent <= 100 + 3 + 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"min_retries": -1}, "min_retries"),
        ({"window_s": 0.0}, "window_s"),
        ({"buckets": 0}, "buckets"),
    ],
)
def test_retry_budget_rejects_bad_parameters(bad: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("earlier", "expected"),
    [(0, 1.0), (1, 2.0), (2, 4.0), (4, 16.0), (5, 30.0), (100, 30.0)],
)
def test_ejection_grows_to_max(earlier: int, expected: float) -> None:
    policy = EjectionPolicy(consecutive_failures=3, base_ejection_s=1.0, max_ejection_s=30.0)
    assert policy.ejection_s(earlier) == expected


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_failures": 0},
        {"base_ejection_s": 0.0},
        {"base_ejection_s": 5.0, "max_ejection_s": 1.0},
    ],
)
def test_ejection_policy_rejects_bad_parameters(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EjectionPolicy(**bad)  # type: ignore[arg-type]


def test_outlier_consecutive_failures_eject_and_success_resets() -> None:
    clock = FakeClock()
    detector = OutlierDetector(EjectionPolicy(3, 1.0, 30.0), clock=clock)
    assert detector.failure("a") is None
    assert detector.failure("a") is None
    detector.success("a")  # the run is broken
    assert detector.failure("a") is None
    assert detector.failure("a") is None
    assert not detector.any_ejected
    assert detector.failure("a") == 1.0
    assert detector.is_ejected("a") and not detector.is_ejected("b")
    assert detector.ejected() == ["a"]
    # Failures of requests already in flight do not stack while ejected.
    assert detector.failure("a") is None
    clock.now += 1.0
    assert not detector.is_ejected("a")
    assert not detector.any_ejected  # pruned once seen expired


def test_outlier_backoff_doubles_after_return_and_is_forgotten() -> None:
    clock = FakeClock()
    detector = OutlierDetector(EjectionPolicy(2, 1.0, 8.0), clock=clock)
    durations = []
    for _ in range(5):
        # Back from an ejection, one failure is enough to eject again.
        while (ejected := detector.failure("a")) is None:
            pass
        durations.append(ejected)
        clock.now += ejected
    assert durations == [1.0, 2.0, 4.0, 8.0, 8.0]
    detector.success("a")  # soon after an ejection: the doubling is kept...
    assert detector.failure("a") is None  # ...but the failure run starts again
    assert detector.failure("a") == 8.0  # capped at max
    clock.now += 8.0 + 8.0
    detector.success("a")  # max_ejection_s without an ejection: forgotten
    assert detector.failure("a") is None
    assert detector.failure("a") == 1.0


def _upstreams(*addresses: str) -> list[GrpcUpstream]:
    return [GrpcUpstream(a, ()) for a in addresses]


@pytest.mark.parametrize(
    ("avoid", "allowed"),
    [
        (set(), {"a", "b", "c"}),
        ({"a"}, {"b", "c"}),
        ({"a", "b"}, {"c"}),
        ({"a", "b", "c"}, {"a", "b", "c"}),  # every one avoided: pick among all
    ],
)
def test_pick_avoiding(avoid: set[str], allowed: set[str]) -> None:
    candidates = CandidateSet(_upstreams("a", "b", "c"), [1.0, 2.0, 1.0])
    rng = random.Random(7)
    seen = Counter(pick_avoiding(candidates, rng, avoid.__contains__).address for _ in range(300))
    assert set(seen) == allowed


def _request(**parameters: int) -> bytes:
    request = pb.ModelInferRequest(model_name="echo")
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    data: bytes = request.SerializeToString()
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_request(), False),
        (_request(priority=1), False),
        (_request(timeout=5000), True),
        (_request(priority=1, timeout=5000), True),
        # The key's bytes inside a tensor are not a parameter.
        (
            pb.ModelInferRequest(
                model_name="echo", raw_input_contents=[b"\x0a\x07timeout"]
            ).SerializeToString(),
            False,
        ),
    ],
)
def test_sets_queue_timeout(data: bytes, expected: bool) -> None:
    assert sets_queue_timeout(data) is expected


@pytest.mark.parametrize(
    ("remaining", "own", "expected"),
    [
        (None, False, None),  # no deadline: nothing added
        (1.5, False, 1_500_000),
        (0.0000001, False, 1),  # never 0, which Triton reads as "no timeout"
        (2.0, True, 5000),  # the request's own timeout is kept
    ],
)
def test_with_queue_timeout(remaining: float | None, own: bool, expected: int | None) -> None:
    data = _request(timeout=5000) if own else _request()
    decision = Decision("echo", "", UNCLASSED, b"", queue_timeout=None)
    parsed = pb.ModelInferRequest.FromString(decision.apply(data, remaining))
    assert parsed.model_name == "echo"
    if expected is None:
        assert "timeout" not in parsed.parameters
    else:
        assert parsed.parameters["timeout"].int64_param == expected


def test_queue_timeout_us() -> None:
    assert queue_timeout_us(0.25) == 250_000
    assert queue_timeout_us(-1.0) == 1


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"retry_budget_ratio": -1}, "retry_budget_ratio"),
        ({"retry_budget_min": -1}, "retry_budget_min"),
        ({"retry_budget_window_s": 0}, "retry_budget_window_s"),
        ({"outlier_consecutive_failures": 0}, "outlier_consecutive_failures"),
        ({"outlier_base_ejection_s": 0}, "outlier_base_ejection_s"),
        ({"outlier_base_ejection_s": 60.0}, "^outlier_base_ejection_s: must be <="),
        ({"outlier_max_ejection_s": 0.5}, "^outlier_base_ejection_s: must be <="),
        ({"deadline_queue_timeout": "yes"}, "deadline_queue_timeout"),
    ],
)
def test_config_rejects_bad_failover_fields(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config_from_mapping(values)


def test_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--max-attempts", "5",
            "--retry-budget-ratio", "0.2",
            "--outlier-failures", "2",
            "--outlier-ejection", "0.5",
            "--no-deadline-queue-timeout",
        ]
    )  # fmt: skip
    config = build_config(args)
    assert (
        config.max_attempts,
        config.retry_budget_ratio,
        config.outlier_consecutive_failures,
        config.outlier_base_ejection_s,
        config.deadline_queue_timeout,
    ) == (5, 0.2, 2, 0.5, False)
    defaults = build_config(parser.parse_args([]))
    assert defaults.max_attempts == SidecarConfig().max_attempts == 3
    assert defaults.deadline_queue_timeout is True
