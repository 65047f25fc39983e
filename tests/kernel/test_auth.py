"""Admin authorization and TLS config: the pure decisions as tables, then one in-process
router with mutual TLS where a client certificate on admin_identities is the credential."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from app.processes import free_port
from pointsman.auth import (
    AdminAuth,
    authorize,
    bearer_metadata,
    is_loopback_host,
    is_loopback_peer,
    load_admin_token,
    peer_identities,
)
from pointsman.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from pointsman.router.v1 import router_pb2 as pb
from pointsman.router.v1 import router_pb2_grpc as pb_grpc
from pointsman.tls import TlsConfig, sync_channel, tls_from_mapping
from router.config import parse_router_config
from router.server import RouterServer, start_router
from tests.support.certs import Pki, make_pki
from tests.support.loop_thread import LoopThread

LOCAL = "ipv4:127.0.0.1:50000"
REMOTE = "ipv4:10.1.2.3:50000"
TOKEN = "t0ken"
WITH_TOKEN = AdminAuth(token=TOKEN)
WITH_IDS = AdminAuth(identities=frozenset({"ops-admin"}))
BOTH = AdminAuth(token=TOKEN, identities=frozenset({"ops-admin"}))
OPEN = AdminAuth(loopback_listener=True)
WIDE_OPEN = AdminAuth()  # no credentials, server bound beyond loopback


@pytest.mark.parametrize(
    ("auth", "metadata", "identities", "peer", "expected"),
    [
        # A token configured: only the right bearer token admits.
        (WITH_TOKEN, bearer_metadata(TOKEN), frozenset(), REMOTE, None),
        (WITH_TOKEN, (("Authorization", f"bearer {TOKEN}"),), frozenset(), REMOTE, None),
        (WITH_TOKEN, (), frozenset(), LOCAL, UnauthenticatedError),
        (WITH_TOKEN, bearer_metadata("nope"), frozenset(), LOCAL, UnauthenticatedError),
        (WITH_TOKEN, (("authorization", TOKEN),), frozenset(), LOCAL, UnauthenticatedError),
        (WITH_TOKEN, bearer_metadata(TOKEN + "x"), frozenset(), REMOTE, UnauthenticatedError),
        # Identities configured: a verified client cert on the list admits, another is denied.
        (WITH_IDS, (), frozenset({"ops-admin"}), REMOTE, None),
        (WITH_IDS, (), frozenset({"intruder"}), REMOTE, PermissionDeniedError),
        (WITH_IDS, (), frozenset(), LOCAL, UnauthenticatedError),
        # Either credential does.
        (BOTH, bearer_metadata(TOKEN), frozenset({"intruder"}), REMOTE, None),
        (BOTH, (), frozenset({"ops-admin"}), REMOTE, None),
        (BOTH, bearer_metadata("nope"), frozenset({"ops-admin"}), REMOTE, UnauthenticatedError),
        # Nothing configured: this host only.
        (OPEN, (), frozenset(), LOCAL, None),
        (OPEN, (), frozenset(), "ipv6:[::1]:50000", None),
        (OPEN, (), frozenset(), "unix:/run/router.sock", None),
        (OPEN, (), frozenset(), REMOTE, PermissionDeniedError),
        (OPEN, bearer_metadata("anything"), frozenset(), REMOTE, PermissionDeniedError),
        # ... and only on a server bound to loopback (a local proxy makes remote calls local).
        (WIDE_OPEN, (), frozenset(), LOCAL, PermissionDeniedError),
        (WIDE_OPEN, (), frozenset(), REMOTE, PermissionDeniedError),
    ],
)
def test_authorize(
    auth: AdminAuth,
    metadata: tuple[tuple[str, str], ...],
    identities: frozenset[str],
    peer: str,
    expected: type[Exception] | None,
) -> None:
    error = authorize(
        auth, metadata=metadata, identities=identities, peer=peer, method="ReloadPolicy"
    )
    assert type(error) is expected if expected else error is None
    if error is not None:
        assert TOKEN not in str(error)
        assert "ReloadPolicy" in str(error)


def test_the_token_never_shows_in_repr() -> None:
    assert TOKEN not in repr(WITH_TOKEN)


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:1", True),
        ("ipv4:127.5.6.7:1", True),
        ("ipv6:[::1]:1", True),
        ("unix:/tmp/s", True),
        ("ipv4:10.0.0.1:1", False),
        ("ipv6:[fe80::1]:1", False),
        ("ipv4:128.0.0.1:1", False),
    ],
)
def test_is_loopback_peer(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:8101", True),
        ("127.0.0.2:0", True),
        ("localhost:8101", True),
        ("[::1]:8101", True),
        ("0.0.0.0:8101", False),
        ("[::]:8101", False),
        ("10.0.0.5:8101", False),
        ("router.internal:8101", False),
    ],
)
def test_is_loopback_host(listen: str, loopback: bool) -> None:
    assert is_loopback_host(listen) is loopback


def test_peer_identities_are_cn_and_sans() -> None:
    context = {
        "x509_common_name": [b"ops-admin"],
        "x509_subject_alternative_name": [b"ops-admin", b"ops.example"],
        "transport_security_type": [b"ssl"],
    }
    assert peer_identities(context) == {"ops-admin", "ops.example"}
    assert peer_identities({}) == frozenset()


def test_load_admin_token_from_file_then_env(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    env = {"POINTSMAN_ADMIN_TOKEN": "from-env"}
    assert load_admin_token(token_file, env, where="admin_token_file") == "from-file"
    assert load_admin_token(None, env, where="admin_token_file") == "from-env"
    assert load_admin_token(None, {}, where="admin_token_file") == ""
    with pytest.raises(ConfigError, match="admin_token_file: cannot read"):
        load_admin_token(tmp_path / "missing", env, where="admin_token_file")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"admin_token_file: .* is empty"):
        load_admin_token(tmp_path / "empty", env, where="admin_token_file")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cert_file": "a.pem"}, r"tls\.key_file: cert_file and key_file go together"),
        ({"key_file": "a.key"}, r"tls\.cert_file: cert_file and key_file go together"),
        ({"require_client_cert": True}, r"tls\.ca_file: require_client_cert needs"),
        ({"require_client_cert": "yes"}, r"tls\.require_client_cert: must be true or false"),
        ({"ca_file": 3}, r"tls\.ca_file: must be a string"),
        ({"bogus": 1}, r"tls\.bogus: unknown field"),
        ("on", r"tls: must be a mapping"),
    ],
)
def test_tls_config_errors_name_the_field(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tls_from_mapping(data, "tls")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tls": {"ca_file": "ca.pem"}}, r"^tls\.cert_file: a TLS server needs"),
        ({"tls": {"cert_file": "a", "key_file": "b", "server_name": "x"}}, r"tls\.server_name"),
        (
            {"triton_tls": {"ca_file": "ca", "require_client_cert": True}},
            r"^triton_tls\.require_client_cert: only for a listening port",
        ),
        ({"admin_identities": ["ops-admin"]}, r"^admin_identities: needs tls\.require_client"),
        ({"admin_identities": [""]}, r"^admin_identities\[0\]: must be a non-empty string"),
        ({"admin_token_file": 5}, r"^admin_token_file: must be a file path"),
        ({"shutdown_grace_s": -1}, r"^shutdown_grace_s: must be a finite number >= 0"),
        ({"max_message_bytes": 0}, r"^max_message_bytes: must be an integer > 0"),
    ],
)
def test_router_config_security_errors_name_the_field(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_router_config(data)


def test_unreadable_cert_file_is_a_config_error(tmp_path: Path) -> None:
    tls = TlsConfig(cert_file=str(tmp_path / "no.pem"), key_file=str(tmp_path / "no.key"))
    with pytest.raises(ConfigError, match=r"tls\.key_file: cannot read"):
        tls.server_credentials()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_router(pki: Pki) -> Iterator[RouterServer]:
    """A router with no instances that requires client certs and admits ops-admin."""
    config = parse_router_config(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "tls": {
                "cert_file": str(pki.server.cert),
                "key_file": str(pki.server.key),
                "ca_file": str(pki.ca),
                "require_client_cert": True,
            },
            "admin_identities": ["ops-admin"],
        }
    )
    loop = LoopThread()
    router = loop.run(start_router(config, registry=CollectorRegistry(), admin_auth=None))
    try:
        yield router
    finally:
        loop.run(router.stop(0))
        loop.close()


def _reload(router: RouterServer, pki: Pki, cert: str) -> grpc.StatusCode:
    pair = {"admin": pki.client, "intruder": pki.other_client}.get(cert)
    tls = TlsConfig(
        ca_file=str(pki.ca),
        cert_file=str(pair.cert) if pair else "",
        key_file=str(pair.key) if pair else "",
    )
    with sync_channel(f"127.0.0.1:{router.port}", tls) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        ("admin", grpc.StatusCode.OK),
        ("intruder", grpc.StatusCode.PERMISSION_DENIED),
        ("none", grpc.StatusCode.UNAVAILABLE),  # mutual TLS: no handshake without a cert
    ],
)
def test_mtls_identity_admits_admin_calls(
    mtls_router: RouterServer, pki: Pki, cert: str, expected: grpc.StatusCode
) -> None:
    assert _reload(mtls_router, pki, cert) == expected


def test_read_only_calls_need_no_admin_identity(mtls_router: RouterServer, pki: Pki) -> None:
    tls = TlsConfig(
        ca_file=str(pki.ca),
        cert_file=str(pki.other_client.cert),
        key_file=str(pki.other_client.key),
    )
    with sync_channel(f"127.0.0.1:{mtls_router.port}", tls) as channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        policy = stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
        assert policy.policy_version


def test_config_files_take_cert_paths_relative_to_the_file(tmp_path: Path) -> None:
    from router.config import load_router_config
    from sidecar.config import load_config

    router_file = tmp_path / "router.yaml"
    router_file.write_text(
        "tls: {cert_file: certs/r.pem, key_file: /abs/r.key}\n"
        "triton_tls: {ca_file: ca.pem}\n"
        "admin_token_file: secrets/token\n"
    )
    router = load_router_config(router_file)
    assert router.tls.cert_file == str(tmp_path / "certs/r.pem")
    assert router.tls.key_file == "/abs/r.key"
    assert router.triton_tls.ca_file == str(tmp_path / "ca.pem")
    assert router.admin_token_file == tmp_path / "secrets/token"

    sidecar_file = tmp_path / "sidecar.yaml"
    sidecar_file.write_text(
        "router_tls: {ca_file: ca.pem, server_name: router.internal}\n"
        "triton_tls: {ca_file: /etc/ca.pem}\n"
    )
    sidecar = load_config(sidecar_file)
    assert sidecar.router_tls.ca_file == str(tmp_path / "ca.pem")
    assert sidecar.router_tls.server_name == "router.internal"
    assert sidecar.triton_tls.ca_file == "/etc/ca.pem"
    assert not sidecar.tls.enabled
