"""TLS and mutual TLS on every hop, and admin RPCs behind a token, on real processes.

One small fleet, with certificates made by the test (tests/certs.py):
    client --mTLS--> sidecar --TLS--> router          (routes)
                       |                 |
                       +------mTLS-------+--mTLS--> Triton (echo)

Triton requires client certificates, so an echo answered through the sidecar proves the
client->sidecar, sidecar->router (the sidecar has no static route: only the router's table
names Triton) and sidecar->Triton hops; the router listing Triton healthy proves
router->Triton. The router requires an admin token for ReloadPolicy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from app.processes import ManagedProcess, ProcessSpec, free_port, stop_all
from app.triton import TritonSpec, prepare_installation, triton_process, wait_until_ready
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.tls import TlsConfig, sync_channel
from tests.support.certs import Pki, make_pki

pytestmark = [pytest.mark.triton, pytest.mark.timeout(180)]

TOKEN = "s3cret-admin-token"
POLICY = "placement: {enabled: false}\n"


@dataclass
class SecureFleet:
    pki: Pki
    triton_address: str
    router_address: str
    sidecar_address: str
    token_file: Path
    router: ManagedProcess
    sidecar: ManagedProcess

    def client_tls(self, *, cert: bool = True) -> TlsConfig:
        pair = self.pki.client
        return TlsConfig(
            ca_file=str(self.pki.ca),
            cert_file=str(pair.cert) if cert else "",
            key_file=str(pair.key) if cert else "",
        )


def _python_part(name: str, argv: list[str], run_dir: Path) -> ManagedProcess:
    process = ManagedProcess(
        ProcessSpec(
            name=name,
            argv=[sys.executable, "-m", "app", *argv],
            log_path=run_dir / f"{name}.log",
        )
    )
    process.start()
    return process


def _wait_router_sees_healthy(
    fleet_dir: Path, address: str, tls: TlsConfig, proc: ManagedProcess
) -> None:
    deadline = time.monotonic() + 60
    with sync_channel(address, tls) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        while True:
            proc.raise_if_exited()
            try:
                listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=2)
                if listed.instances and all(i.healthy for i in listed.instances):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"router never saw its instance healthy; see {fleet_dir}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def secure_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    run_dir = tmp_path_factory.mktemp("tls")
    pki = make_pki(run_dir / "pki")
    token_file = run_dir / "admin-token"
    token_file.write_text(TOKEN + "\n")
    policy = run_dir / "policy.yaml"
    policy.write_text(POLICY)
    triton = TritonSpec.on_free_ports(
        "t0",
        load_models=("echo",),
        log_path=run_dir / "t0.log",
        tls=TlsConfig(
            cert_file=str(pki.server.cert),
            key_file=str(pki.server.key),
            ca_file=str(pki.ca),
            require_client_cert=True,
        ),
    )
    router_address = f"127.0.0.1:{free_port()}"
    sidecar_address = f"127.0.0.1:{free_port()}"
    ca, server, client = str(pki.ca), pki.server, pki.client
    # Both Pointsman parts present the client cert to Triton (mutual TLS there).
    triton_client_flags = [
        "--triton-tls-ca", ca, "--triton-tls-cert", str(client.cert),
        "--triton-tls-key", str(client.key),
    ]  # fmt: skip
    processes: list[ManagedProcess] = []
    try:
        triton_proc = triton_process(triton, prepare_installation())
        triton_proc.start()
        processes.append(triton_proc)
        router = _python_part(
            "router",
            [
                "router", "--listen", router_address,
                "--instance", f"t0={triton.grpc_address},{triton.metrics_url}",
                "--policy", str(policy),
                "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                "--admin-token-file", str(token_file),
                *triton_client_flags,
            ],
            run_dir,
        )  # fmt: skip
        processes.append(router)
        sidecar = _python_part(
            "sidecar",
            [
                "sidecar", "--listen", sidecar_address, "--router", router_address,
                "--cold-start-wait", "0",
                "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                "--tls-ca", ca, "--tls-require-client-cert",
                "--router-tls-ca", ca,
                *triton_client_flags,
            ],
            run_dir,
        )  # fmt: skip
        processes.append(sidecar)
        fleet = SecureFleet(
            pki=pki,
            triton_address=triton.grpc_address,
            router_address=router_address,
            sidecar_address=sidecar_address,
            token_file=token_file,
            router=router,
            sidecar=sidecar,
        )
        wait_until_ready(triton.grpc_address, ["echo"], 60, triton_proc, tls=fleet.client_tls())
        _wait_router_sees_healthy(run_dir, router_address, TlsConfig(ca_file=ca), router)
        wait_until_ready(
            sidecar_address, ["echo"], 60, sidecar, server_ready=True, tls=fleet.client_tls()
        )
        yield fleet
    finally:
        stop_all(processes)


def _echo(address: str, tls: TlsConfig, values: list[float]) -> np.ndarray:
    client = grpcclient.InferenceServerClient(
        address,
        ssl=True,
        root_certificates=tls.ca_file or None,
        private_key=tls.key_file or None,
        certificate_chain=tls.cert_file or None,
    )
    try:
        data = np.array(values, dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        result = client.infer("echo", [tensor], client_timeout=10)
        output = result.as_numpy("OUTPUT0")
        assert output is not None
        return output
    finally:
        client.close()


def test_inference_over_mtls_through_every_hop(secure_fleet: SecureFleet) -> None:
    output = _echo(secure_fleet.sidecar_address, secure_fleet.client_tls(), [1.5, -2.0, 3.25])
    assert output.tolist() == [1.5, -2.0, 3.25]


@pytest.mark.parametrize(
    "case",
    ["no client cert", "cert from another CA", "plaintext"],
)
def test_sidecar_refuses_clients_without_a_trusted_cert(
    secure_fleet: SecureFleet, case: str
) -> None:
    pki = secure_fleet.pki
    if case == "plaintext":
        client = grpcclient.InferenceServerClient(secure_fleet.sidecar_address)
        try:
            with pytest.raises(InferenceServerException):
                client.is_server_live(client_timeout=3)
        finally:
            client.close()
        return
    tls = (
        secure_fleet.client_tls(cert=False)
        if case == "no client cert"
        else TlsConfig(
            ca_file=str(pki.ca),
            cert_file=str(pki.stranger_client.cert),
            key_file=str(pki.stranger_client.key),
        )
    )
    with pytest.raises(InferenceServerException) as refused:
        _echo(secure_fleet.sidecar_address, tls, [1.0])
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_router_verifies_and_is_verified_over_tls(secure_fleet: SecureFleet) -> None:
    ca = str(secure_fleet.pki.ca)
    # A client that trusts only another CA cannot talk to the router.
    with sync_channel(
        secure_fleet.router_address, TlsConfig(ca_file=str(secure_fleet.pki.stranger_ca))
    ) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(pb.ListModelsRequest(), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # Read-only RPCs are open to any TLS client; the router reaches Triton over mTLS.
    with sync_channel(secure_fleet.router_address, TlsConfig(ca_file=ca)) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=5)
        assert [(i.instance_id, i.healthy) for i in listed.instances] == [("t0", True)]
        assert any(m.model_name == "echo" for m in listed.instances[0].models)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong-token"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", TOKEN),), grpc.StatusCode.UNAUTHENTICATED),  # no "Bearer "
        ((("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.OK),
    ],
    ids=["no token", "wrong token", "not a bearer", "right token"],
)
def test_reload_policy_needs_the_admin_token(
    secure_fleet: SecureFleet, metadata: tuple[tuple[str, str], ...], expected: grpc.StatusCode
) -> None:
    with sync_channel(
        secure_fleet.router_address, TlsConfig(ca_file=str(secure_fleet.pki.ca))
    ) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.ReloadPolicy(pb.ReloadPolicyRequest(), metadata=metadata, timeout=5)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            assert TOKEN not in (error.details() or "")
        assert code == expected
    if expected is not grpc.StatusCode.OK:
        assert TOKEN not in (Path(secure_fleet.router.spec.log_path or "").read_text())


def _cli_reload(
    fleet: SecureFleet, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "app", "policy", "reload",
            "--router", fleet.router_address, "--tls-ca", str(fleet.pki.ca), *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )  # fmt: skip


def test_cli_policy_reload_sends_the_token(secure_fleet: SecureFleet, tmp_path: Path) -> None:
    import os

    without = _cli_reload(
        secure_fleet, env={k: v for k, v in os.environ.items() if k != "POINTSMAN_ADMIN_TOKEN"}
    )
    assert without.returncode == 1
    assert "UNAUTHENTICATED" in without.stderr
    with_file = _cli_reload(secure_fleet, "--token-file", str(secure_fleet.token_file))
    assert with_file.returncode == 0, with_file.stderr
    assert with_file.stdout.startswith("policy ")
    from_env = _cli_reload(secure_fleet, env={**os.environ, "POINTSMAN_ADMIN_TOKEN": TOKEN})
    assert from_env.returncode == 0, from_env.stderr


def test_top_reads_a_tls_router(secure_fleet: SecureFleet) -> None:
    base = [sys.executable, "-m", "app", "top", "--once", "--router"]
    shown = subprocess.run(
        [*base, secure_fleet.router_address, "--tls-ca", str(secure_fleet.pki.ca)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "t0" in shown.stdout
    plaintext = subprocess.run(
        [*base, secure_fleet.router_address], capture_output=True, text=True, timeout=60
    )
    assert plaintext.returncode == 1
