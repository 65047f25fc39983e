"""What the sidecar costs: latency at concurrency 1 and throughput at concurrency 64.

Not a test: it prints figures. One real Triton serves `echo` (identity, FP32[16]); the sidecar
runs as its own process (`python -m sidecar`) with a static route to it, as it would in a pod.

    .venv/bin/python bench/sidecar_overhead.py [--requests 3000] [--duration 10]

(1) Latency, concurrency 1: a Python sync grpc client making raw-bytes ModelInfer calls, the
    same client and bytes for both paths, in alternating blocks so drift hits both alike.
(2) Throughput, concurrency 64: h2load (nghttp2-client) over one HTTP/2 connection with 64
    concurrent streams, posting a gRPC-framed request body, if h2load is installed; otherwise
    64 concurrent calls from a grpc.aio client. Direct and sidecar runs alternate.
Every answer is checked: h2load cannot read gRPC trailers, so Triton's success counter must
grow by the number of requests h2load completed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all  # noqa: E402
from app.triton import (  # noqa: E402
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)

METHOD = "/inference.GRPCInferenceService/ModelInfer"
TARGET_ADDED_P50_MS = 0.35
TARGET_ADDED_P99_MS = 0.7
TARGET_THROUGHPUT_RATIO = 0.25

# The floor for comparison: the least a grpc.aio proxy can do (one fixed upstream, no peek,
# no routing, no metadata, no deadline), with uvloop and a registered raw-bytes handler.
MINIMAL_PROXY = """
import sys, grpc, uvloop
async def main(port, upstream):
    channel = grpc.aio.insecure_channel(upstream)
    call = channel.unary_unary(sys.argv[3], request_serializer=None,
                               response_deserializer=None, _registered_method=True)
    async def infer(request, context):
        return await call(request)
    server = grpc.aio.server()
    server.add_registered_method_handlers(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
uvloop.run(main(sys.argv[1], sys.argv[2]))
"""


def echo_request() -> bytes:
    tensor = grpcclient.InferInput("INPUT0", [16], "FP32")
    tensor.set_data_from_numpy(np.arange(16, dtype=np.float32))
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add().CopyFrom(tensor._get_tensor())
    request.raw_input_contents.append(tensor._get_content())
    request.outputs.add(name="OUTPUT0")
    data: bytes = request.SerializeToString()
    return data


def check_answer(response: bytes) -> None:
    answer = pb.ModelInferResponse.FromString(response)
    out = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)
    assert np.array_equal(out, np.arange(16, dtype=np.float32)), out


def latency_blocks(
    addresses: dict[str, str], body: bytes, requests: int, blocks: int
) -> dict[str, list[float]]:
    """Per-call seconds for each path, measured in alternating blocks."""
    channels = {name: grpc.insecure_channel(addr) for name, addr in addresses.items()}
    calls = {
        name: ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        for name, ch in channels.items()
    }
    for call in calls.values():  # warm-up: connections, Triton's first requests
        for _ in range(300):
            check_answer(call(body))
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_block = max(1, requests // blocks)
    clock = time.perf_counter
    for _ in range(blocks):
        for name, call in calls.items():
            bucket = times[name]
            for _ in range(per_block):
                start = clock()
                call(body)
                bucket.append(clock() - start)
    for ch in channels.values():
        ch.close()
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def triton_successes(metrics_url: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = 0.0
    for match in re.finditer(
        r'^nv_inference_request_success\{[^}]*model="echo"[^}]*\} (\S+)', text, re.M
    ):
        total += float(match.group(1))
    return int(total)


def h2load_run(address: str, body_file: Path, duration_s: float, concurrency: int) -> int:
    """Requests completed (HTTP 2xx) in `duration_s` with `concurrency` streams."""
    out = subprocess.run(
        [
            "h2load",
            f"--duration={duration_s:g}",
            "--warm-up-time=1",
            "-c",
            "1",
            "-m",
            str(concurrency),
            "-t",
            "1",
            f"--data={body_file}",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://{address}{METHOD}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"status codes: (\d+) 2xx", out)
    if not match:
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    return int(match.group(1))


async def _aio_run(address: str, body: bytes, duration_s: float, concurrency: int) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        done = 0
        stop_at = time.monotonic() + 1.0 + duration_s
        counting_from = time.monotonic() + 1.0  # warm-up second, as h2load's

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                await call(body)
                if time.monotonic() >= counting_from:
                    done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done


def throughput(
    addresses: dict[str, str],
    body: bytes,
    duration_s: float,
    rounds: int,
    concurrency: int,
    metrics_url: str,
) -> tuple[str, dict[str, list[float]]]:
    use_h2load = shutil.which("h2load") is not None
    rates: dict[str, list[float]] = {name: [] for name in addresses}
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        for _ in range(rounds):
            for name, address in addresses.items():
                before = triton_successes(metrics_url)
                if use_h2load:
                    done = h2load_run(address, body_file, duration_s, concurrency)
                else:
                    done = asyncio.run(_aio_run(address, body, duration_s, concurrency))
                time.sleep(1.0)  # Triton's metrics refresh every 250 ms
                served = triton_successes(metrics_url) - before
                # h2load counts answered requests and its warm-up ones are served too.
                if served < done:
                    raise RuntimeError(
                        f"{name}: h2load saw {done} answers but Triton served {served}: "
                        "some answers were gRPC errors"
                    )
                rates[name].append(done / duration_s)
    return ("h2load, 1 connection x 64 streams" if use_h2load else "grpc.aio, 64 tasks"), rates


def wait_for_proxy(address: str, process: ManagedProcess, timeout_s: float = 30.0) -> None:
    """Until a ModelInfer through `address` answers (the minimal proxy has no ModelReady)."""
    deadline = time.monotonic() + timeout_s
    body = echo_request()
    while True:
        if process.exited() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            with grpc.insecure_channel(address) as channel:
                call = channel.unary_unary(
                    METHOD, request_serializer=None, response_deserializer=None
                )
                check_answer(call(body, timeout=2))
                return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def sidecar_process(name: str, config: Path, workdir: Path, extra: Sequence[str]) -> ManagedProcess:
    argv = [sys.executable, "-m", "sidecar", "--config", str(config), "--log-level", "WARNING"]
    return ManagedProcess(
        ProcessSpec(
            name=name,
            argv=[*argv, *extra],
            cwd=REPO,
            env={"PYTHONPATH": str(REPO)},
            log_path=workdir / f"{name}.log",
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000, help="latency calls per path")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per path")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--pinned-cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="also measure a sidecar started with --cpus N (-1: skip); default the last CPU",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the minimal grpc.aio proxy measured for comparison",
    )
    args = parser.parse_args()

    installation = prepare_installation()
    workdir = Path(tempfile.mkdtemp(prefix="pointsman-bench-"))
    triton = TritonSpec.on_free_ports(
        "bench-triton", load_models=("echo",), log_path=workdir / "triton.log"
    )
    processes = [triton_process(triton, installation)]
    sidecars: dict[str, str] = {}
    variants: list[tuple[str, list[str]]] = [("sidecar", [])]
    if args.pinned_cpu >= 0:
        variants.append((f"sidecar --cpus {args.pinned_cpu}", ["--cpus", str(args.pinned_cpu)]))
    for k, (name, extra) in enumerate(variants):
        port = free_port()
        config = workdir / f"sidecar{k}.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{port}\nstatic_routes:\n  echo: [{triton.grpc_address}]\n"
        )
        processes.append(sidecar_process(f"sidecar{k}", config, workdir, extra))
        sidecars[name] = f"127.0.0.1:{port}"
    if not args.no_reference:
        port = free_port()
        processes.append(
            ManagedProcess(
                ProcessSpec(
                    name="minimal-proxy",
                    argv=[
                        sys.executable,
                        "-c",
                        MINIMAL_PROXY,
                        str(port),
                        triton.grpc_address,
                        METHOD,
                    ],
                    log_path=workdir / "minimal-proxy.log",
                )
            )
        )
        sidecars["minimal aio proxy"] = f"127.0.0.1:{port}"
    try:
        for proc in processes:
            proc.start()
        wait_until_ready(triton.grpc_address, ["echo"], 60, processes[0])
        for proc, address in zip(processes[1:], sidecars.values(), strict=True):
            wait_for_proxy(address, proc)
        addresses = {"direct": triton.grpc_address, **sidecars}
        body = echo_request()

        times = latency_blocks(addresses, body, args.requests, blocks=8)
        p50 = {k: percentile(v, 50) * 1e3 for k, v in times.items()}
        p99 = {k: percentile(v, 99) * 1e3 for k, v in times.items()}
        how, rates = throughput(
            addresses, body, args.duration, args.rounds, args.concurrency, triton.metrics_url
        )
        rate = {k: statistics.median(v) for k, v in rates.items()}
    finally:
        stop_all(processes[::-1])

    width = max(len(name) for name in addresses) + 2
    print(f"\nsidecar overhead: echo FP32[16], one Triton, {os.cpu_count()} CPUs, one machine")
    print(f"(1) latency at concurrency 1: {len(times['direct'])} raw-bytes calls per path")
    print(f"    {'':{width}} {'p50 ms':>8} {'p99 ms':>8} {'+p50':>8} {'+p99':>8}")
    for name in addresses:
        line = f"    {name:{width}} {p50[name]:8.3f} {p99[name]:8.3f}"
        if name != "direct":
            added50, added99 = p50[name] - p50["direct"], p99[name] - p99["direct"]
            met = added50 <= TARGET_ADDED_P50_MS and added99 <= TARGET_ADDED_P99_MS
            line += f" {added50:8.3f} {added99:8.3f}  {'MET' if met else 'MISSED'}"
        print(line)
    print(f"    target: adds <= {TARGET_ADDED_P50_MS} ms p50, <= {TARGET_ADDED_P99_MS} ms p99")
    print(
        f"(2) throughput at concurrency {args.concurrency} ({how}), "
        f"median of {args.rounds} x {args.duration:g}s"
    )
    for name in addresses:
        runs = ", ".join(f"{r:.0f}" for r in rates[name])
        line = f"    {name:{width}} {rate[name]:8.0f} req/s"
        if name != "direct":
            ratio = rate[name] / rate["direct"]
            met = ratio >= TARGET_THROUGHPUT_RATIO
            line += f"  {ratio:6.1%} of direct  {'MET' if met else 'MISSED'}"
        print(f"{line}   (runs: {runs})")
    print(f"    target: >= {TARGET_THROUGHPUT_RATIO:.0%} of direct")
    print(f"logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
