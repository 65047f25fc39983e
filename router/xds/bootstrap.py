"""The xDS bootstrap a proxyless client reads (the file $GRPC_XDS_BOOTSTRAP names).

    {"xds_servers": [{"server_uri": "router:8101", "channel_creds": [{"type": "insecure"}],
                      "server_features": ["xds_v3"]}],
     "node": {"id": "pointsman-proxyless", "cluster": "pointsman", "locality": {}}}

Several routers become several `xds_servers`: gRPC uses the first and falls back to the next
when it cannot reach it (gRFC A71, grpcio >= 1.67). A router that serves TLS is reached with
the `tls` channel credentials of gRFC A65 (grpcio >= 1.65): the CA that signed the router's
certificate, and a client certificate and key when the router requires mutual TLS.

When Triton serves TLS (the router's `triton_tls`), Clusters ask for upstream TLS with the
certificates of the bootstrap's `certificate_providers` entry UPSTREAM_CERTIFICATES (a
file_watcher, gRFC A29); the client's channel must use xDS credentials:
`InferenceServerClient("xds:///MODEL", creds=grpc.xds_channel_credentials(
grpc.experimental.insecure_channel_credentials()))` (the fallback: used when a Cluster
asks for no TLS).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.xds.resources import UPSTREAM_CERTIFICATES

__all__ = ["BootstrapTls", "bootstrap", "bootstrap_json", "write_bootstrap"]

DEFAULT_NODE_ID = "pointsman-proxyless"


@dataclass(frozen=True, slots=True)
class BootstrapTls:
    """How a client reaches a router that serves TLS (all paths as the client sees them)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def file_watcher(self) -> dict[str, str]:
        """The file_watcher configuration of A29 and A65 (only the files that are set)."""
        return {
            key: value
            for key, value in (
                ("ca_certificate_file", self.ca_file),
                ("certificate_file", self.cert_file),
                ("private_key_file", self.key_file),
            )
            if value
        }

    def channel_creds(self) -> dict[str, Any]:
        return {"type": "tls", "config": self.file_watcher()}


def bootstrap(
    routers: Sequence[str],
    *,
    tls: BootstrapTls | None = None,
    triton_tls: BootstrapTls | None = None,
    node_id: str = DEFAULT_NODE_ID,
) -> dict[str, Any]:
    """The bootstrap for clients of `routers` (host:port each, the first preferred); `tls`
    reaches routers that serve TLS, `triton_tls` holds the files that verify Triton (and
    identify the client to it) when the Clusters ask for upstream TLS."""
    if not routers:
        raise ValueError("an xDS bootstrap needs at least one router address")
    creds = tls.channel_creds() if tls is not None else {"type": "insecure"}
    document: dict[str, Any] = {
        "xds_servers": [
            {"server_uri": router, "channel_creds": [creds], "server_features": ["xds_v3"]}
            for router in routers
        ],
        "node": {"id": node_id, "cluster": "pointsman", "locality": {}},
    }
    if triton_tls is not None:
        provider = {"plugin_name": "file_watcher", "config": triton_tls.file_watcher()}
        document["certificate_providers"] = {UPSTREAM_CERTIFICATES: provider}
    return document


def bootstrap_json(
    routers: Sequence[str],
    *,
    tls: BootstrapTls | None = None,
    triton_tls: BootstrapTls | None = None,
    node_id: str = DEFAULT_NODE_ID,
) -> str:
    document = bootstrap(routers, tls=tls, triton_tls=triton_tls, node_id=node_id)
    return json.dumps(document, indent=2) + "\n"


def write_bootstrap(
    path: Path,
    routers: Sequence[str],
    *,
    tls: BootstrapTls | None = None,
    triton_tls: BootstrapTls | None = None,
) -> Path:
    path.write_text(bootstrap_json(routers, tls=tls, triton_tls=triton_tls))
    return path
