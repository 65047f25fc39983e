"""The xDS bootstrap a proxyless client reads (the file $GRPC_XDS_BOOTSTRAP names).

    {"xds_servers": [{"server_uri": "router:8101", "channel_creds": [{"type": "insecure"}],
                      "server_features": ["xds_v3"]}],
     "node": {"id": "pointsman-proxyless", "cluster": "pointsman", "locality": {}}}

Several routers become several `xds_servers`: gRPC uses the first and falls back to the next
when it cannot reach it (gRFC A71, grpcio >= 1.67). A router that serves TLS is reached with
the `tls` channel credentials of gRFC A65 (grpcio >= 1.65): the CA that signed the router's
certificate, and a client certificate and key when the router requires mutual TLS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BootstrapTls", "bootstrap", "bootstrap_json", "write_bootstrap"]

DEFAULT_NODE_ID = "pointsman-proxyless"


@dataclass(frozen=True, slots=True)
class BootstrapTls:
    """How a client reaches a router that serves TLS (all paths as the client sees them)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def channel_creds(self) -> dict[str, Any]:
        config = {
            key: value
            for key, value in (
                ("ca_certificate_file", self.ca_file),
                ("certificate_file", self.cert_file),
                ("private_key_file", self.key_file),
            )
            if value
        }
        return {"type": "tls", "config": config}


def bootstrap(
    routers: Sequence[str], *, tls: BootstrapTls | None = None, node_id: str = DEFAULT_NODE_ID
) -> dict[str, Any]:
    """The bootstrap for clients of `routers` (host:port each, the first preferred)."""
    if not routers:
        raise ValueError("an xDS bootstrap needs at least one router address")
    creds = tls.channel_creds() if tls is not None else {"type": "insecure"}
    return {
        "xds_servers": [
            {"server_uri": router, "channel_creds": [creds], "server_features": ["xds_v3"]}
            for router in routers
        ],
        "node": {"id": node_id, "cluster": "pointsman", "locality": {}},
    }


def bootstrap_json(
    routers: Sequence[str], *, tls: BootstrapTls | None = None, node_id: str = DEFAULT_NODE_ID
) -> str:
    return json.dumps(bootstrap(routers, tls=tls, node_id=node_id), indent=2) + "\n"


def write_bootstrap(path: Path, routers: Sequence[str], *, tls: BootstrapTls | None = None) -> Path:
    path.write_text(bootstrap_json(routers, tls=tls))
    return path
