"""`pointsman xds-bootstrap`: the bootstrap file of proxyless gRPC clients (GRPC_XDS_BOOTSTRAP)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_xds_bootstrap_parser"]


def _cmd_xds_bootstrap(args: argparse.Namespace) -> int:
    from router.xds.bootstrap import BootstrapTls, bootstrap_json

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            print("pointsman xds-bootstrap: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        tls = BootstrapTls(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)
    triton_tls = None
    if args.triton_ca or args.triton_cert or args.triton_key:
        if bool(args.triton_cert) != bool(args.triton_key):
            print(
                "pointsman xds-bootstrap: --triton-cert and --triton-key go together",
                file=sys.stderr,
            )
            return 2
        triton_tls = BootstrapTls(
            ca_file=args.triton_ca, cert_file=args.triton_cert, key_file=args.triton_key
        )
    text = bootstrap_json(args.router, tls=tls, triton_tls=triton_tls, node_id=args.node_id)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def add_xds_bootstrap_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = sub.add_parser(
        "xds-bootstrap",
        help="print the xDS bootstrap of proxyless clients (the file GRPC_XDS_BOOTSTRAP names)",
    )
    boot.add_argument(
        "--router",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="the router's address as clients reach it; repeat for fallback replicas",
    )
    boot.add_argument("--tls-ca", default="", metavar="FILE", help="CA of the router's TLS cert")
    boot.add_argument("--tls-cert", default="", metavar="FILE", help="client cert (mutual TLS)")
    boot.add_argument("--tls-key", default="", metavar="FILE", help="key of --tls-cert")
    boot.add_argument(
        "--triton-ca",
        default="",
        metavar="FILE",
        help="CA of Triton's TLS cert, when the router has triton_tls (the client's channel "
        "then needs grpc.xds_channel_credentials)",
    )
    boot.add_argument("--triton-cert", default="", metavar="FILE", help="client cert for Triton")
    boot.add_argument("--triton-key", default="", metavar="FILE", help="key of --triton-cert")
    boot.add_argument("--node-id", default="pointsman-proxyless", help="the client's node id")
    boot.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    boot.set_defaults(func=_cmd_xds_bootstrap)
