"""A local fleet: N real Triton servers, the router and one sidecar, each its own process.

`Fleet.start()` brings the parts up in dependency order and waits until traffic can flow;
`Fleet.stop()` (also on Ctrl-C or SIGTERM in `pointsman up`) stops every child. A child that
dies on its own is reported by `Fleet.check_children()`, never left running as an orphan:
every child dies with its parent (see pointsman.processes).
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

import grpc
import yaml

from pointsman.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from pointsman.triton import (
    DEFAULT_MODEL_REPOSITORY,
    TritonSpec,
    prepare_installation,
    triton_process,
    wait_until_ready,
)

__all__ = ["DEFAULT_MODELS", "Fleet", "FleetConfig", "default_placement", "parse_placement"]

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


@dataclass(frozen=True)
class FleetConfig:
    instances: int = 3
    placement: Mapping[str, tuple[str, ...]] | None = None  # None: default_placement
    models: tuple[str, ...] = DEFAULT_MODELS
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    sidecar_port: int = 8001  # Triton's own port, so apps keep their address; 0 = any free
    router_port: int = 8101  # 0 = any free
    memory_budget_bytes: int = 2 * 1024**3
    run_dir: Path | None = None  # logs and generated configs; None = a temporary folder
    router_args: tuple[str, ...] = ()
    sidecar_args: tuple[str, ...] = ()
    triton_args: tuple[str, ...] = ()
    ready_timeout_s: float = 120.0

    def resolved_placement(self) -> dict[str, tuple[str, ...]]:
        return dict(self.placement or default_placement(self.instances, self.models))


@dataclass
class Fleet:
    config: FleetConfig
    tritons: list[TritonSpec] = field(default_factory=list)
    processes: list[ManagedProcess] = field(default_factory=list)
    router_address: str = ""
    sidecar_address: str = ""
    run_dir: Path = Path()
    _reported: set[str] = field(default_factory=set)

    def _python_part(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(
            ProcessSpec(
                name=name,
                argv=[sys.executable, "-m", "pointsman", *argv],
                env={"PYTHONUNBUFFERED": "1"},
                log_path=self.run_dir / f"{name}.log",
            )
        )
        self.processes.append(proc)
        proc.start()
        return proc

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
            spec = TritonSpec.on_free_ports(
                instance_id,
                model_repository=cfg.model_repository,
                load_models=models,
                log_path=self.run_dir / f"{instance_id}.log",
                extra_args=cfg.triton_args,
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
                },
                sort_keys=False,
            )
        )
        router = self._python_part(
            "router", ["router", "--config", str(router_config), *cfg.router_args]
        )
        _wait_for_health(self.router_address, router, cfg.ready_timeout_s)

        sidecar_port = cfg.sidecar_port or free_port()
        self.sidecar_address = f"{HOST}:{sidecar_port}"
        sidecar = self._python_part(
            "sidecar",
            [
                "sidecar",
                "--listen",
                self.sidecar_address,
                "--router",
                self.router_address,
                *cfg.sidecar_args,
            ],
        )
        # Ready, and every placed model ready, means the sidecar has routes for them all.
        wanted = sorted({m for models in placement.values() for m in models})
        wait_until_ready(
            self.sidecar_address, wanted, cfg.ready_timeout_s, sidecar, server_ready=True
        )

    def endpoints(self) -> dict[str, object]:
        """The ready-file document."""
        return {
            "sidecar": self.sidecar_address,
            "router": self.router_address,
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
                deaths.append(f"{proc.name} (pid {proc.pid}) exited with code {code}")
        return deaths

    def stop(self, grace_s: float = 10.0) -> None:
        # The sidecar first (it drains client requests), then the router, then Triton.
        ordered = [p for p in reversed(self.processes) if p.name in ("sidecar", "router")]
        stop_all(ordered, grace_s)
        stop_all([p for p in self.processes if p not in ordered], grace_s)


def _wait_for_health(address: str, proc: ManagedProcess, timeout_s: float) -> None:
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
