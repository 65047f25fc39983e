"""Table tests for the demand tracker: windows, bucket expiry, forecast, bounded memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from router.demand import DemandSnapshot, DemandTracker, DemandWindows, ModelDemand
from tests.support.fakes import FakeClock


def tracker_with(
    per_second: Callable[[int], int], seconds: int, start: float = 0.0
) -> tuple[DemandTracker, FakeClock]:
    """A tracker started at `start` fed `per_second(s)` requests at start + s for each second s
    in [0, seconds), the clock left at start + seconds."""
    clock = FakeClock(start)
    tracker = DemandTracker(clock)
    for second in range(seconds):
        clock.now = start + second
        count = per_second(second)
        if count:
            tracker.record("m", count=count)
    clock.now = start + seconds
    return tracker, clock


# --- windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_second", "seconds", "window_s", "expected_rps"),
    [
        pytest.param(lambda s: 1, 300, 60, 1.0, id="steady-1m"),
        pytest.param(lambda s: 1, 300, 300, 1.0, id="steady-5m"),
        pytest.param(lambda s: 10 if s >= 240 else 0, 300, 60, 10.0, id="burst-1m"),
        pytest.param(lambda s: 10 if s >= 240 else 0, 300, 300, 600 / 299, id="burst-5m"),
        pytest.param(lambda s: 0, 300, 60, 0.0, id="silent"),
        # A tracker 10 s old divides by 10 s, not 60: it does not under-report while it fills.
        pytest.param(lambda s: 4, 10, 60, 4.0, id="fresh-tracker"),
        # Buckets 61..120 cover the 59 s from 61 to now (120); 30 odd seconds of 6 fall in them.
        pytest.param(lambda s: 6 if s % 2 else 0, 120, 60, 180 / 59, id="alternating"),
    ],
)
def test_rate_over_windows(
    per_second: Callable[[int], int], seconds: int, window_s: float, expected_rps: float
) -> None:
    tracker, _ = tracker_with(per_second, seconds)
    assert tracker.rate("m", window_s) == pytest.approx(expected_rps)


def test_versions_are_tracked_apart_and_summed() -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock)
    for second in range(60):
        clock.now = second
        tracker.record("m", "1", count=3)
        tracker.record("m", "2", count=1)
        tracker.record("m", count=2)  # no pinned version
        tracker.record("other", count=5)
    clock.now = 60
    assert tracker.rate("m", 60, version="1") == pytest.approx(3.0)
    assert tracker.rate("m", 60, version="2") == pytest.approx(1.0)
    assert tracker.rate("m", 60, version="") == pytest.approx(2.0)
    assert tracker.rate("m", 60) == pytest.approx(6.0)
    assert tracker.rate("m", 60, version="9") == 0.0
    assert tracker.rate("unknown", 60) == 0.0


@pytest.mark.parametrize(
    ("elapsed_s", "rate_1m", "rate_5m", "remembered"),
    [
        pytest.param(30, 100 / 30, 100 / 30, True, id="inside-both"),
        pytest.param(59.5, 100 / 59.5, 100 / 59.5, True, id="last-moment-of-1m"),
        pytest.param(61, 0.0, 100 / 61, True, id="expired-from-1m"),
        pytest.param(299.5, 0.0, 100 / 299.5, True, id="last-moment-of-5m"),
        pytest.param(301, 0.0, 0.0, False, id="expired-from-5m"),
    ],
)
def test_buckets_expire(elapsed_s: float, rate_1m: float, rate_5m: float, remembered: bool) -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock)
    tracker.record("m", count=100)
    clock.now = elapsed_s
    assert tracker.rate("m", 60) == pytest.approx(rate_1m)
    assert tracker.rate("m", 300) == pytest.approx(rate_5m)
    tracker.snapshot()  # prunes
    assert (tracker.last_seen("m") is not None) is remembered
    assert tracker.series_count == (1 if remembered else 0)


def test_a_slot_reused_a_lap_later_starts_from_zero() -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock)
    tracker.record("m", count=1000)  # bucket 0, slot 0
    clock.now = 300.0  # bucket 300, slot 0 again
    tracker.record("m", count=1)
    clock.now = 300.5
    assert tracker.rate("m", 60) == pytest.approx(1 / 59.5)


@pytest.mark.parametrize(
    ("at", "counted"),
    [
        pytest.param(99.0, True, id="past-within-span"),
        pytest.param(150.0, True, id="future-counts-as-now"),
        pytest.param(100.0 - 299.0, True, id="oldest-bucket"),
        pytest.param(100.0 - 300.0, False, id="older-than-span"),
    ],
)
def test_record_at_explicit_times(at: float, counted: bool) -> None:
    clock = FakeClock(-1000.0)
    tracker = DemandTracker(clock)
    clock.now = 100.0
    tracker.record("m", count=7, at=at)
    assert (tracker.rate("m", 300) > 0) is counted
    if counted:
        assert tracker.last_seen("m") == min(at, 100.0)


def test_zero_count_is_no_demand_and_negative_is_refused() -> None:
    clock = FakeClock(5.0)
    tracker = DemandTracker(clock)
    tracker.record("m", count=0)
    assert tracker.last_seen("m") is None
    assert tracker.series_count == 0
    with pytest.raises(ValueError, match="count must be >= 0"):
        tracker.record("m", count=-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"bucket_s": 0}, id="bucket-zero"),
        pytest.param({"span_s": 1.0}, id="span-one-bucket"),
        pytest.param({"short_window_s": 301}, id="window-past-span"),
        pytest.param({"fit_window_s": 0}, id="fit-window-zero"),
        pytest.param({"recent_window_s": 0}, id="recent-window-zero"),
        pytest.param({"recent_window_s": 301}, id="recent-window-past-span"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DemandTracker(FakeClock(0.0), **kwargs)


# --- forecast --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_second", "horizon_s", "expected_rps"),
    [
        # Count s at second s: the line through the bucket midpoints is y = t - 0.5, so 30 s
        # after now (t = 90) it reads 89.5, while the minute's rate is the mean, 29.5.
        pytest.param(lambda s: s, 30, 89.5, id="rising-ramp"),
        pytest.param(lambda s: s, 0, 59.5, id="rising-ramp-now"),
        pytest.param(lambda s: 20, 30, 20.0, id="flat"),
        pytest.param(lambda s: 60 - s, 10, 0.0, id="falling-floored-at-zero"),
        pytest.param(lambda s: 0, 30, 0.0, id="silent"),
    ],
)
def test_forecast(per_second: Callable[[int], int], horizon_s: float, expected_rps: float) -> None:
    tracker, _ = tracker_with(per_second, 60)
    assert tracker.forecast("m", horizon_s) == pytest.approx(expected_rps, abs=1e-6)


def test_forecast_sees_a_rising_wave_before_its_peak() -> None:
    # Quiet for four minutes, then a wave rising by 1 rps each second for 40 s.
    tracker, _ = tracker_with(lambda s: max(0, s - 240), 280)
    rate = tracker.rate("m", 60)
    forecast = tracker.forecast("m", 30)
    assert forecast > rate
    assert forecast > 40  # already past the current per-second rate (39 at the last bucket)


def test_forecast_of_a_fresh_tracker_is_its_rate() -> None:
    clock = FakeClock(0.25)
    tracker = DemandTracker(clock)
    tracker.record("m", count=3)
    clock.now = 1.5  # one bucket (0..1) started before the tracker, bucket 1 is current
    assert tracker.forecast("m", 30) == pytest.approx(tracker.rate("m", 60))


# --- bounded memory and queries --------------------------------------------------------------


def test_memory_is_bounded_whatever_the_traffic() -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock)
    per_series = 300
    for tick in range(3600 * 4):  # an hour, four records a second, 6 series
        clock.now = tick / 4
        for model in ("a", "b", "c"):
            for version in ("1", "2"):
                tracker.record(model, version, count=50)
        assert tracker.buckets_held <= 6 * per_series
    assert tracker.buckets_held == 6 * per_series
    clock.now += 301
    tracker.snapshot()
    assert (tracker.series_count, tracker.buckets_held) == (0, 0)


def test_models_with_demand_and_last_seen() -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock)
    clock.now = 10
    tracker.record("old")
    clock.now = 200
    tracker.record("recent", "2")
    clock.now = 250
    assert tracker.models_with_demand(60) == frozenset({"recent"})
    assert tracker.models_with_demand(300) == frozenset({"old", "recent"})
    assert tracker.last_seen("recent") == 200
    assert tracker.last_seen("recent", version="1") is None
    assert tracker.last_seen("never") is None


def test_snapshot_is_frozen_and_complete() -> None:
    tracker, clock = tracker_with(lambda s: s, 60)
    clock.now = 60
    snap = tracker.snapshot(horizon_s=30)
    assert isinstance(snap, DemandSnapshot)
    assert (snap.taken_at, snap.short_window_s, snap.long_window_s, snap.horizon_s) == (
        60,
        60.0,
        300.0,
        30,
    )
    demand = snap.of("m")
    assert demand.rate_rps == pytest.approx(tracker.rate("m", 60))
    assert demand.long_rate_rps == pytest.approx(tracker.rate("m", 300))
    # The ramp's trend (89.5 rps in 30 s) is capped at twice the observed rate.
    assert tracker.forecast("m", 30) == pytest.approx(89.5)
    assert demand.forecast_rps == pytest.approx(2 * 30.0)
    assert demand.sizing_rps == demand.forecast_rps
    assert demand.last_seen == 59
    assert dict(demand.version_rates_rps) == {"": pytest.approx(demand.rate_rps)}
    assert snap.of("absent") == ModelDemand("absent")
    with pytest.raises(AttributeError):
        demand.rate_rps = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("last_seen", "within_s", "expected"),
    [
        pytest.param(None, 300, False, id="never"),
        pytest.param(700.0, 300, True, id="exactly-at-edge"),
        pytest.param(699.0, 300, False, id="just-outside"),
        pytest.param(1000.0, 0, True, id="now"),
    ],
)
def test_seen_within(last_seen: float | None, within_s: float, expected: bool) -> None:
    assert ModelDemand("m", last_seen=last_seen).seen_within(1000.0, within_s) is expected


@pytest.mark.parametrize(
    ("ramp_to", "expected_cap"),
    [(2, None), (100, 2.0)],
    ids=["gentle-rise-counts-in-full", "steep-step-capped-at-2x"],
)
def test_snapshot_caps_the_forecast_at_twice_the_observed_rate(
    ramp_to: int, expected_cap: float | None
) -> None:
    now = [0.0]
    tracker = DemandTracker(lambda: now[0])
    for second in range(60):
        now[0] = float(second)
        tracker.record("m", count=1 if second < 50 else ramp_to)
    now[0] = 60.0
    demand = tracker.snapshot(30).of("m")
    raw = tracker.forecast("m", 30)
    observed = max(demand.rate_rps, demand.long_rate_rps)
    if expected_cap is None:
        assert demand.forecast_rps == pytest.approx(raw)
    else:
        assert raw > expected_cap * observed
        assert demand.forecast_rps == pytest.approx(expected_cap * observed)


# --- recent demand: a sudden rise, and the queue --------------------------------------------


@pytest.mark.parametrize(
    ("recent_window_s", "queued", "expected_recent_rps"),
    [
        # 5 rps for 58 s, then 25 rps for 2 s: buckets 55..60 cover the 5 s from 55 to now,
        # 3 s at 5 and 2 s at 25 (the module's formula).
        pytest.param(6.0, 0, (3 * 5 + 2 * 25) / 5, id="six-second-window"),
        pytest.param(2.0, 0, 25.0, id="two-second-window-sees-the-step"),
        # 12 requests waiting, to be answered within the window: 6 more per second.
        pytest.param(2.0, 12, 25.0 + 6.0, id="queue-counts"),
    ],
)
def test_recent_demand_sees_a_step_the_short_window_smooths(
    recent_window_s: float, queued: int, expected_recent_rps: float
) -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock, recent_window_s=recent_window_s)
    for second in range(60):
        clock.now = float(second)
        tracker.record("m", count=5 if second < 58 else 25)
    clock.now = 60.0
    demand = tracker.snapshot(queued={"m": queued}).of("m")
    assert demand.rate_rps == pytest.approx((57 * 5 + 2 * 25) / 59)  # the short window lags
    assert demand.recent_rps == pytest.approx(expected_recent_rps)
    assert demand.queued == queued
    assert demand.sizing_rps >= demand.recent_rps


def test_a_model_with_requests_queued_and_none_answered_has_demand() -> None:
    clock = FakeClock(0.0)
    tracker = DemandTracker(clock, recent_window_s=4.0)
    clock.now = 10.0
    snapshot = tracker.snapshot(queued={"stuck": 8, "idle": 0})
    assert set(snapshot.models) == {"stuck"}
    stuck = snapshot.of("stuck")
    assert (stuck.rate_rps, stuck.queued, stuck.recent_rps, stuck.last_seen) == (0.0, 8, 2.0, None)
    assert snapshot.recent_window_s == 4.0


# --- reconfiguring (a policy reload) ---------------------------------------------------------


def test_reconfigure_with_new_windows_keeps_the_history() -> None:
    tracker, _ = tracker_with(lambda s: 10 if s >= 50 else 0, 60)
    assert tracker.rate("m", 60.0) == pytest.approx(100 / 59)  # covers seconds 1..60
    assert tracker.reconfigure(DemandWindows(short_window_s=10, fit_window_s=10, horizon_s=5))
    assert not tracker.reconfigure(tracker.windows)  # the same again changes nothing
    assert tracker.rate("m", 10.0) == pytest.approx(10.0)
    snapshot = tracker.snapshot()
    assert (snapshot.short_window_s, snapshot.horizon_s) == (10, 5)
    assert snapshot.of("m").rate_rps == pytest.approx(10.0)


def test_reconfigure_to_another_bucket_length_re_buckets_the_counts() -> None:
    tracker, clock = tracker_with(lambda s: 4, 30)  # 4 rps for 30 s
    assert tracker.reconfigure(
        DemandWindows(bucket_s=0.5, span_s=60, short_window_s=20, long_window_s=60, fit_window_s=20)
    )
    assert tracker.windows.bucket_s == 0.5
    assert tracker.series_count == 1
    assert tracker.buckets_held == 120
    # Counts kept, each in the half-second bucket holding its old bucket's midpoint.
    assert tracker.rate("m", 20.0) == pytest.approx(4.0, rel=0.05)
    assert tracker.last_seen("m") == 29.0
    clock.now += 0.5
    tracker.record("m", count=2)
    assert tracker.rate("m", 0.5) == pytest.approx(4.0)


def test_windows_are_validated() -> None:
    with pytest.raises(ValueError, match="short_window_s"):
        DemandWindows(span_s=30, short_window_s=60, long_window_s=30, fit_window_s=30)
    with pytest.raises(ValueError, match="horizon_s"):
        DemandWindows(horizon_s=-1)
