"""The application layer: the `pointsman` command and what only it runs (local fleet, demo,
live view, sidecar-injecting webhook). It may import every other package; none imports it."""

import os

# Every child process here is fork + exec, which needs no gRPC fork support; with it on, grpcio
# (1.81 and later) can abort a child between fork and exec, when a poller thread it restarts in
# the child meets the fds that Popen closes (EBADF; grpc/grpc#43055). Read when grpc is first
# imported, so set before that: `pointsman` and `python -m app` import this package first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
