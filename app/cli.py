"""The `pointsman` command: up, router, sidecar, demo, top, policy."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from app.arguments import positive_seconds
from app.policy_command import add_policy_parser
from app.xds_command import add_xds_bootstrap_parser
from pointsman import __version__

__all__ = ["main"]


class _Stop(Exception):
    """Raised by the signal handler to unwind `up` and `demo` cleanly."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    from sidecar.config import PICK_MODES

    parser.add_argument("--instances", type=int, default=3, help="Triton servers (default 3)")
    parser.add_argument(
        "--placement",
        help="which models load where at start, e.g. "
        "'0=codegen,codegen_stream;1=codegen;2=codegen_stream' "
        "(default: each model on two instances, each instance lacking one)",
    )
    parser.add_argument("--models", default="codegen,codegen_stream", help="models to place")
    parser.add_argument("--model-repository", type=Path, help="default: triton_models/")
    parser.add_argument("--sidecar-port", type=int, default=8001, help="0 = any free port")
    parser.add_argument("--router-port", type=int, default=8101, help="0 = any free port")
    parser.add_argument(
        "--sidecar-metrics-port", type=int, default=0, help="the sidecar's /metrics (0 = any free)"
    )
    parser.add_argument(
        "--router-metrics-port", type=int, default=0, help="the router's /metrics (0 = any free)"
    )
    parser.add_argument("--memory-budget-bytes", type=int, default=2 * 1024**3, help="per instance")
    parser.add_argument(
        "--policy",
        type=Path,
        help="the router's policy file, hot-reloaded (default: start-up copies as minimums)",
    )
    parser.add_argument("--run-dir", type=Path, help="logs and configs (default: a temp dir)")
    parser.add_argument(
        "--sidecar-pick-mode",
        choices=PICK_MODES,
        default="table",
        help="table: the sidecar picks from streamed route tables (default); per-request: it "
        "asks the router for every request, so the router's pick is in each request's trace",
    )
    parser.add_argument(
        "--trace-otlp-endpoint",
        type=_otlp_endpoint,
        metavar="URL",
        help="base URL of an OTLP/HTTP receiver, e.g. http://127.0.0.1:4318: every Triton "
        "traces the requests that carry a traceparent to it, the router and the sidecar "
        "export their spans to it (default: Triton does not trace; the router and the sidecar "
        "follow the OTEL_* environment)",
    )


