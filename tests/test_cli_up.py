"""`pointsman up` as a user runs it: a ready file, traffic, a reported child death, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from pointsman.workload import codegen_inputs


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def test_up_serves_reports_deaths_and_stops_everything(tmp_path: Path) -> None:
    ready_file = tmp_path / "ready.json"
    up = subprocess.Popen(
        [
            sys.executable, "-m", "pointsman", "up",
            "--instances", "2",
            "--placement", "0=codegen;1=codegen,codegen_stream",
            "--sidecar-port", "0", "--router-port", "0",
            "--run-dir", str(tmp_path / "run"),
            "--ready-file", str(ready_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready_file.exists():
            assert up.poll() is None, up.communicate()
            assert time.monotonic() < deadline, "fleet never became ready"
            time.sleep(0.2)
        ready = json.loads(ready_file.read_text())
        assert set(ready) >= {"sidecar", "router", "tritons"}
        assert len(ready["tritons"]) == 2
        assert all(t["metrics_url"].startswith("http://127.0.0.1:") for t in ready["tritons"])
        addresses = [ready["sidecar"], ready["router"], *(t["grpc"] for t in ready["tritons"])]
        assert all(a.startswith("127.0.0.1:") for a in addresses)

        with grpcclient.InferenceServerClient(ready["sidecar"]) as client:
            result = client.infer("codegen", codegen_inputs("def up():", 4))
            assert result.as_numpy("TOKEN_IDS").size == 4

        # A Triton that dies is reported, and the rest keep running.
        victim = ready["tritons"][0]["grpc"]
        pid = int(
            subprocess.run(
                ["pgrep", "-f", "--", f"--grpc-port={victim.rsplit(':', 1)[1]}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)
        assert up.poll() is None
        assert _port_open(ready["sidecar"])
    finally:
        up.send_signal(signal.SIGTERM)
        _out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    assert "triton-0" in err and "exited with code" in err
    for address in addresses:
        assert not _port_open(address), f"{address} still listening after SIGTERM"
    assert not ready_file.exists()
