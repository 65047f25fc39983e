"""The `pointsman sidecar` command: flags, config file, signals, telemetry.

Flags override the config file, which overrides the defaults. SIGTERM or SIGINT sets health
NOT_SERVING, lets in-flight requests finish for `shutdown_grace_s`, and exits 0. Tracing is
configured by the standard OTEL_* environment variables (`pointsman.telemetry`); spans still
buffered are flushed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from pointsman.config import flag_dest, with_flags
from pointsman.errors import ConfigError
from pointsman.tls import add_tls_arguments
from sidecar.config import (
    IDEMPOTENCY_BACKENDS,
    PICK_MODES,
    SidecarConfig,
    config_from_mapping,
    sidecar_config_data,
)

if TYPE_CHECKING:
    from pointsman.telemetry import Tracing

__all__ = ["add_arguments", "build_config", "pin_to_cpus", "run"]

log = logging.getLogger("sidecar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the sidecar's flags to `parser` (the `pointsman sidecar` subcommand). Each one that
    sets a config field names it (`flag_dest`); `build_config` lays them over the file."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of SidecarConfig fields")
    parser.add_argument(
        "--listen",
        dest=flag_dest("listen"),
        metavar="HOST:PORT",
        help="where to serve Triton's API (default 127.0.0.1:8001)",
    )
    parser.add_argument(
        "--router",
        dest=flag_dest("routers"),
        metavar="HOST:PORT",
        action="append",
        help="a router replica to watch routes from; repeat for several (tried in order)",
    )
    parser.add_argument(
        "--fallback-instance",
        dest=flag_dest("fallback_instances"),
        metavar="HOST:PORT",
        action="append",
        help="a Triton instance to route any model to while no router table has arrived "
        "(fail-static start); repeat for several",
    )
    parser.add_argument(
        "--pick-mode",
        dest=flag_dest("pick_mode"),
        choices=PICK_MODES,
        help="table: pick from streamed route tables; per-request: ask the router each time",
    )
    parser.add_argument(
        "--max-message-bytes",
        dest=flag_dest("max_message_bytes"),
        type=int,
        metavar="N",
        help="largest request or response in bytes (default 64 MiB)",
    )
    parser.add_argument(
        "--cold-start-wait",
        dest=flag_dest("cold_start_wait_s"),
        type=float,
        metavar="SECONDS",
        help="how long a request for a model loaded nowhere waits for the router to load it "
        "(default 30; 0 answers UNAVAILABLE at once)",
    )
    parser.add_argument(
        "--max-attempts",
        dest=flag_dest("max_attempts"),
        type=int,
        metavar="N",
        help="attempts per request at most, on different instances (default 3; 1: no failover)",
    )
    parser.add_argument(
        "--retry-budget-ratio",
        dest=flag_dest("retry_budget_ratio"),
        type=float,
        metavar="R",
        help="retries may be at most this share of requests over 10 s, plus a floor of 10 "
        "(default 0.1)",
    )
    parser.add_argument(
        "--outlier-failures",
        dest=flag_dest("outlier_consecutive_failures"),
        type=int,
        metavar="N",
        help="connection failures in a row that eject an instance from picks (default 3)",
    )
    parser.add_argument(
        "--outlier-ejection",
        dest=flag_dest("outlier_base_ejection_s"),
        type=float,
        metavar="SECONDS",
        help="first ejection's length; each further one doubles, up to 30 s (default 1)",
    )
    parser.add_argument(
        "--deadline-queue-timeout",
        dest=flag_dest("deadline_queue_timeout"),
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pass the caller's remaining deadline as Triton's queue timeout (default on)",
    )
    parser.add_argument(
        "--metrics-listen",
        dest=flag_dest("metrics_listen"),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port, "
        "logged; default: not served)",
    )
    parser.add_argument(
        "--max-in-flight",
        dest=flag_dest("max_in_flight"),
        type=int,
        metavar="N",
        help="inference calls and streams sent on at once; more wait (default 256)",
    )
    parser.add_argument(
        "--max-queued",
        dest=flag_dest("max_queued"),
        type=int,
        metavar="N",
        help="calls waiting for a slot; beyond it the lowest priority is shed with "
        "RESOURCE_EXHAUSTED (default 1024)",
    )
    parser.add_argument(
        "--idempotency-ttl",
        dest=flag_dest("idempotency_ttl_s"),
        type=float,
        metavar="SECONDS",
        help="replay the outcome of a request id this long (default 60; 0: no replay)",
    )
    parser.add_argument(
        "--idempotency-backend",
        dest=flag_dest("idempotency.backend"),
        choices=IDEMPOTENCY_BACKENDS,
        help="where request ids are coalesced and replayed: memory (this sidecar alone, the "
        "default) or redis (every sidecar sharing --idempotency-url)",
    )
    parser.add_argument(
        "--idempotency-url",
        dest=flag_dest("idempotency.url"),
        metavar="URL",
        help="the Redis of --idempotency-backend redis: redis://host:6379/0, rediss://...",
    )
    parser.add_argument(
        "--cpus",
        dest=flag_dest("cpus"),
        type=_cpu_list,
        metavar="LIST",
        help="pin the sidecar to these CPUs, e.g. 1 or 0,1 (Linux; default: no pinning)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default INFO)",
    )
    parser.add_argument(
        "--shutdown-grace",
        dest=flag_dest("shutdown_grace_s"),
        type=float,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests and streams may take to finish (default 5)",
    )
    add_tls_arguments(parser, "tls", "the listening port", listening=True)
    add_tls_arguments(parser, "router-tls", "channels to the routers", listening=False)
    add_tls_arguments(parser, "triton-tls", "channels to Triton", listening=False)


def _cpu_list(text: str) -> list[int]:
    try:
        return [int(cpu) for cpu in text.split(",") if cpu.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU numbers like 0,1, got {text!r}") from None


def build_config(args: argparse.Namespace) -> SidecarConfig:
    """The --config file's data with the other flags laid over it, read once; raises
    ConfigError naming the field."""
    path = getattr(args, "config", None)
    data = sidecar_config_data(path) if path else {}
    return config_from_mapping(with_flags(data, args))


def pin_to_cpus(cpus: tuple[int, ...]) -> None:
    """Pins every thread of this process (and so the threads they start) to `cpus`."""
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("cpus: CPU pinning needs Linux")
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)
    except OSError as error:
        raise ConfigError(f"cpus: cannot pin to {cpus}: {error}") from None


def run(args: argparse.Namespace) -> int:
    """Runs the sidecar until SIGTERM or SIGINT; the process exit code."""
    try:
        config = build_config(args)
    except ConfigError as error:
        print(f"pointsman sidecar: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvloop

    try:
        pin_to_cpus(config.cpus)
        return uvloop.run(_serve(config))
    except ConfigError as error:
        print(f"pointsman sidecar: {error}", file=sys.stderr)
        return 2


async def _serve(config: SidecarConfig) -> int:
    from pointsman.telemetry import setup_tracing

    tracing = setup_tracing("pointsman-sidecar")
    try:
        return await _serve_traced(config, tracing)
    finally:
        tracing.shutdown()


async def _serve_traced(config: SidecarConfig, tracing: Tracing) -> int:
    from sidecar.server import start_sidecar

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sidecar = await start_sidecar(config, tracing=tracing)
    # Everything allocated so far lives as long as the process: keep the collector off it,
    # so its pauses stay short under load.
    gc.freeze()
    log.info(
        "sidecar serving inference.GRPCInferenceService on %s (routers: %s, pick mode %s)",
        sidecar.address,
        ", ".join(config.routers) or "none, static routes only",
        config.pick_mode,
    )
    if sidecar.metrics_url is not None:
        log.info("sidecar metrics at %s", sidecar.metrics_url)
    if config.tls.enabled:
        mode = "mutual TLS" if config.tls.require_client_cert else "TLS"
        log.info("sidecar listening with %s", mode)
    if tracing.enabled:
        log.info(
            "sidecar tracing on (OTEL_TRACES_EXPORTER=%s)", os.environ.get("OTEL_TRACES_EXPORTER")
        )
    await stop.wait()
    log.info(
        "stopping: health NOT_SERVING, %.1fs grace for in-flight requests", config.shutdown_grace_s
    )
    await sidecar.stop(config.shutdown_grace_s)
    return 0