def _otlp_endpoint(text: str) -> str:
    from app.fleet import parse_otlp_endpoint

    try:
        return parse_otlp_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fleet_config(args: argparse.Namespace) -> object:
    from app.fleet import FleetConfig, parse_placement

    models = tuple(m for m in args.models.split(",") if m)
    kwargs: dict[str, object] = {}
    if args.model_repository:
        kwargs["model_repository"] = args.model_repository.resolve()
    return FleetConfig(
        instances=args.instances,
        models=models,
        placement=parse_placement(args.placement, args.instances) if args.placement else None,
        sidecar_port=args.sidecar_port,
        router_port=args.router_port,
        sidecar_metrics_port=args.sidecar_metrics_port,
        router_metrics_port=args.router_metrics_port,
        memory_budget_bytes=args.memory_budget_bytes,
        policy_file=args.policy,
        run_dir=args.run_dir,
        sidecar_pick_mode=args.sidecar_pick_mode,
        trace_otlp_endpoint=args.trace_otlp_endpoint,
        **kwargs,  # type: ignore[arg-type]
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from app.fleet import Fleet, FleetConfig

    config = _fleet_config(args)
    assert isinstance(config, FleetConfig)
    fleet = Fleet(config)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        started = time.monotonic()
        fleet.start()
        print(f"pointsman fleet ready in {time.monotonic() - started:.1f}s")
        print(f"  sidecar  {fleet.sidecar_address}   (point Triton clients here)")
        print(f"           metrics {fleet.sidecar_metrics_url}")
        print(f"           pick mode {config.sidecar_pick_mode}")
        print(f"  router   {fleet.router_address}")
        print(f"           metrics {fleet.router_metrics_url}")
        print(f"  xDS      GRPC_XDS_BOOTSTRAP={fleet.xds_bootstrap}   (proxyless: xds:///MODEL)")
        if config.trace_otlp_endpoint:
            print(f"  tracing  OTLP/HTTP to {config.trace_otlp_endpoint}: Tritons, router, sidecar")
        for spec in fleet.tritons:
            print(
                f"  {spec.instance_id}  grpc {spec.grpc_address}  metrics {spec.metrics_url}"
                f"  models {', '.join(spec.load_models) or '-'}"
            )
        print(f"  logs     {fleet.run_dir}")
        if args.ready_file:
            fleet.write_ready_file(args.ready_file)
        print("Ctrl-C to stop.", flush=True)
        while True:
            for death in fleet.check_children():
                print(f"pointsman up: {death}", file=sys.stderr, flush=True)
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping the fleet ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
        print(f"pointsman up: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        fleet.stop()
        if args.ready_file:
            args.ready_file.unlink(missing_ok=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo
    from app.fleet import FleetConfig

    config = _fleet_config(args)
    assert isinstance(config, FleetConfig)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return run_demo(config, duration_s=args.duration, concurrency=args.concurrency)
    except (KeyboardInterrupt, _Stop):
        print("\ndemo interrupted", file=sys.stderr)
        return 130


def _cmd_top(args: argparse.Namespace) -> int:
    from app.top import run_top
    from pointsman.errors import ConfigError
    from pointsman.tls import tls_from_args

    try:
        tls = tls_from_args(args, "tls", where="--tls")
        return run_top(args.router, interval_s=args.interval, once=args.once, tls=tls)
    except ConfigError as exc:
        print(f"pointsman top: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from pointsman.tls import add_tls_arguments
    from router import main as router_main
    from sidecar import main as sidecar_main

    parser = argparse.ArgumentParser(
        prog="pointsman", description="Model-aware gRPC routing for Triton Inference Server fleets"
    )
    parser.add_argument("--version", action="version", version=f"pointsman {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local fleet: Triton servers, the router, a sidecar")
    add_fleet_arguments(up)
    up.add_argument("--ready-file", type=Path, help="write endpoints as JSON here once ready")
    up.set_defaults(func=_cmd_up)

    demo = sub.add_parser("demo", help="start a local fleet, drive a workload, print a summary")
    add_fleet_arguments(demo)
    demo.set_defaults(sidecar_port=0, router_port=0)
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of traffic")
    demo.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    demo.set_defaults(func=_cmd_demo)

    router = sub.add_parser("router", help="run the router alone")
    router_main.add_arguments(router)
    router.set_defaults(func=router_main.run)

    top = sub.add_parser("top", help="a live terminal view of the fleet, from the router")
    top.add_argument(
        "--router", default="127.0.0.1:8101", metavar="HOST:PORT", help="the router to ask"
    )
    top.add_argument(
        "--interval", type=positive_seconds, default=1.0, help="seconds between refreshes"
    )
    top.add_argument(
        "--once", action="store_true", help="print one frame and exit (1 if the router is down)"
    )
    add_tls_arguments(top, "tls", "the channel to the router", listening=False)
    top.set_defaults(func=_cmd_top)

    sidecar = sub.add_parser("sidecar", help="run a sidecar alone")
    sidecar_main.add_arguments(sidecar)
    sidecar.set_defaults(func=sidecar_main.run)

    from app import webhook

    inject = sub.add_parser("webhook", help="serve the sidecar-injecting admission webhook (HTTPS)")
    webhook.add_arguments(inject)
    inject.set_defaults(func=webhook.run)

    add_policy_parser(sub)
    add_xds_bootstrap_parser(sub)

    from bench import command as bench_command

    bench = sub.add_parser(
        "bench", help="benchmarks: seed table, data-plane overhead, scale; JSON + markdown + PNG"
    )
    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
