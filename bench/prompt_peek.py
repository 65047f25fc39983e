"""What prefix-affinity keying costs on the request path: the prompt peek and its hash.

Not a test: it prints figures and writes them as JSON. The request is what tritonclient
sends for codegen: PROMPT (BYTES [1, 1], raw contents) of 1 MiB, MAX_TOKENS, one requested
output; a 1 KiB prompt for contrast. Each operation runs in batches of `--number` calls,
`--repeats` times; the figures are the median, p10 and p90 of the per-call times over the
batches (microseconds). For scale: a full protobuf parse of the same bytes, and the sidecar's
existing model-name peek.

    .venv/bin/python bench/prompt_peek.py [--number 2000] [--repeats 25] [--out FILE]

The default output is bench/results/prompt_peek/results.json. Timings depend on the machine
and on what else runs on it: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from tritonclient.grpc import service_pb2 as triton_pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.calls import codegen_inputs, infer_request_bytes  # noqa: E402
from pointsman.prefix import PrefixBlocks  # noqa: E402
from sidecar.prompt import peek_prompt, prompt_prefix_chain, prompt_prefix_key  # noqa: E402
from sidecar.wire import peek_model  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "prompt_peek" / "results.json"


def codegen_request(prompt: bytes) -> bytes:
    """The bytes tritonclient sends for codegen with this prompt."""
    return infer_request_bytes("codegen", codegen_inputs(prompt.decode(), 16), ["TEXT"])


def per_call_us(operation: Callable[[], object], number: int, repeats: int) -> dict[str, float]:
    batches = timeit.repeat(operation, number=number, repeat=repeats)
    calls = sorted(b / number * 1e6 for b in batches)
    return {
        "median_us": round(statistics.median(calls), 3),
        "p10_us": round(calls[len(calls) // 10], 3),
        "p90_us": round(calls[(len(calls) * 9) // 10], 3),
        "min_us": round(calls[0], 3),
    }


def operations(data: bytes) -> dict[str, Callable[[], object]]:
    key16 = PrefixBlocks(block_bytes=64, max_blocks=16)
    key256 = PrefixBlocks(block_bytes=64, max_blocks=256)
    return {
        "peek_prompt (first 1 KiB)": lambda: peek_prompt(data, "PROMPT", 1024),
        "prompt_prefix_key, 16 x 64 B blocks": lambda: prompt_prefix_key(data, "PROMPT", key16),
        "prompt_prefix_key, 256 x 64 B blocks": lambda: prompt_prefix_key(data, "PROMPT", key256),
        "prompt_prefix_chain, 16 x 64 B blocks": lambda: prompt_prefix_chain(data, "PROMPT", key16),
        "for scale: wire.peek_model": lambda: peek_model(data),
        "for scale: protobuf parse": lambda: triton_pb.ModelInferRequest.FromString(data),
    }


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def machine() -> dict[str, object]:
    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "shared": "a development machine shared with other agents' builds and tests",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=25, help="timed batches per operation")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    context = b"# repository context\nimport os\n" * 40_000
    requests = {
        "1 MiB prompt": codegen_request(context[: 1 << 20]),
        "1 KiB prompt": codegen_request(context[:1024]),
    }
    load_before = os.getloadavg()
    started = time.time()
    results = []
    print(f"{'request':>14}  {'operation':<40} {'median us':>10} {'p10':>8} {'p90':>8}")
    for request_name, data in requests.items():
        for name, operation in operations(data).items():
            figures = per_call_us(operation, args.number, args.repeats)
            row = {"request": request_name, "bytes": len(data), "operation": name}
            results.append({**row, **figures})
            print(
                f"{request_name:>14}  {name:<40} {figures['median_us']:>10.2f} "
                f"{figures['p10_us']:>8.2f} {figures['p90_us']:>8.2f}"
            )
    report = {
        "command": "python bench/prompt_peek.py " + " ".join(argv or sys.argv[1:]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {"number": args.number, "repeats": args.repeats},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
