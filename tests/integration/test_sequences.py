"""Sequences and sessions through the sidecar, on three real Tritons of their own.

`accumulate` (a stateful accumulator behind Triton's sequence batcher, triton_models/) on all
three instances, driven by stock `tritonclient.grpc` (`sequence_id`, `sequence_start`,
`sequence_end`): interleaved sequences through one sidecar, then through two sidecars
alternating per step, come back right; bad sequence input gets clear statuses; `kill -9` of the
instance holding a live sequence fails its next step with a status naming the sequence, and the
other sequences go on. Sessions (`x-session-id`) on `slow`: each session on one instance
while unsaturated, and a saturated holder moves a session once, counted. This module
kills one of its Tritons, so the kill runs last and the fleet is its own.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from app.fleet import Fleet, FleetConfig
from app.triton import wait_until_ready
from sidecar.config import SidecarConfig
from sidecar.server import SidecarServer, start_sidecar
from tests.support.loop_thread import LoopThread

pytestmark = [pytest.mark.triton, pytest.mark.timeout(300)]

# Two Python models an instance: more stubs starting at once on a busy 2-core machine have
# made Triton abort at start (boost::interprocess::lock_exception in the Python backend).
MODELS = ("accumulate", "slow")
PLACEMENT = {f"triton-{i}": MODELS for i in range(3)}
POLICY = """\
models:
  accumulate: {min_copies: 3, max_copies: 3}
  slow: {min_copies: 3, max_copies: 3}
  echo: {max_copies: 0}
  codegen: {max_copies: 0}
  codegen_stream: {max_copies: 0}
