"""Two sidecars' agreement on prefix routing, by the load bound's epsilon: what the bound costs.

Not a test: it prints a table and writes raw JSON. The prefix scenario's own simulation
(`bench.scenarios.prefix.sidecar_agreement`: the sidecar's `prefix_routing.choose`, each sidecar
with its own in-flight counts, requests sent to the sidecars in turn) over the scenario's
workloads at 24 requests a second on 3 instances, for a range of epsilons and in-flight times.
Each sidecar bounds the load by what IT has in flight, so where one is at its bound and the
other is not, they disagree; a larger epsilon falls back less and agrees more, and bounds the
load less.

    .venv/bin/python -m bench.prefix_agreement --out bench/results/prefix/agreement_by_epsilon.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from dataclasses import replace
from pathlib import Path

from bench.prefix_workload import PrefixWorkload, schedule
from bench.scenarios.prefix import sidecar_agreement

EPSILONS = (0.25, 0.5, 1.0, 2.0)
LATENCIES_S = (0.3, 0.8)  # the prefix cells' mean latencies at 1x, roughly (short-busy run)


def sweep(rate_rps: float, duration_s: float, instances: int, seed: int) -> list[dict[str, object]]:
    workloads = {
        "zipf": PrefixWorkload(),
        "hot-repository": replace(PrefixWorkload(), hot_share=0.5),
    }
    rows: list[dict[str, object]] = []
    for name, workload in workloads.items():
        arrivals = schedule(workload, rate_rps, duration_s, random.Random(seed * 1000))
        for latency_s in LATENCIES_S:
            for epsilon in EPSILONS:
                figures = sidecar_agreement(
                    arrivals, instances, epsilon, latency_s, random.Random(seed)
                )
                rows.append({"workload": name, "epsilon": epsilon, **figures})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=24.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = sweep(args.rate, args.duration, args.instances, args.seed)
    print("workload        in-flight s  epsilon  agree  fell back  agree when kept")
    for r in rows:
        print(
            f"{r['workload']:<15} {r['latency_s']:>11} {r['epsilon']:>8} {r['agreement']:6.3f}"
            f" {r['load_fallback_share']:10.3f} {r['agreement_when_kept']:16.3f}"
        )
    if args.out:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        document = {"command": "python -m bench.prefix_agreement " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"
        ), "commit": commit, "rows": rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
