"""How fast a change in the fleet reaches the sidecar's routes. Prints figures; not a test.

Starts a local fleet (3 Tritons, router, sidecar as separate processes), then repeatedly loads
and unloads `echo` on one instance directly through Triton's API, behind the router's back, and
times from the moment Triton's call returns until the sidecar routes accordingly: the first
successful echo request after a load, the first UNAVAILABLE after an unload. That covers the
router's repository poll, route rebuild, the WatchRoutes push and the sidecar's update.

    .venv/bin/python bench/route_propagation.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import grpc
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

from app.fleet import Fleet, FleetConfig


def _echo_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    return request


def _until(infer: grpc.UnaryUnaryMultiCallable, want_ok: bool, limit_s: float = 10.0) -> float:
    started = time.perf_counter()
    request = _echo_request()
    while time.perf_counter() - started < limit_s:
        try:
            infer(request, timeout=2)
            if want_ok:
                return time.perf_counter() - started
        except grpc.RpcError as exc:
            if not want_ok and exc.code() == grpc.StatusCode.UNAVAILABLE:
                return time.perf_counter() - started
        time.sleep(0.002)
    raise TimeoutError("the sidecar's routes never changed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    fleet = Fleet(FleetConfig(instances=3, sidecar_port=0, router_port=0))
    fleet.start()
    try:
        target = fleet.tritons[2]
        load_ms: list[float] = []
        unload_ms: list[float] = []
        with (
            grpcclient.InferenceServerClient(target.grpc_address) as direct,
            grpc.insecure_channel(fleet.sidecar_address) as channel,
        ):
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            for _ in range(args.rounds):
                direct.load_model("echo")
                load_ms.append(_until(infer, want_ok=True) * 1000)
                direct.unload_model("echo")
                unload_ms.append(_until(infer, want_ok=False) * 1000)
                time.sleep(1.5)  # let Triton finish UNLOADING before the next load
    finally:
        fleet.stop()
    print(f"route propagation over {args.rounds} rounds (target: within 250 ms)")
    print(f"{'change':<22}{'p50 ms':>10}{'max ms':>10}")
    for label, values in (("model loaded", load_ms), ("model unloaded", unload_ms)):
        print(f"{label:<22}{statistics.median(values):>10.1f}{max(values):>10.1f}")


if __name__ == "__main__":
    main()
