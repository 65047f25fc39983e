"""The policy file in a running router against real Tritons: canary splits, sticky users,
header rules and pins through PickTarget and the route tables; GetPolicy; ReloadPolicy that
refuses a bad file and keeps the old policy; the file watcher; reloads under load."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
import yaml

from app.fleet import Fleet
from app.processes import free_port
from app.triton import wait_until_ready
from bench.calls import codegen_inputs
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc

pytestmark = pytest.mark.triton

CANARY = """\
models:
  codegen:
    versions:
      split: {"1": 80, "2": 20}
      sticky_header: x-user-id
      header_rules:
        - {header: x-canary, value: "1", version: "2"}
"""
ALL_ON_TWO = 'models:\n  codegen:\n    versions:\n      split: {"2": 1}\n'


@pytest.fixture(scope="module")
def policy_router(
    fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[pb_grpc.RouterServiceStub, Path]]:
    """A second router over the session's Tritons, with a policy file."""
    folder = tmp_path_factory.mktemp("policy-router")
    policy = folder / "policy.yaml"
    policy.write_text(CANARY)
    address = f"127.0.0.1:{free_port()}"
    config = folder / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": address,
                "instances": [
                    {"id": s.instance_id, "grpc": s.grpc_address, "metrics_url": s.metrics_url}
                    for s in fleet.tritons
                ],
                "policy_file": str(policy),
            }
        )
    )
    router = subprocess.Popen(
        [sys.executable, "-m", "app", "router", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.RouterServiceStub(channel)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                stub.PickTarget(pb.PickTargetRequest(model_name="codegen"), timeout=2)
                break
            except grpc.RpcError:
                assert router.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        stub.address = address  # type: ignore[attr-defined]
        yield stub, policy
    finally:
        channel.close()
        router.terminate()
        router.wait(30)


def _version(stub: pb_grpc.RouterServiceStub, **headers: str) -> str:
    answer = stub.PickTarget(pb.PickTargetRequest(model_name="codegen", headers=headers), timeout=5)
    assert answer.model_version in answer.target.ready_versions
    return answer.model_version


def test_split_holds_within_a_few_percent(
    policy_router: tuple[pb_grpc.RouterServiceStub, Path],
) -> None:
    stub, _ = policy_router
    counts = collections.Counter(_version(stub) for _ in range(2000))
    assert set(counts) == {"1", "2"}
    assert abs(counts["2"] / 2000 - 0.20) < 0.03, counts


def test_sticky_users_keep_their_version_and_the_split_holds_over_users(
    policy_router: tuple[pb_grpc.RouterServiceStub, Path],
) -> None:
    stub, _ = policy_router
    first = {f"user-{i}": _version(stub, **{"x-user-id": f"user-{i}"}) for i in range(1500)}
    again = {u: _version(stub, **{"x-user-id": u}) for u in list(first)[:200]}
    assert all(first[u] == v for u, v in again.items())
    share = sum(v == "2" for v in first.values()) / len(first)
    assert abs(share - 0.20) < 0.04, share


def test_header_rule_and_pin_header(policy_router: tuple[pb_grpc.RouterServiceStub, Path]) -> None:
    stub, _ = policy_router
    assert {_version(stub, **{"x-canary": "1"}) for _ in range(50)} == {"2"}
    assert {_version(stub, **{"x-model-version": "1"}) for _ in range(50)} == {"1"}


def test_route_tables_carry_the_version_policy(
    policy_router: tuple[pb_grpc.RouterServiceStub, Path],
) -> None:
    stub, _ = policy_router
    models = {m.model_name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
    policy = models["codegen"].route_table.version_policy
    assert {(w.version, w.weight) for w in policy.splits} == {("1", 80.0), ("2", 20.0)}
    assert policy.sticky_header == "x-user-id"
    assert [(r.header, r.value, r.version) for r in policy.header_rules] == [("x-canary", "1", "2")]
    assert not models["codegen_stream"].route_table.HasField("version_policy")


def test_bad_file_is_refused_and_the_old_policy_keeps_routing(
    policy_router: tuple[pb_grpc.RouterServiceStub, Path],
) -> None:
    stub, path = policy_router
    before = stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
    assert before.source == str(path) and "x-canary" in before.policy_yaml
    path.write_text(CANARY.replace('"2": 20', '"2": -5'))
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "models.codegen.versions.split" in (info.value.details() or "")
        time.sleep(0.6)  # the watcher sees the bad file too, and must refuse it as well
        assert stub.GetPolicy(pb.GetPolicyRequest()).policy_version == before.policy_version
        assert {_version(stub, **{"x-canary": "1"}) for _ in range(20)} == {"2"}
    finally:
        path.write_text(CANARY)


def test_file_change_applies_quickly_and_reloads_under_load_lose_nothing(
    policy_router: tuple[pb_grpc.RouterServiceStub, Path],
) -> None:
    stub, path = policy_router
    failures: list[BaseException] = []
    stop = time.monotonic() + 4.0

    def steady_picks() -> int:
        n = 0
        while time.monotonic() < stop:
            try:
                _version(stub)
                n += 1
            except grpc.RpcError as exc:
                failures.append(exc)
        return n

    with ThreadPoolExecutor(4) as pool:
        picks = [pool.submit(steady_picks) for _ in range(4)]
        for text in (ALL_ON_TWO, CANARY, ALL_ON_TWO):
            time.sleep(0.6)
            path.write_text(text)
            written = time.monotonic()
            want_only_two = text == ALL_ON_TWO
            while True:
                seen = {_version(stub) for _ in range(30)}
                if (seen == {"2"}) == want_only_two:
                    break
                assert time.monotonic() - written < 5, "policy change never applied"
            print(f"policy change applied after {time.monotonic() - written:.3f}s")
        total = sum(f.result() for f in picks)
    path.write_text(CANARY)
    assert not failures, failures[:3]
    assert total > 100


@pytest.fixture(scope="module")
def policy_sidecar(
    policy_router: tuple[pb_grpc.RouterServiceStub, Path],
) -> Iterator[str]:
    """A sidecar following the policy router: it applies the version rules itself."""
    stub, _ = policy_router
    address = f"127.0.0.1:{free_port()}"
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "app", "sidecar", "--listen", address,
         "--router", stub.address],  # type: ignore[attr-defined]
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_ready(address, ["codegen"], 30, server_ready=True)
        yield address
    finally:
        sidecar.terminate()
        sidecar.wait(30)


def _texts_by_version(fleet: Fleet, prompt: str) -> dict[bytes, str]:
    direct = next(s.grpc_address for s in fleet.tritons if "codegen" in s.load_models)
    with grpcclient.InferenceServerClient(direct) as client:
        return {
            bytes(
                client.infer("codegen", codegen_inputs(prompt, 6), model_version=v)
                .as_numpy("TEXT")
                .reshape(-1)[0]
            ): v
            for v in ("1", "2")
        }


def _served_version(address: str, prompt: str, by_text: dict[bytes, str], **headers: str) -> str:
    with grpcclient.InferenceServerClient(address) as client:
        result = client.infer("codegen", codegen_inputs(prompt, 6), headers=headers)
    return by_text[bytes(result.as_numpy("TEXT").reshape(-1)[0])]


def test_the_sidecar_applies_the_policy_to_unpinned_requests(
    fleet: Fleet, policy_sidecar: str
) -> None:
    prompt = "def canary():"
    by_text = _texts_by_version(fleet, prompt)
    assert len(by_text) == 2, "versions 1 and 2 must answer differently"
    assert {
        _served_version(policy_sidecar, prompt, by_text, **{"x-canary": "1"}) for _ in range(10)
    } == {"2"}
    assert {
        _served_version(policy_sidecar, prompt, by_text, **{"x-model-version": "1"})
        for _ in range(10)
    } == {"1"}
    for user in ("alice", "bob", "carol"):
        seen = {
            _served_version(policy_sidecar, prompt, by_text, **{"x-user-id": user})
            for _ in range(8)
        }
        assert len(seen) == 1, (user, seen)
    with ThreadPoolExecutor(8) as pool:
        served = list(
            pool.map(lambda _: _served_version(policy_sidecar, prompt, by_text), range(400))
        )
    share = served.count("2") / len(served)
    assert abs(share - 0.20) < 0.07, share
