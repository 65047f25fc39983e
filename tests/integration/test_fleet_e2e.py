"""The routed inference path end to end: stock Triton clients -> sidecar -> router's routes
-> real Triton servers, all separate processes started by `app.fleet`."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from app.fleet import Fleet
from bench.calls import codegen_inputs
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from router.datalayer.triton_metrics import TritonMetrics, parse_triton_metrics

pytestmark = pytest.mark.triton


def _metrics(fleet: Fleet) -> dict[str, TritonMetrics]:
    out = {}
    for spec in fleet.tritons:
        with urllib.request.urlopen(spec.metrics_url, timeout=5) as response:
            out[spec.instance_id] = parse_triton_metrics(response.read().decode())
    return out


def _served(
    before: dict[str, TritonMetrics], after: dict[str, TritonMetrics], model: str
) -> dict[str, float]:
    return {
        i: after[i].success_by_model.get(model, 0.0) - before[i].success_by_model.get(model, 0.0)
        for i in after
    }


def _holders(fleet: Fleet, model: str) -> set[str]:
    return {s.instance_id for s in fleet.tritons if model in s.load_models}


def _text(result: grpcclient.InferResult) -> bytes:
    return bytes(result.as_numpy("TEXT").reshape(-1)[0])


def test_default_placement_lets_affinity_show(fleet: Fleet) -> None:
    holders = {m: _holders(fleet, m) for m in ("codegen", "codegen_stream")}
    assert all(len(h) >= 2 for h in holders.values())
    assert any(len(s.load_models) < 2 for s in fleet.tritons)


def test_sync_unary_matches_direct(fleet: Fleet) -> None:
    direct_addr = next(s.grpc_address for s in fleet.tritons if "codegen" in s.load_models)
    with (
        grpcclient.InferenceServerClient(fleet.sidecar_address) as via,
        grpcclient.InferenceServerClient(direct_addr) as direct,
    ):
        for version in ("", "1", "2"):
            a = via.infer("codegen", codegen_inputs("def add(a, b):", 8), model_version=version)
            b = direct.infer("codegen", codegen_inputs("def add(a, b):", 8), model_version=version)
            assert _text(a) == _text(b)
            np.testing.assert_array_equal(a.as_numpy("TOKEN_IDS"), b.as_numpy("TOKEN_IDS"))


def test_aio_unary_matches_direct(fleet: Fleet) -> None:
    direct_addr = next(s.grpc_address for s in fleet.tritons if "codegen" in s.load_models)

    async def both() -> tuple[bytes, bytes]:
        via = grpcclient_aio.InferenceServerClient(fleet.sidecar_address)
        direct = grpcclient_aio.InferenceServerClient(direct_addr)
        try:
            a = await via.infer("codegen", codegen_inputs("class Stack:", 6))
            b = await direct.infer("codegen", codegen_inputs("class Stack:", 6))
            return _text(a), _text(b)
        finally:
            await via.close()
            await direct.close()

    a, b = asyncio.run(both())
    assert a == b and a


def _stream_tokens(address: str, prompt: str, n: int) -> list[int]:
    results: list[object] = []
    done = __import__("threading").Event()

    def callback(result: grpcclient.InferResult | None, error: Exception | None) -> None:
        results.append(error if error is not None else result)
        if error is not None or len(results) >= n:
            done.set()

    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=callback)
        client.async_stream_infer("codegen_stream", codegen_inputs(prompt, n))
        assert done.wait(30), "stream did not finish"
        client.stop_stream()
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    return [int(r.as_numpy("TOKEN_ID").reshape(-1)[0]) for r in results]  # type: ignore[union-attr]


def test_streaming_matches_direct(fleet: Fleet) -> None:
    direct_addr = next(s.grpc_address for s in fleet.tritons if "codegen_stream" in s.load_models)
    via = _stream_tokens(fleet.sidecar_address, "def main():", 5)
    direct = _stream_tokens(direct_addr, "def main():", 5)
    assert via == direct and len(via) == 5


def test_requests_reach_only_instances_that_hold_the_model(fleet: Fleet) -> None:
    before = _metrics(fleet)
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        for i in range(30):
            client.infer("codegen", codegen_inputs(f"def f{i}():", 2))
    served = _served(before, _metrics(fleet), "codegen")
    holders = _holders(fleet, "codegen")
    assert sum(served.values()) == 30
    assert all(served[i] == 0 for i in served if i not in holders), served


def test_load_spreads_over_equal_instances(fleet: Fleet) -> None:
    before = _metrics(fleet)

    def one(i: int) -> None:
        with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
            for j in range(6):
                client.infer("codegen", codegen_inputs(f"x = {i * 100 + j}", 16))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8)))
    served = _served(before, _metrics(fleet), "codegen")
    shares = [served[i] / 48 for i in _holders(fleet, "codegen")]
    assert sum(served.values()) == 48
    assert min(shares) >= 0.2, served


def _router(fleet: Fleet) -> pb_grpc.RouterServiceStub:
    return pb_grpc.RouterServiceStub(grpc.insecure_channel(fleet.router_address))


def test_router_views_of_the_fleet(fleet: Fleet) -> None:
    router = _router(fleet)
    instances = router.ListInstances(pb.ListInstancesRequest(), timeout=5).instances
    assert {i.instance_id for i in instances} == {s.instance_id for s in fleet.tritons}
    assert all(i.healthy and i.data_age_ms < 1000 for i in instances)
    with_codegen = [i for i in instances if any(m.model_name == "codegen" for m in i.models)]
    assert all(i.memory_used_bytes > 0 for i in with_codegen)  # declared footprints
    assert all(i.memory_source == pb.MEMORY_SOURCE_DECLARED for i in instances)
    models = {m.model_name: m for m in router.ListModels(pb.ListModelsRequest(), timeout=5).models}
    assert set(models["codegen"].ready_instances) == _holders(fleet, "codegen")
    assert set(models["codegen"].ready_versions) == {"1", "2"}
    assert {c.target.instance_id for c in models["codegen"].route_table.candidates} == _holders(
        fleet, "codegen"
    )
    assert "echo" in models and not models["echo"].ready_instances  # in the repository only


def test_pick_target_answers_and_refuses(fleet: Fleet) -> None:
    router = _router(fleet)
    picked = router.PickTarget(pb.PickTargetRequest(model_name="codegen"), timeout=5)
    holders = _holders(fleet, "codegen")
    assert picked.target.instance_id in holders
    assert {f.instance_id for f in picked.fallbacks} | {picked.target.instance_id} == holders
    pinned = router.PickTarget(pb.PickTargetRequest(model_name="codegen", model_version="2"))
    assert "2" in pinned.target.ready_versions
    with pytest.raises(grpc.RpcError) as unknown:
        router.PickTarget(pb.PickTargetRequest(model_name="no_such_model"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as unloaded:
        router.PickTarget(pb.PickTargetRequest(model_name="echo"), timeout=5)
    assert unloaded.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "echo" in (unloaded.value.details() or "")


@pytest.mark.parametrize(
    ("model", "code", "needle"),
    [
        ("no_such_model", grpc.StatusCode.NOT_FOUND, "no_such_model"),
        ("echo", grpc.StatusCode.UNAVAILABLE, "echo"),  # in the repository, loaded nowhere
    ],
)
def test_bad_model_statuses_through_the_sidecar(
    fleet: Fleet, model: str, code: grpc.StatusCode, needle: str
) -> None:
    with grpcclient.InferenceServerClient(fleet.sidecar_address) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, codegen_inputs("x", 1))
        assert info.value.status() == str(code)
        assert needle in info.value.message()
        assert client.is_server_live()


def test_malformed_bytes_are_invalid_argument(fleet: Fleet) -> None:
    with grpc.insecure_channel(fleet.sidecar_address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\x0a\xff\xff\xff\xff\xff", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_route_changes_reach_the_sidecar(fleet: Fleet) -> None:
    """Load echo on one instance behind the router's back: the sidecar routes to it soon
    after; unload it: the sidecar answers UNAVAILABLE again."""
    target = fleet.tritons[2]
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    with (
        grpcclient.InferenceServerClient(target.grpc_address) as direct,
        grpc.insecure_channel(fleet.sidecar_address) as channel,
    ):
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        direct.load_model("echo")
        try:
            loaded_at = time.monotonic()
            while True:
                try:
                    response = infer(request, timeout=5)
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    assert time.monotonic() - loaded_at < 5, "route to echo never arrived"
                    time.sleep(0.02)
            print(f"route to a newly loaded model after {time.monotonic() - loaded_at:.3f}s")
            assert response.model_name == "echo"
        finally:
            direct.unload_model("echo")
        unloaded_at = time.monotonic()
        while time.monotonic() - unloaded_at < 5:
            try:
                infer(request, timeout=5)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and "echo" in (exc.details() or ""):
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the sidecar kept routing to an unloaded model")
