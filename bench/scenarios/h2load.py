"""The C tools of the overhead scenario: h2load (load) and nghttpx (a compiled HTTP/2 proxy).

Both come from Debian (`apt-get install -y nghttp2-proxy nghttp2-client`). h2load posts a
length-prefixed gRPC body over HTTP/2 and logs each request; it cannot read gRPC trailers (a
gRPC error still answers HTTP 200), so `h2load_run` checks that Triton's success counter grew
by at least the number of answers h2load counted, and fails the run otherwise.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

from app.processes import ManagedProcess, ProcessSpec, free_port
from bench.calls import INFER_METHOD
from bench.loadgen import CallRecord
from bench.stats import LoadSummary, summarize

__all__ = [
    "INSTALL_HINT",
    "grpc_frame",
    "h2load_command",
    "h2load_run",
    "nghttpx_command",
    "nghttpx_process",
    "parse_h2load_log",
    "triton_successes",
]

INSTALL_HINT = "apt-get install -y nghttp2-proxy nghttp2-client"


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: no compression flag, 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def nghttpx_command(port: int, upstream: str, log_dir: Path) -> list[str]:
    """nghttpx as a plaintext HTTP/2 (h2c) proxy to one gRPC upstream; one worker."""
    host, _, upstream_port = upstream.rpartition(":")
    return [
        "nghttpx",
        "--conf=/dev/null",
        f"--frontend=127.0.0.1,{port};no-tls",
        f"--backend={host},{upstream_port};;proto=h2",
        "--workers=1",
        "--no-ocsp",
        "--no-via",
        "--no-server-push",
        f"--errorlog-file={log_dir / 'nghttpx-error.log'}",
        "--accesslog-file=/dev/null",
        f"--pid-file={log_dir / 'nghttpx.pid'}",
    ]


def nghttpx_process(
    upstream: str, log_dir: Path, notes: list[str]
) -> tuple[ManagedProcess, str] | None:
    """nghttpx in front of `upstream` on a free port (not started yet) and its address; None,
    with a note saying so, where nghttpx is not installed."""
    if not shutil.which("nghttpx"):
        notes.append(f"nghttpx not found: its column is skipped ({INSTALL_HINT})")
        return None
    port = free_port()
    argv = nghttpx_command(port, upstream, log_dir)
    process = ManagedProcess(ProcessSpec("nghttpx", argv, log_path=log_dir / "nghttpx.log"))
    return process, f"127.0.0.1:{port}"


def _milliseconds(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def h2load_command(
    address: str,
    body_file: Path,
    duration_s: float,
    concurrency: int,
    log_file: Path,
    warmup_s: float = 1.0,
) -> list[str]:
    """h2load with one connection and `concurrency` streams, posting gRPC frames; every
    request's latency goes to `log_file` (start us, HTTP status, duration us; tab-separated).
    Durations go to the millisecond."""
    return [
        "h2load",
        f"--duration={_milliseconds(duration_s)}",
        f"--warm-up-time={_milliseconds(warmup_s)}",
        "--clients=1",
        f"--max-concurrent-streams={concurrency}",
        "--threads=1",
        f"--data={body_file}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"--log-file={log_file}",
        f"http://{address}{INFER_METHOD}",
    ]


def parse_h2load_log(text: str, duration_s: float) -> LoadSummary:
    """h2load's per-request log as a LoadSummary: HTTP 200 is OK, anything else HTTP_<code>."""
    records = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        status = "OK" if fields[1] == "200" else f"HTTP_{fields[1]}"
        records.append(CallRecord("", 0.0, int(fields[2]) / 1e6, status))
    return summarize(records, duration_s)


def triton_successes(metrics_url: str, model: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = rf'^nv_inference_request_success\{{[^}}]*model="{model}"[^}}]*\}} (\S+)'
    return int(sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M)))


def h2load_run(
    address: str,
    body: bytes,
    duration_s: float,
    concurrency: int,
    *,
    metrics_url: str,
    model: str,
    tmp: Path,
    warmup_s: float = 1.0,
) -> LoadSummary:
    """One h2load run against `address`, its answers checked against Triton's counter."""
    body_file = tmp / "body.bin"
    body_file.write_bytes(grpc_frame(body))
    log_file = tmp / "h2load.log"
    log_file.unlink(missing_ok=True)
    before = triton_successes(metrics_url, model)
    done = subprocess.run(
        h2load_command(address, body_file, duration_s, concurrency, log_file, warmup_s),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
    summary = parse_h2load_log(log_file.read_text(), duration_s)
    time.sleep(0.6)  # Triton refreshes its metrics every 250 ms here
    served = triton_successes(metrics_url, model) - before
    if served < summary.ok:  # h2load's warm-up requests are served too, hence "<"
        raise RuntimeError(
            f"{address}: h2load counted {summary.ok} answers but Triton served {served}: "
            "some answers were gRPC errors"
        )
    return summary
