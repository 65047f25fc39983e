"""The cold path on real Tritons: a request for a model loaded nowhere makes the router load
it on the best instance while the sidecar waits, instead of failing; the cold start is
counted, the decision is visible in ListModels, and the next request is warm."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from app.fleet import Fleet, FleetConfig
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from tests.support.fleet_metrics import sidecar_cold_starts

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def cold_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run_dir: Path = tmp_path_factory.mktemp("cold-fleet")
    fleet = Fleet(
        FleetConfig(
            instances=2,
            placement={"triton-0": ("codegen",), "triton-1": ()},
            sidecar_port=0,
            router_port=0,
            run_dir=run_dir,
        )
    )
    with fleet:
        yield fleet


def _echo(client: grpcclient.InferenceServerClient) -> np.ndarray:
    tensor = grpcclient.InferInput("INPUT0", [3], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    return client.infer("echo", [tensor], client_timeout=60).as_numpy("OUTPUT0")


def test_a_model_loaded_nowhere_is_loaded_while_the_request_waits(cold_fleet: Fleet) -> None:
    with grpcclient.InferenceServerClient(cold_fleet.sidecar_address) as client:
        assert not client.is_model_ready("echo")
        started = time.monotonic()
        np.testing.assert_array_equal(_echo(client), [1.0, 2.0, 3.0])
        cold_s = time.monotonic() - started
        print(f"cold request answered after {cold_s:.2f}s (includes the model's load)")
        assert sidecar_cold_starts(cold_fleet, "echo") == 1
        started = time.monotonic()
        _echo(client)
        assert sidecar_cold_starts(cold_fleet, "echo") == 1, "the second request must be warm"

    router = pb_grpc.RouterServiceStub(grpc.insecure_channel(cold_fleet.router_address))
    models = {m.model_name: m for m in router.ListModels(pb.ListModelsRequest(), timeout=5).models}
    echo = models["echo"]
    assert echo.copies == 1 and len(echo.ready_instances) == 1
    assert echo.last_decision.action == "load"
    assert echo.last_decision.instance_id == echo.ready_instances[0]
    assert echo.last_decision.reason
