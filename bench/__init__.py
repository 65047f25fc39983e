"""`pointsman bench`: every benchmark's one home (see bench/README.md).

- `loadgen`: THE load generator: open loop (scheduled arrivals, latency from the scheduled
  time) and closed loop (N clients); `calls`: its unary and streaming Triton gRPC calls;
  `stats`: percentiles (timeouts as infinite latency), bootstrap intervals; `workloads`:
  Zipf popularity, shifts, bursts, streaming.
- `testbed`, `pointsman_fleet`, `baselines/`: the systems compared on one testbed;
  `cell`: one measured (system, workload) run; `placement_watch`, `procstats`: loads, CPU and
  RSS measured alike for every system; `repository`: model copies made at run time.
- `scenarios/`: what `pointsman bench --scenario NAME` runs; `report`: results.json (schema
  in bench/README.md), results.md and results.png; `command`: the CLI subcommand.
"""
