"""Running the real Triton Inference Server that the `nvidia-pytriton` wheel ships.

The wheel holds `tritonserver` and stubs of the Python backend for several Pythons. A usable
server needs a private copy with the stub that matches the running Python placed in
`backends/python/` (see shared/TRITON_FACTS.md); `prepare_installation` makes that copy once
and caches it. `TritonSpec` describes one server; `triton_process` turns it into a
`ManagedProcess`; `wait_until_ready` polls it over gRPC.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from app.processes import ManagedProcess, ProcessSpec, free_port
from pointsman.tls import TlsConfig, channel_options

__all__ = [
    "TritonInstallation",
    "TritonSpec",
    "prepare_installation",
    "triton_process",
    "wait_until_ready",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "triton_models"


@dataclass(frozen=True)
class TritonInstallation:
    server_binary: Path
    backend_directory: Path
    library_path: Path  # the wheel's shared libraries, for LD_LIBRARY_PATH

    def environment(self) -> dict[str, str]:
        # The Python backend stub imports numpy from this interpreter's environment, and one
        # BLAS thread per stub keeps several servers on a small machine from oversubscribing.
        bin_dir = str(Path(sys.executable).parent)
        ld = os.pathsep.join(
            p for p in (str(self.library_path), os.environ.get("LD_LIBRARY_PATH", "")) if p
        )
        return {
            "LD_LIBRARY_PATH": ld,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }


def _cache_root() -> Path:
    base = os.environ.get("POINTSMAN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pointsman"
    )
    return Path(base)


def prepare_installation(cache_dir: Path | None = None) -> TritonInstallation:
    """The cached private copy of the wheel's server with the matching Python stub."""
    import pytriton

    package_dir = Path(pytriton.__file__).resolve().parent
    wheel_server = package_dir / "tritonserver"
    libs = package_dir.parent / "nvidia_pytriton.libs"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel_server / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton ships no Python backend stub for Python {py}")
    version = metadata.version("nvidia-pytriton")
    target = (cache_dir or _cache_root()) / f"tritonserver-{version}-py{py}"
    if not (target / ".complete").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        copy = staging / "tritonserver"
        shutil.copytree(wheel_server, copy, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy2(stub, copy / "backends" / "python" / "triton_python_backend_stub")
        (copy / ".complete").touch()
        # Another process may win the race; its copy is as good as ours.
        with contextlib.suppress(OSError):
            copy.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return TritonInstallation(
        server_binary=target / "bin" / "tritonserver",
        backend_directory=target / "backends",
        library_path=libs,
    )


@dataclass(frozen=True)
class TritonSpec:
    """One Triton server of a local fleet."""

    instance_id: str
    grpc_port: int
    http_port: int
    metrics_port: int
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    load_models: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    log_path: Path | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # Serve gRPC over TLS: cert_file/key_file are the server's, ca_file verifies client certs
    # and require_client_cert turns on mutual TLS. None: plaintext.
    tls: TlsConfig | None = None

    @classmethod
    def on_free_ports(cls, instance_id: str, **kwargs: object) -> TritonSpec:
        return cls(instance_id, free_port(), free_port(), free_port(), **kwargs)  # type: ignore[arg-type]

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def argv(self, installation: TritonInstallation) -> list[str]:
        args = [
            str(installation.server_binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={installation.backend_directory}",
            "--model-control-mode=explicit",
            # One failed load would otherwise make the whole server unready; the router
            # judges instances by model readiness instead.
            "--strict-readiness=false",
            "--exit-timeout-secs=5",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--metrics-interval-ms=250",
        ]
        args += [f"--load-model={name}" for name in self.load_models]
        return args + _tls_args(self.tls) + list(self.extra_args)


def _tls_args(tls: TlsConfig | None) -> list[str]:
    if tls is None or not tls.enabled:
        return []
    args = [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={tls.cert_file}",
        f"--grpc-server-key={tls.key_file}",
    ]
    if tls.ca_file:
        args.append(f"--grpc-root-cert={tls.ca_file}")
    if tls.require_client_cert:
        args.append("--grpc-use-ssl-mutual=true")
    return args


def triton_process(spec: TritonSpec, installation: TritonInstallation) -> ManagedProcess:
    return ManagedProcess(
        ProcessSpec(
            name=spec.instance_id,
            argv=spec.argv(installation),
            env=installation.environment(),
            log_path=spec.log_path,
        )
    )


def wait_until_ready(
    address: str,
    models: Sequence[str],
    timeout_s: float,
    process: ManagedProcess | None = None,
    *,
    server_ready: bool = False,
    tls: TlsConfig | None = None,
) -> None:
    """Blocks until the server at `address` is live (ready, with `server_ready`) and every
    model in `models` is ready. Works for Triton and for the sidecar, which speaks its API.
    `tls` (the calling side: CA, and client cert for mutual TLS) when it serves TLS.

    Raises TimeoutError, or RuntimeError if `process` exits first.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout_s
    if tls is not None and tls.enabled:
        client = grpcclient.InferenceServerClient(
            address,
            ssl=True,
            root_certificates=tls.ca_file or None,
            private_key=tls.key_file or None,
            certificate_chain=tls.cert_file or None,
            # None keeps the client's default channel options.
            channel_args=list(channel_options(tls)) or None,
        )
    else:
        client = grpcclient.InferenceServerClient(address)
    server_up = client.is_server_ready if server_ready else client.is_server_live
    try:
        while True:
            if process is not None:
                process.raise_if_exited()
            try:
                if server_up(client_timeout=1.0) and all(
                    client.is_model_ready(m, client_timeout=1.0) for m in models
                ):
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not ready with {list(models)} in {timeout_s}s")
            time.sleep(0.1)
    finally:
        client.close()
