"""A local fleet: N real Triton servers, the router and one sidecar, each its own process.

Proxyless clients skip the sidecar: `run_dir/xds-bootstrap.json` (the ready file's
`xds_bootstrap`) points gRPC's xDS client at the router, so with GRPC_XDS_BOOTSTRAP set to it
a stock client on `xds:///MODEL` routes itself (router/README.md, "Proxyless (xDS)").

`Fleet.start()` brings the parts up in dependency order and waits until traffic can flow;
`Fleet.stop()` (also on Ctrl-C or SIGTERM in `pointsman up`) stops every child. A child that
dies on its own is reported by `Fleet.check_children()`, never left running as an orphan:
every child dies with its parent (see app.processes).

The router and the sidecar always serve Prometheus metrics (`--metrics-listen`). With
`FleetConfig.trace_otlp_endpoint` set, every part traces to that OTLP/HTTP receiver: each
Triton in its `opentelemetry` trace mode at rate 0, so it records exactly the requests that
arrive with a W3C `traceparent` (the sampled ones the sidecar forwards), and the router and the
sidecar through the standard OTEL_* variables (see pointsman.telemetry).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import yaml

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)
from router.xds.bootstrap import write_bootstrap
from sidecar.config import PICK_MODES, PickMode

__all__ = [
    "DEFAULT_MODELS",
    "Fleet",
    "FleetConfig",
    "default_placement",
    "parse_otlp_endpoint",
    "parse_placement",
    "tracing_environment",
    "triton_trace_args",
    "wait_for_health",
]

DEFAULT_MODELS = ("codegen", "codegen_stream")
HOST = "127.0.0.1"


def default_placement(instances: int, models: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Model j on instances j and j+1 (mod N): each model on two instances, and with three
    or more instances each instance lacks some model, so routing by affinity shows."""
    copies = min(2, instances)
    placement: dict[str, list[str]] = {f"triton-{i}": [] for i in range(instances)}
    for j, model in enumerate(models):
        for k in range(copies):
            placement[f"triton-{(j + k) % instances}"].append(model)
    return {name: tuple(models) for name, models in placement.items()}


def parse_placement(text: str, instances: int) -> dict[str, tuple[str, ...]]:
    """Parses 'triton-0=codegen,codegen_stream;triton-1=codegen;triton-2=' (or 0=...)."""
    placement: dict[str, tuple[str, ...]] = {f"triton-{i}": () for i in range(instances)}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, models = part.partition("=")
        name = name.strip()
        name = f"triton-{name}" if name.isdigit() else name
        if not sep or name not in placement:
            raise ValueError(
                f"placement {part!r}: expected triton-I=model,model with I < {instances}"
            )
        placement[name] = tuple(m.strip() for m in models.split(",") if m.strip())
    return placement


def parse_otlp_endpoint(text: str) -> str:
    """The base URL of an OTLP/HTTP receiver ('http://127.0.0.1:4318'), without a trailing
    slash; ValueError if it is not one. Exporters append /v1/traces themselves."""
    parts = urlsplit(text.strip())
    path = parts.path.rstrip("/")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(
            f"OTLP endpoint {text!r}: expected http://HOST:PORT, e.g. http://127.0.0.1:4318"
        )
    if path.endswith("/v1/traces") or parts.query or parts.fragment:
        raise ValueError(f"OTLP endpoint {text!r}: give the base URL; /v1/traces is appended")
    return f"{parts.scheme}://{parts.netloc}{path}"


def triton_trace_args(endpoint: str, service_name: str) -> tuple[str, ...]:
    """Triton flags that export OpenTelemetry spans to the OTLP/HTTP receiver at `endpoint`.

    Rate 0 traces only requests that carry a `traceparent`, so Triton records exactly the
    requests whose trace a caller sampled, as children of the caller's span; count -1 never
    stops. Triton wants the traces URL without the scheme for plain HTTP."""
    url = parse_otlp_endpoint(endpoint) + "/v1/traces"
    url = url.removeprefix("http://")
    return (
        "--trace-config=mode=opentelemetry",
        "--trace-config=rate=0",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=count=-1",
        f"--trace-config=opentelemetry,url={url}",
        f"--trace-config=opentelemetry,resource=service.name={service_name}",
    )


def tracing_environment(endpoint: str) -> dict[str, str]:
    """OTEL_* variables that send a Python part's spans to `endpoint` over OTLP/HTTP.

    The per-signal variables are set too, so stray ones in the caller's environment cannot
    point the parts elsewhere."""
    base = parse_otlp_endpoint(endpoint)
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": base,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": base + "/v1/traces",
    }


