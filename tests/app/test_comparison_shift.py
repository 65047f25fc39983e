"""What the shift comparison needs beyond the method's basics: the emulated accelerator testbed
(its model parameters and prompts), the cell's explaining detail (phases, timeline, served
per model, work per instance, placement events), and CPU accounting of processes that end."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from app.triton import DEFAULT_MODEL_REPOSITORY
from bench.cell_detail import instance_work, phases, placement_events, served_by_model, timeline
from bench.loadgen import CallRecord
from bench.placement_watch import PlacementEvent, PlacementWatcher
from bench.procstats import ProcessSampler
from bench.repository import model_config
from bench.testbed import EmulatedAccelerator
from bench.workloads import WORKLOADS, long_prompt

MODEL_DIR = Path(__file__).resolve().parents[2] / "triton_models" / "codegen" / "1"


def _prefix_cache() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_shift_prefix_cache", MODEL_DIR / "prefix_cache.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- the emulated accelerator testbed ----------------------------------------------------------


def test_model_config_replaces_named_parameters_and_refuses_unknown_ones() -> None:
    text = (DEFAULT_MODEL_REPOSITORY / "codegen" / "config.pbtxt").read_text()
    changed = model_config(text, "x", 1, parameters={"hidden_size": "256", "tokens": "3"})
    assert 'key: "hidden_size" value: { string_value: "256" }' in changed
    assert 'key: "tokens" value: { string_value: "3" }' in changed
    assert 'key: "max_tokens" value: { string_value: "256" }' in changed  # untouched
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        model_config(text, "x", 1, parameters={"nope": "1"})


@pytest.mark.parametrize("prefill_ms", [10.0, 40.0])
def test_emulated_accelerator_prefills_one_reference_prompt_in_prefill_ms(
    prefill_ms: float,
) -> None:
    """The model's own prefill arithmetic, fed the testbed's parameters and prompt, gives the
    prefill the testbed promises: so one copy serves 1000 / prefill_ms requests a second."""
    accelerator = EmulatedAccelerator(prefill_ms=prefill_ms)
    parameters = {**_prefix_cache().DEFAULTS, **accelerator.model_parameters()}
    module = _prefix_cache()
    settings = module.PrefixSettings.from_parameters(parameters.__getitem__)
    prefill = module.Prefill(settings, metrics=None)
    prompt = long_prompt("def fibonacci(n):", accelerator.prompt_bytes).encode()
    assert len(prompt) == accelerator.prompt_bytes
    seconds = [prefill.admit([prompt]) for _ in range(3)]  # no cache: every time the same
    assert seconds == pytest.approx([prefill_ms / 1000] * 3)
    assert prefill.admit([prompt, prompt]) == pytest.approx(2 * prefill_ms / 1000)  # serial
    assert accelerator.copy_ceiling_rps == pytest.approx(1000 / prefill_ms)
    assert accelerator.per_copy_capacity_rps == pytest.approx(0.8 * 1000 / prefill_ms)


def test_long_prompt_pads_with_code_and_keeps_the_prompt_last() -> None:
    assert long_prompt("abc", 0) == "abc"
    assert long_prompt("abc", 2) == "abc"
    padded = long_prompt("def f():", 500)
    assert len(padded.encode()) == 500 and padded.endswith("def f():")


def test_accelerator_workloads_run_on_their_own_testbed() -> None:
    assert WORKLOADS["shift-acc-closed"].testbed == "accelerator"
    assert WORKLOADS["shift-acc-open-80"].loop == "open"
    assert WORKLOADS["shift-closed"].testbed == "unary"
    assert WORKLOADS["streaming-closed"].testbed == "streaming"


# --- the cell's detail ---------------------------------------------------------------------------


def _record(tag: str, started: float, latency: float, status: str = "OK") -> CallRecord:
    return CallRecord(tag, started, latency, status)


def test_phases_split_the_window_at_the_shift_and_detail_the_second_half() -> None:
    records = [
        _record("a", 1.0, 0.1),
        _record("a", 2.0, 0.1),
        _record("f", 6.0, 1.0),
        _record("f", 7.0, 3.0),
        _record("f", 8.0, 9.0, "DEADLINE_EXCEEDED"),
    ]
    split = phases(records, 10.0, 5.0)
    assert split["before"]["ok"] == 2 and split["before"]["goodput_rps"] == pytest.approx(0.4)
    after = split["after"]
    assert (after["ok"], after["timed_out"]) == (2, 1)
    assert after["goodput_rps"] == pytest.approx(2 / 5) and after["p99_ms"] == float("inf")
    assert set(split["after_by_model"]) == {"f"}
    assert phases(records, 10.0, None) == {} and phases(records, 10.0, 10.0) == {}


def test_timeline_and_served_by_model_bin_by_start_and_by_end() -> None:
    records = [_record("a", 0.2, 0.1), _record("a", 0.5, 1.0), _record("b", 1.5, 0.2)]
    records.append(_record("b", 1.6, 0.1, "UNAVAILABLE"))
    rows = timeline(records, 2.0)
    assert [(r[0], r[1]) for r in rows] == [(0.0, 2), (1.0, 1)]
    assert rows[0][2] == pytest.approx(550.0)
    assert served_by_model(records, 2.0) == {"a": [1, 1], "b": [0, 1]}


def test_instance_work_sums_models_and_restarts_a_reloaded_series() -> None:
    before = {("u0", "a"): (10.0, 5.0), ("u0", "b"): (4.0, 4.0), ("u1", "a"): (50.0, 50.0)}
    after = {("u0", "a"): (30.0, 10.0), ("u0", "b"): (6.0, 5.0), ("u1", "a"): (3.0, 2.0)}
    work = instance_work(before, after, {"u0": "i0", "u1": "i1", "u2": "i2"})
    assert work == {
        "i0": {"inferences": 22.0, "executions": 6.0},
        "i1": {"inferences": 3.0, "executions": 2.0},  # reloaded: counts from zero
        "i2": {"inferences": 0.0, "executions": 0.0},
    }


def test_placement_events_in_the_window_relative_to_its_start() -> None:
    events = [
        PlacementEvent(1.0, "i0", "a", True),
        PlacementEvent(12.5, "i1", "f", True),
        PlacementEvent(13.0, "i1", "a", False),
        PlacementEvent(50.0, "i2", "f", True),
    ]
    assert placement_events(events, 10.0, 40.0) == [
        (2.5, "i1", "f", "load"),
        (3.0, "i1", "a", "unload"),
    ]


# --- CPU of processes that end -------------------------------------------------------------------


def test_process_sampler_keeps_the_cpu_of_a_child_that_ended_in_the_window() -> None:
    """An unloaded model's stub ends during the window: its CPU up to then still counts (it
    used to be lost, crediting a system that unloads with CPU it did spend)."""
    spin = "import time\\nend = time.process_time() + 0.5\\nwhile time.process_time() < end: pass"
    parent_code = (
        "import subprocess, sys\n"
        "sys.stdin.readline()\n"
        f"subprocess.run([sys.executable, '-c', '{spin}'])\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    try:
        with ProcessSampler([parent.pid], descendants=True, interval_s=0.02) as sampler:
            parent.stdin.write("go\n")
            parent.stdin.flush()
            assert parent.stdout.readline().strip() == "done"  # the child has ended
        assert sampler.cost.cpu_s >= 0.3
    finally:
        parent.kill()
        parent.wait()


def test_the_watcher_says_whether_the_placement_moved_lately() -> None:
    now = [100.0]
    watcher = PlacementWatcher([], clock=lambda: now[0])
    assert not watcher.changed_within(5.0)
    watcher.events.append(PlacementEvent(97.0, "i0", "a", True))
    assert watcher.changed_within(5.0)
    now[0] = 102.5
    assert not watcher.changed_within(5.0)
