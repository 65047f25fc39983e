"""A stock gRPC client in its own process, for tests of proxyless routing.

gRPC reads $GRPC_XDS_BOOTSTRAP when it creates its first xDS channel and keeps that client
for the life of the process, so each test runs this module in a fresh subprocess:

    GRPC_XDS_BOOTSTRAP=bootstrap.json python -m tests.support.proxyless_client \
        xds:///echo --mode triton --model echo --seconds 3

It sends one request at a time (stock `tritonclient.grpc.InferenceServerClient`, or
grpc.health.v1 Check with `--mode health`) and prints one JSON line per request:
{"t": monotonic seconds at the answer, "code": "OK" or the gRPC status name, "ms": latency}.
`--ready-file` is written after the first successful request, so a test can act mid-run;
`--xds-creds` gives the channel xDS credentials (TLS to the instances as the Cluster says).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.experimental
import numpy as np


def spawn(bootstrap: Path, target: str, *args: str) -> subprocess.Popen[str]:
    """This module in a subprocess with GRPC_XDS_BOOTSTRAP=`bootstrap`; read it with `records`."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.proxyless_client", target, *args],
        env=dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap), GRPC_VERBOSITY="ERROR"),
        stdout=subprocess.PIPE,
        text=True,
    )


def records(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    """Every request's record, once the client is done."""
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    """Until the client wrote its --ready-file."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, "the proxyless client never got a first answer"
        time.sleep(0.01)


def _health_call(target: str, creds: grpc.ChannelCredentials | None) -> Callable[[], None]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=20)


def _triton_call(
    target: str, model: str, creds: grpc.ChannelCredentials | None
) -> Callable[[], None]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(target, creds=creds)
    tensor = grpcclient.InferInput("INPUT0", [4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))
    return lambda: client.infer(model, [tensor], client_timeout=20)


def _code(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return error.code().name  # type: ignore[no-any-return]
    status = getattr(error, "status", None)  # tritonclient's InferenceServerException
    text = status() if callable(status) else None
    return str(text).removeprefix("StatusCode.") if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("--mode", choices=("triton", "health"), default="triton")
    parser.add_argument("--model", default="echo")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--count", type=int, default=0, help="stop after this many requests")
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument(
        "--xds-creds", action="store_true", help="xDS credentials: TLS as the Cluster says"
    )
    args = parser.parse_args(argv)
    creds = (
        grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
        if args.xds_creds
        else None
    )
    if args.mode == "health":
        call = _health_call(args.target, creds)
    else:
        call = _triton_call(args.target, args.model, creds)
    ready = args.ready_file
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < args.seconds and (not args.count or sent < args.count):
        began = time.monotonic()
        record: dict[str, object] = {}
        try:
            call()
            code = "OK"
        except Exception as error:  # recorded, never raised: the test judges
            code = _code(error)
            record["detail"] = str(error)[:300]
        now = time.monotonic()
        sent += 1
        record |= {"t": now, "code": code, "ms": (now - began) * 1000}
        print(json.dumps(record), flush=True)
        if ready is not None and code == "OK":
            ready.write_text("ready")
            ready = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
