"""How much batching buys the codegen model: decode-step cost by batch size, and end to end.

    python bench/batching.py                 # in-process decode steps only (numpy, no Triton)
    python bench/batching.py --triton        # also codegen through a real Triton, dynamic
                                             # batching on vs. off (a config override)

The in-process part runs the model's own Decoder (triton_models/codegen/1/model.py) with one
BLAS thread, as the fleet runs it. The end-to-end part starts one Triton with `codegen`,
drives it with closed-loop clients, then reloads `codegen` with the same config minus
`dynamic_batching` (an override replaces the whole config) and drives it again.
"""

from __future__ import annotations

import os

# Before numpy loads: one BLAS thread, as the fleet's launcher sets for every Triton.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPO = ROOT / "triton_models"
CONFIG = REPO / "codegen" / "config.pbtxt"


def load_model_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_codegen_model", REPO / "codegen/1/model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def config_parameter(key: str) -> str:
    text = CONFIG.read_text()
    match = re.search(rf'key:\s*"{re.escape(key)}"\s*value:\s*{{\s*string_value:\s*"([^"]*)"', text)
    if not match:
        raise SystemExit(f"{CONFIG} has no parameter {key!r}")
    return match.group(1)


def bench_steps(hidden: int, batches: list[int], steps: int, repeats: int) -> dict[int, float]:
    model = load_model_module()
    decoder = model.Decoder(hidden, 256, int(config_parameter("seed")), 1)
    per_step: dict[int, float] = {}
    for b in batches:
        h = np.stack([decoder.start(f"prompt {i}".encode()) for i in range(b)])
        prev = np.full(b, decoder.bos)
        for _ in range(3):  # warm up
            h, prev = decoder.step(h, prev, np.zeros(b, dtype=np.intp))
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for s in range(steps):
                h, prev = decoder.step(h, prev, np.full(b, s))
            best = min(best, (time.perf_counter() - started) / steps)
        per_step[b] = best
    return per_step


def print_steps(hidden: int, per_step: dict[int, float], tokens: int) -> None:
    weights_mib = hidden * hidden * 4 / 2**20
    print(f"\nDecode step, in-process, D={hidden} (W is {weights_mib:.0f} MiB float32), 1 thread")
    print(f"{'batch':>5} {'ms/step':>8} {'x batch 1':>9} {'tokens/s':>9} {'speedup':>8}"
          f" {'ms/request*':>11}")  # fmt: skip
    base = per_step[min(per_step)]
    for b, t in per_step.items():
        print(
            f"{b:>5} {t * 1e3:>8.2f} {t / base:>9.2f} {b / t:>9.0f} {b * base / t:>8.2f}"
            f" {t * tokens * 1e3:>11.1f}"
        )
    print(f"* {tokens} tokens (the config's default), all requests of a batch finishing together")


def _inputs(prompt: str) -> list[Any]:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    return [tensor]


def drive(address: str, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    """Closed loop: `concurrency` clients, each sends its next request when one returns."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def user(u: int) -> None:
        client = grpcclient.InferenceServerClient(address)
        n = 0
        try:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    client.infer("codegen", _inputs(f"def user_{u}_{n}(x):"), model_version="1")
                except Exception:
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                n += 1
        finally:
            client.close()

    threads = [threading.Thread(target=user, args=(u,)) for u in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors[0], latencies


def batch_counters(metrics_url: str) -> tuple[float, float]:
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        m = re.search(rf'^{name}{{model="codegen",version="1"}} (\S+)$', text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    return value("nv_inference_count"), value("nv_inference_exec_count")


def bench_triton(concurrency: list[int], seconds: float) -> None:
    import tritonclient.grpc as grpcclient

    sys.path.insert(0, str(ROOT))
    from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready

    log = Path(tempfile.mkdtemp(prefix="pointsman-bench-")) / "triton.log"
    spec = TritonSpec.on_free_ports(
        "bench-batching", model_repository=REPO, load_models=("codegen",), log_path=log
    )
    proc = triton_process(spec, prepare_installation())
    proc.start()
    rows = []
    try:
        wait_until_ready(spec.grpc_address, ["codegen"], timeout_s=60, process=proc)
        client = grpcclient.InferenceServerClient(spec.grpc_address)
        config = client.get_model_config("codegen", as_json=True)["config"]
        unbatched = {k: v for k, v in config.items() if k != "dynamic_batching"}
        for mode in ("on", "off"):
            if mode == "off":
                client.load_model("codegen", config=json.dumps(unbatched))
                wait_until_ready(spec.grpc_address, ["codegen"], timeout_s=60, process=proc)
            drive(spec.grpc_address, 4, 1.0)  # warm up
            for c in concurrency:
                count0, exec0 = batch_counters(spec.metrics_url)
                errors, lat = drive(spec.grpc_address, c, seconds)
                time.sleep(0.4)  # let the counters reach /metrics
                count, execs = batch_counters(spec.metrics_url)
                avg_batch = (count - count0) / max(1.0, execs - exec0)
                rows.append((mode, c, len(lat) / seconds, lat, avg_batch, errors))
        client.close()
        print(f"Triton log: {log}")
    finally:
        proc.send_stop()
        if proc.wait(15) is None:
            proc.kill()
        proc.close()

    print(f"\ncodegen v1 through Triton, closed loop, {seconds:.0f} s per row"
          " (clients share the 2 CPUs with the server)")  # fmt: skip
    print(f"{'batching':>8} {'clients':>7} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7}"
          f" {'avg batch':>9} {'errors':>6}")  # fmt: skip
    for mode, c, rps, lat, avg_batch, errors in rows:
        p50 = statistics.median(lat) * 1e3 if lat else float("nan")
        p90 = float(np.percentile(lat, 90)) * 1e3 if lat else float("nan")
        print(f"{mode:>8} {c:>7} {rps:>7.1f} {p50:>7.1f} {p90:>7.1f} {avg_batch:>9.2f} {errors:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=int(config_parameter("hidden_size")))
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--triton", action="store_true", help="also measure through Triton")
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    per_step = bench_steps(args.hidden_size, batches, args.steps, args.repeats)
    print_steps(args.hidden_size, per_step, int(config_parameter("tokens")))
    if args.triton:
        bench_triton([int(c) for c in args.concurrency.split(",")], args.seconds)


if __name__ == "__main__":
    main()