@dataclass(frozen=True)
class FleetConfig:
    instances: int = 3
    placement: Mapping[str, tuple[str, ...]] | None = None  # None: default_placement
    models: tuple[str, ...] = DEFAULT_MODELS
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    sidecar_port: int = 8001  # Triton's own port, so apps keep their address; 0 = any free
    router_port: int = 8101  # 0 = any free
    sidecar_metrics_port: int = 0  # the sidecar's /metrics; 0 = any free
    router_metrics_port: int = 0  # the router's /metrics; 0 = any free
    # table: the sidecar picks from streamed route tables; per-request: it asks the router
    # every time, so the router's pick joins each request's trace.
    sidecar_pick_mode: PickMode = "table"
    # Base URL of an OTLP/HTTP receiver (http://127.0.0.1:4318): Tritons, router and sidecar
    # trace to it. None: Triton does not trace, the Python parts follow the caller's OTEL_*.
    trace_otlp_endpoint: str | None = None
    memory_budget_bytes: int = 2 * 1024**3
    # The router's policy file (hot-reloaded). None: one is written that keeps each model's
    # start-up copies as its minimum, so the placement controller grows but never shrinks
    # below the chosen placement.
    policy_file: Path | None = None
    run_dir: Path | None = None  # logs and generated configs; None = a temporary folder
    router_args: tuple[str, ...] = ()
    sidecar_args: tuple[str, ...] = ()
    triton_args: tuple[str, ...] = ()
    ready_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.sidecar_pick_mode not in PICK_MODES:
            modes = ", ".join(PICK_MODES)
            raise ValueError(f"sidecar_pick_mode: {self.sidecar_pick_mode!r} is not one of {modes}")
        if self.trace_otlp_endpoint is not None:
            parse_otlp_endpoint(self.trace_otlp_endpoint)

    def resolved_placement(self) -> dict[str, tuple[str, ...]]:
        return dict(self.placement or default_placement(self.instances, self.models))


