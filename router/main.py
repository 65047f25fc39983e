"""`pointsman router`: runs the router alone, configured by flags and a file.

Tracing follows the OTEL_* environment (see pointsman/telemetry.py); metrics are served
when `--metrics-listen` (or the file's `metrics_listen`) is given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from pointsman.auth import ADMIN_TOKEN_ENV
from pointsman.config import flag_dest, with_flags
from pointsman.errors import ConfigError
from pointsman.telemetry import Tracing, setup_tracing
from pointsman.tls import add_tls_arguments
from router.config import RouterConfig, parse_router_config, router_config_data
from router.discovery import ManagedDiscovery, discovery_for
from router.policy import PolicyStore

__all__ = ["add_arguments", "config_from_args", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's flags. Each one that sets a config field names it (`flag_dest`) and is laid
    over the config file's data before the one reader reads both (`config_from_args`)."""
    parser.add_argument("--config", type=Path, help="router YAML file (see router/config.py)")
    parser.add_argument(
        "--listen",
        dest=flag_dest("listen"),
        metavar="HOST:PORT",
        help="host:port to serve on (default 127.0.0.1:8101)",
    )
    parser.add_argument(
        "--policy",
        dest=flag_dest("policy_file"),
        type=Path,
        metavar="FILE",
        help="policy YAML (see examples/policy.yaml), reloaded when it changes; "
        "replaces the config file's policy_file (default: the built-in policy)",
    )
    parser.add_argument(
        "--metrics-listen",
        dest=flag_dest("metrics_listen"),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 = any free port)",
    )
    parser.add_argument(
        "--instance",
        dest=flag_dest("instances", append=True),
        action="append",
        type=_instance_flag,
        metavar="ID=GRPC[,METRICS_URL[,BUDGET_BYTES]]",
        help="a Triton instance (repeatable); adds to the file's list",
    )
    parser.add_argument(
        "--seed",
        dest=flag_dest("seed"),
        type=int,
        metavar="N",
        help="seed of the picker's random source",
    )
    parser.add_argument(
        "--no-placement",
        dest=flag_dest("placement_writer"),
        action="store_const",
        const=False,
        help="never load or unload models (placement_writer: false): for every router "
        "replica but one when several serve one fleet",
    )
    parser.add_argument(
        "--grace",
        dest=flag_dest("shutdown_grace_s"),
        type=float,
        metavar="SECONDS",
        help="seconds in-flight RPCs get on SIGTERM (default: the file's shutdown_grace_s, 5)",
    )
    parser.add_argument(
        "--admin-token-file",
        dest=flag_dest("admin_token_file"),
        type=Path,
        metavar="FILE",
        help=f"admin RPCs need this bearer token (default: ${ADMIN_TOKEN_ENV}; with neither "
        "token nor --admin-identity, admin RPCs are accepted only when listening on loopback)",
    )
    parser.add_argument(
        "--admin-identity",
        dest=flag_dest("admin_identities", append=True),
        action="append",
        metavar="NAME",
        help="a client-certificate CN or SAN allowed admin RPCs (mutual TLS); repeatable",
    )
    parser.add_argument(
        "--max-message-bytes",
        dest=flag_dest("max_message_bytes"),
        type=int,
        metavar="N",
        help="largest message received or sent (default 16 MiB)",
    )
    add_tls_arguments(parser, "tls", "the listening port", listening=True)
    add_tls_arguments(parser, "triton-tls", "channels to Triton", listening=False)


def _instance_flag(value: str) -> dict[str, Any]:
    """--instance ID=GRPC[,METRICS_URL[,BUDGET_BYTES]] as an `instances:` item of the file."""
    instance_id, sep, rest = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected ID=GRPC[,METRICS_URL[,BUDGET_BYTES]]"
        )
    parts = rest.split(",")
    item: dict[str, Any] = {"id": instance_id, "grpc": parts[0]}
    if len(parts) > 1 and parts[1]:
        item["metrics_url"] = parts[1]
    if len(parts) > 2:
        try:
            item["memory_budget_bytes"] = int(parts[2])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: budget must be an integer") from None
    return item


def check_credentials(config: RouterConfig) -> None:
    """Reads the token and certificate files now, so a missing one stops the start."""
    from router.server import admin_auth_from_config

    admin_auth_from_config(config)
    if config.tls.enabled:
        config.tls.server_credentials()
    if config.triton_tls.enabled:
        config.triton_tls.channel_credentials()


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The config file's data with the flags laid over it, read once; raises ConfigError."""
    data = router_config_data(args.config) if args.config else {}
    return parse_router_config(with_flags(data, args))


async def _serve(
    config: RouterConfig,
    grace_s: float,
    tracing: Tracing,
    policy: PolicyStore,
    discovery: ManagedDiscovery,
) -> None:
    from prometheus_client import REGISTRY

    from router.server import start_router

    # The process-wide registry: it also carries the process_* and python_* collectors.
    router = await start_router(
        config, discovery=discovery, registry=REGISTRY, tracing=tracing, policy_store=policy
    )
    host = config.listen.rpartition(":")[0]
    security = (
        " (mutual TLS)"
        if config.tls.require_client_cert
        else " (TLS)"
        if config.tls.enabled
        else ""
    )
    print(f"pointsman router listening on {host}:{router.port}{security}", flush=True)
    if router.metrics_port is not None:
        host = config.metrics_listen.rpartition(":")[0]
        print(
            f"pointsman router metrics on http://{host}:{router.metrics_port}/metrics", flush=True
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await router.stop(grace_s)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")
    # httpx logs every request at INFO: one line per instance per metrics scrape, 4 a second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = config_from_args(args)
        check_credentials(config)
        tracing = setup_tracing("pointsman-router")
    except ConfigError as exc:
        print(f"pointsman router: {exc}", file=sys.stderr)
        return 2
    from router.datalayer.fields import collected_fields
    from router.server import inputs_check

    try:  # refuse a bad policy before starting anything; the router then serves this store
        policy = PolicyStore(config.policy_file, check=inputs_check(collected_fields(config)))
    except ConfigError as exc:
        source = config.policy_file or "(built-in default)"
        where = "" if str(exc).startswith(str(source)) else f"{source}: "
        print(f"pointsman router: policy {where}{exc}", file=sys.stderr)
        tracing.shutdown()
        return 2
    discovery = discovery_for(config)
    try:  # no Kubernetes credentials, say, is refused before anything starts
        discovery.start()
    except ConfigError as exc:
        print(f"pointsman router: {exc}", file=sys.stderr)
        tracing.shutdown()
        return 2
    import uvloop

    try:
        uvloop.run(_serve(config, config.shutdown_grace_s, tracing, policy, discovery))
    finally:
        discovery.stop()
        tracing.shutdown()
    return 0