sessions: {header: x-session-id, max_in_flight: 2}
"""
STEPS = 5
SUMS = [1, 3, 6, 10, 15]  # the running sums of steps 1..5 of a sequence


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir: Path = tmp_path_factory.mktemp("sequence-fleet")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    config = FleetConfig(
        instances=3,
        placement=PLACEMENT,
        models=MODELS,
        sidecar_port=0,
        router_port=0,
        run_dir=run_dir,
        policy_file=policy,
        sidecar_args=("--cold-start-wait", "0"),
    )
    with Fleet(config) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def second_sidecar(fleet: Fleet) -> Iterator[SidecarServer]:
    """Another sidecar on the same router, in this process (its metrics readable here)."""
    loop = LoopThread()
    config = SidecarConfig(
        listen="127.0.0.1:0", routers=(fleet.router_address,), cold_start_wait_s=0
    )
    sidecar = loop.run(start_sidecar(config, registry=CollectorRegistry()))
    try:
        wait_until_ready(sidecar.address, MODELS, 60, server_ready=True)
        yield sidecar
    finally:
        loop.run(sidecar.stop(0))
        loop.close()


# -- helpers -----------------------------------------------------------------------------------


def value(n: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[n]], dtype=np.int32))
    return [tensor]


def sequence_step(
    client: grpcclient.InferenceServerClient, sid: int | str, k: int, steps: int = STEPS
) -> int:
    """Step k (1-based) of sequence `sid`, adding k; the running sum."""
    result = client.infer(
        "accumulate", value(k), sequence_id=sid, sequence_start=k == 1,
        sequence_end=k == steps, client_timeout=20,
    )  # fmt: skip
    return int(result.as_numpy("OUTPUT")[0][0])


def successes(fleet: Fleet, model: str, instances: Sequence[str] | None = None) -> dict[str, int]:
    """Requests of `model` each instance has answered (Triton's own statistics)."""
    counts = {}
    for spec in fleet.tritons:
        if instances is not None and spec.instance_id not in instances:
            continue
        with grpcclient.InferenceServerClient(spec.grpc_address) as client:
            stats = client.get_inference_statistics(model).model_stats
            counts[spec.instance_id] = sum(s.inference_stats.success.count for s in stats)
    return counts


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {i: after[i] - before[i] for i in after if after[i] != before[i]}


def landed(fleet: Fleet, model: str, before: dict[str, int], requests: int) -> dict[str, int]:
    """Where `requests` answered requests of `model` landed since `before`, by Triton's own
    statistics (which count a request a moment after its answer: read until all show)."""
    deadline = time.monotonic() + 5
    while True:
        counts = grew(before, successes(fleet, model))
        if sum(counts.values()) >= requests or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def scraped(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    wanted = set(labels.items())
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and wanted <= set(s.labels.items())
    )


def run_interleaved(addresses: Sequence[str], ids: Sequence[int]) -> dict[int, list[int]]:
    """Step k of every sequence at once (one thread each), then step k + 1; step k goes
    through addresses[(k - 1) % len(addresses)]."""
    clients = [grpcclient.InferenceServerClient(a) for a in addresses]
    answers: dict[int, list[int]] = {sid: [] for sid in ids}
    try:
        with ThreadPoolExecutor(max_workers=len(ids)) as pool:
            for k in range(1, STEPS + 1):
                client = clients[(k - 1) % len(clients)]
                sums = pool.map(lambda sid, k=k, c=client: sequence_step(c, sid, k), ids)
                for sid, total in zip(ids, sums, strict=True):
                    answers[sid].append(total)
    finally:
        for client in clients:
            client.close()
    return answers


# -- sequences --------------------------------------------------------------------------------


def test_server_metadata_advertises_sequences(fleet: Fleet) -> None:
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        assert "sequence" in client.get_server_metadata().extensions


def test_interleaved_sequences_through_the_sidecar_are_all_correct(fleet: Fleet) -> None:
    before = successes(fleet, "accumulate")
    started = time.monotonic()
    answers = run_interleaved([fleet.sidecar_address], list(range(1, 21)))
    seconds = time.monotonic() - started
    wrong = {sid: sums for sid, sums in answers.items() if sums != SUMS}
    spread = landed(fleet, "accumulate", before, 100)
    print(f"20 sequences x 5 steps through one sidecar: {100 - 5 * len(wrong)}/100 correct "
          f"in {seconds:.2f} s; steps per instance {spread}")  # fmt: skip
    assert wrong == {}
    assert sum(spread.values()) == 100 and len(spread) >= 2  # spread by the hash


def test_two_sidecars_alternating_per_step_agree(
    fleet: Fleet, second_sidecar: SidecarServer
) -> None:
    registry = second_sidecar.metrics.registry
    answers = run_interleaved(
        [fleet.sidecar_address, second_sidecar.address], list(range(1001, 1021))
    )
    wrong = {sid: sums for sid, sums in answers.items() if sums != SUMS}
    probes = registry.get_sample_value(
        "pointsman_sidecar_sequence_probes_total", {"model": "accumulate"}
    )
    print(f"20 sequences x 5 steps, sidecars alternating per step: {100 - 5 * len(wrong)}/100 "
          f"correct; steps the second sidecar sent to a non-holder: {probes or 0:.0f}")  # fmt: skip
    assert wrong == {}
    assert not probes  # both sidecars hashed every sequence to the same instance


@pytest.mark.parametrize(
    ("sid", "start", "end", "code", "words"),
    [
        ("x" * 10240, True, False, "StatusCode.INVALID_ARGUMENT", "at most 128 characters"),
        (424242, False, False, "StatusCode.FAILED_PRECONDITION", "sequence 424242 of model"),
        (434343, False, True, "StatusCode.FAILED_PRECONDITION", "no instance holds it"),
    ],
    ids=["10 KiB string id", "a step without start", "an end for an unknown sequence"],
)
def test_bad_sequence_input_gets_a_clear_status(
    fleet: Fleet, sid: int | str, start: bool, end: bool, code: str, words: str
) -> None:
    before = successes(fleet, "accumulate")
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("accumulate", value(1), sequence_id=sid, sequence_start=start,
                         sequence_end=end, client_timeout=10)  # fmt: skip
        assert refused.value.status() == code and words in (refused.value.message() or "")
        # Nothing ran, and the sidecar serves on.
        assert sequence_step(client, 99, 1, steps=1) == 1
        assert sum(landed(fleet, "accumulate", before, 1).values()) == 1


# -- sessions ---------------------------------------------------------------------------------


def slow_turn(session: str, sleep_ms: int, address: str) -> None:
    """One turn of `session` on `slow`, which answers after `sleep_ms`."""
    values = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    values.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
    sleep = grpcclient.InferInput("SLEEP_MS", [1, 1], "INT32")
    sleep.set_data_from_numpy(np.array([[sleep_ms]], dtype=np.int32))
    with grpcclient.InferenceServerClient(address) as client:
        client.infer("slow", [values, sleep], headers={"x-session-id": session},
                     client_timeout=30)  # fmt: skip


def test_sessions_stay_on_one_instance_while_unsaturated(fleet: Fleet) -> None:
    homes: dict[str, str] = {}
    for n in range(50):
        session = f"conversation-{n}"
        before = successes(fleet, "slow")
        for _ in range(10):
            slow_turn(session, 1, fleet.sidecar_address)
        where = landed(fleet, "slow", before, 10)
        assert list(where.values()) == [10], (session, where)
        homes[session] = next(iter(where))
    spread = {i: list(homes.values()).count(i) for i in sorted(set(homes.values()))}
    moves = scraped(fleet.sidecar_metrics_url, "pointsman_sidecar_session_moves_total")
    print(f"50 sessions x 10 turns: each on one instance; sessions per instance {spread}; "
          f"moves {moves:.0f}")  # fmt: skip
    assert len(spread) == 3 and moves == 0


def test_a_saturated_holder_moves_a_session_once_and_counts_it(fleet: Fleet) -> None:
    session = "long-conversation"
    url = fleet.sidecar_metrics_url
    moves_before = scraped(url, "pointsman_sidecar_session_moves_total", model="slow")

    def turn(sleep_ms: int) -> None:
        slow_turn(session, sleep_ms, fleet.sidecar_address)

    before = successes(fleet, "slow")
    turn(1)
    (home,) = landed(fleet, "slow", before, 1)
    # Four turns at once, 3 s each: two fill the holder (max_in_flight 2), the third moves
    # the session, the fourth follows the move.
    before = successes(fleet, "slow")
    threads = [threading.Thread(target=turn, args=(3000,)) for _ in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # in order, and all four well within the first two's 3 s
    for thread in threads:
        thread.join()
    burst = landed(fleet, "slow", before, 4)
    # Unsaturated again, later turns stay where the session moved.
    before = successes(fleet, "slow")
    for _ in range(5):
        turn(1)
    after = landed(fleet, "slow", before, 5)
    moves = scraped(url, "pointsman_sidecar_session_moves_total", model="slow") - moves_before
    print(f"saturating load on a session's holder ({home}): burst landed {burst}, later turns "
          f"{after}, moves counted {moves:.0f}")  # fmt: skip
    assert burst[home] == 2 and sum(burst.values()) == 4 and len(burst) == 2
    (moved_to,) = after
    assert moved_to != home and after[moved_to] == 5
    assert moves == 1


# -- kill -9 (last: the fleet loses an instance) ---------------------------------------------


def test_kill_9_of_a_sequence_holder_fails_its_steps_clearly_and_spares_the_others(
    fleet: Fleet,
) -> None:
    ids = list(range(2001, 2021))
    holder: dict[int, str] = {}
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        # Where each sequence lives, by Triton's own statistics after its first step; then
        # the second steps, quickly (the model ends a sequence idle for 5 s).
        before = successes(fleet, "accumulate")
        for sid in ids:
            assert sequence_step(client, sid, 1) == SUMS[0]
            (holder[sid],) = landed(fleet, "accumulate", before, 1)
            before[holder[sid]] += 1
        for sid in ids:
            assert sequence_step(client, sid, 2) == SUMS[1]
        victim = holder[ids[0]]
        process = next(p for p in fleet.processes if p.name == victim)
        process.kill()  # SIGKILL
        process.wait(10)
        process.kill_leftovers()  # its Python backend stubs
        outcomes: dict[int, str] = {}
        for sid in ids:
            try:
                sums = [sequence_step(client, sid, k) for k in range(3, STEPS + 1)]
                outcomes[sid] = "ok" if sums == SUMS[2:] else f"wrong {sums}"
            except InferenceServerException as error:
                outcomes[sid] = f"{error.status()}: {error.message()}"
    lost = [sid for sid in ids if holder[sid] == victim]
    for sid in lost:
        outcome = outcomes[sid]
        assert outcome.startswith(("StatusCode.ABORTED", "StatusCode.FAILED_PRECONDITION"))
        assert f"sequence {sid} of model 'accumulate'" in outcome and "lost" in outcome
    spared = {sid: outcomes[sid] for sid in ids if sid not in lost}
    codes = sorted({outcomes[s].split(":")[0] for s in lost})
    right = sum(o == "ok" for o in spared.values())
    print(f"kill -9 of {victim}: its {len(lost)} live sequences failed with {codes}, "
          f"e.g. {outcomes[lost[0]]!r}; {right}/{len(spared)} others completed right")  # fmt: skip
    assert spared and all(o == "ok" for o in spared.values())