@dataclass
class Fleet:
    config: FleetConfig
    tritons: list[TritonSpec] = field(default_factory=list)
    processes: list[ManagedProcess] = field(default_factory=list)
    router_address: str = ""
    sidecar_address: str = ""
    router_metrics_url: str = ""
    sidecar_metrics_url: str = ""
    # The xDS bootstrap of proxyless clients (GRPC_XDS_BOOTSTRAP): the router's address.
    xds_bootstrap: Path | None = None
    run_dir: Path = Path()
    _reported: set[str] = field(default_factory=set)

    def _python_part(self, name: str, argv: list[str]) -> ManagedProcess:
        env = {"PYTHONUNBUFFERED": "1"}
        if self.config.trace_otlp_endpoint:
            env |= tracing_environment(self.config.trace_otlp_endpoint)
        proc = ManagedProcess(
            ProcessSpec(
                name=name,
                argv=[sys.executable, "-m", "app", *argv],
                env=env,
                log_path=self.run_dir / f"{name}.log",
            )
        )
        self.processes.append(proc)
        proc.start()
        return proc

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Starts every part and waits until the sidecar routes; stops all on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        cfg = self.config
        self.run_dir = cfg.run_dir or Path(tempfile.mkdtemp(prefix="pointsman-fleet-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        installation = prepare_installation()
        placement = cfg.resolved_placement()
        for instance_id, models in placement.items():
            trace_args = (
                triton_trace_args(cfg.trace_otlp_endpoint, instance_id)
                if cfg.trace_otlp_endpoint
                else ()
            )
            spec = TritonSpec.on_free_ports(
                instance_id,
                model_repository=cfg.model_repository,
                load_models=models,
                log_path=self.run_dir / f"{instance_id}.log",
                extra_args=(*trace_args, *cfg.triton_args),
            )
            self.tritons.append(spec)
            proc = triton_process(spec, installation)
            self.processes.append(proc)
            proc.start()
        with ThreadPoolExecutor(max_workers=len(self.tritons) or 1) as pool:
            waits = [
                pool.submit(wait_until_ready, s.grpc_address, s.load_models, cfg.ready_timeout_s, p)
                for s, p in zip(self.tritons, self.processes, strict=True)
            ]
            for wait in waits:
                wait.result()

        router_port = cfg.router_port or free_port()
        self.router_address = f"{HOST}:{router_port}"
        router_config = self.run_dir / "router.yaml"
        router_config.write_text(
            yaml.safe_dump(
                {
                    "listen": self.router_address,
                    "instances": [
                        {
                            "id": s.instance_id,
                            "grpc": s.grpc_address,
                            "metrics_url": s.metrics_url,
                            "memory_budget_bytes": cfg.memory_budget_bytes,
                        }
                        for s in self.tritons
                    ],
                    "policy_file": str(self._policy_file(placement)),
                },
                sort_keys=False,
            )
        )
        router_metrics = f"{HOST}:{cfg.router_metrics_port or free_port()}"
        self.router_metrics_url = f"http://{router_metrics}/metrics"
        router = self._python_part(
            "router",
            [
                "router",
                "--config",
                str(router_config),
                "--metrics-listen",
                router_metrics,
                *cfg.router_args,
            ],
        )
        wait_for_health(self.router_address, router, cfg.ready_timeout_s)
        self.xds_bootstrap = write_bootstrap(
            self.run_dir / "xds-bootstrap.json", [self.router_address]
        )

        sidecar_port = cfg.sidecar_port or free_port()
        self.sidecar_address = f"{HOST}:{sidecar_port}"
        sidecar_metrics = f"{HOST}:{cfg.sidecar_metrics_port or free_port()}"
        self.sidecar_metrics_url = f"http://{sidecar_metrics}/metrics"
        sidecar = self._python_part(
            "sidecar",
            [
                "sidecar",
                "--listen",
                self.sidecar_address,
                "--router",
                self.router_address,
                "--pick-mode",
                cfg.sidecar_pick_mode,
                "--metrics-listen",
                sidecar_metrics,
                *cfg.sidecar_args,
            ],
        )
        # Ready, and every placed model ready, means the sidecar has routes for them all.
        wanted = sorted({m for models in placement.values() for m in models})
        wait_until_ready(
            self.sidecar_address, wanted, cfg.ready_timeout_s, sidecar, server_ready=True
        )

    def _policy_file(self, placement: Mapping[str, tuple[str, ...]]) -> Path:
        if self.config.policy_file is not None:
            return self.config.policy_file.resolve()
        copies: dict[str, int] = {}
        for models in placement.values():
            for model in models:
                copies[model] = copies.get(model, 0) + 1
        path = self.run_dir / "policy.yaml"
        path.write_text(
            "# Written by pointsman up: start-up copies are each model's minimum.\n"
            + yaml.safe_dump({"models": {m: {"min_copies": n} for m, n in copies.items()}})
        )
        return path

    def endpoints(self) -> dict[str, object]:
        """The ready-file document."""
        return {
            "sidecar": self.sidecar_address,
            "router": self.router_address,
            "sidecar_metrics_url": self.sidecar_metrics_url,
            "router_metrics_url": self.router_metrics_url,
            "trace_otlp_endpoint": self.config.trace_otlp_endpoint,
            "xds_bootstrap": str(self.xds_bootstrap) if self.xds_bootstrap else None,
            "tritons": [
                {
                    "id": s.instance_id,
                    "grpc": s.grpc_address,
                    "metrics_url": s.metrics_url,
                    "models": list(s.load_models),
                }
                for s in self.tritons
            ],
            "run_dir": str(self.run_dir),
        }

    def write_ready_file(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.endpoints(), indent=2))
        tmp.replace(path)  # readers never see half a file

    def check_children(self) -> list[str]:
        """Newly dead children, each as a line saying which and how it ended."""
        deaths = []
        for proc in self.processes:
            code = proc.exited()
            if code is not None and not proc.stopping and proc.name not in self._reported:
                self._reported.add(proc.name)
                proc.kill_leftovers()  # e.g. a dead Triton's Python backend stubs
                deaths.append(f"{proc.name} (pid {proc.pid}) exited with code {code}")
        return deaths

    def stop(self, grace_s: float = 10.0) -> None:
        # The sidecar first (it drains client requests), then the router, then Triton.
        ordered = [p for p in reversed(self.processes) if p.name in ("sidecar", "router")]
        stop_all(ordered, grace_s)
        stop_all([p for p in self.processes if p not in ordered], grace_s)


def wait_for_health(address: str, proc: ManagedProcess, timeout_s: float = 60.0) -> None:
    """Until `proc` serves SERVING on grpc.health.v1 at `address`; raises if it exits or the
    time passes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            proc.raise_if_exited()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} at {address} not serving after {timeout_s}s")
            time.sleep(0.1)
