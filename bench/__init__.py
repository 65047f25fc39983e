"""`pointsman bench`: numbers measured on the user's own machine, side by side, in one run.

- `loadgen`: the load generator (open and closed loop, unary and streaming gRPC calls, full
  latency record, errors by status).
- `scenarios/`: `seed_table` (round robin vs Pointsman vs Pointsman + batching on real
  Tritons), `overhead` (direct vs sidecar vs nghttpx on a trivial model), `scale` (the
  router's engines on simulated fleets).
- `report`: results as JSON, a markdown table and a PNG plot, with the machine's description.
- `command`: the CLI subcommand that ties them together.
"""
