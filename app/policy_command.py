"""`pointsman policy check|reload|show`: validate a policy file, or ask a router for its own."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from app.arguments import positive_seconds

__all__ = ["add_policy_parser"]


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from pointsman.errors import ConfigError
    from router.policy import load_policy

    try:
        policy = load_policy(args.file)
    except ConfigError as exc:
        message = str(exc)
        # File errors already start with the path; field errors get it in front.
        prefix = "" if message.startswith(str(args.file)) else f"{args.file}: "
        print(f"{prefix}{message}", file=sys.stderr)
        return 2
    print(f"ok {policy.version}")
    return 0


def _cmd_policy_rpc(args: argparse.Namespace) -> int:
    """`policy reload` (ReloadPolicy) and `policy show` (GetPolicy): prints the answer.

    0: answered; 2: the router refused the file (INVALID_ARGUMENT, naming the field);
    1: the router did not answer.
    """
    import grpc

    from pointsman.auth import bearer_metadata, load_admin_token
    from pointsman.errors import ConfigError
    from pointsman.router.v1 import router_pb2 as pb
    from pointsman.router.v1 import router_pb2_grpc as pb_grpc
    from pointsman.tls import sync_channel, tls_from_args

    rpc = args.policy_command
    try:
        token = load_admin_token(args.token_file, where="--token-file")
        tls = tls_from_args(args, "tls", where="--tls")
        channel = sync_channel(args.router, tls)
    except ConfigError as exc:
        print(f"pointsman policy {rpc}: {exc}", file=sys.stderr)
        return 2
    with channel:
        stub = pb_grpc.RouterServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            if rpc == "reload":
                reloaded = stub.ReloadPolicy(
                    pb.ReloadPolicyRequest(), timeout=args.timeout, metadata=bearer_metadata(token)
                )
                state = "changed" if reloaded.changed else "unchanged"
                print(f"policy {reloaded.policy_version} {state}")
            else:
                shown = stub.GetPolicy(pb.GetPolicyRequest(), timeout=args.timeout)
                loaded = (
                    time.strftime(
                        "%Y-%m-%d %H:%M:%S %Z", time.localtime(shown.loaded_unix_ms / 1000)
                    )
                    if shown.loaded_unix_ms
                    else "an unknown time"
                )
                print(f"# policy {shown.policy_version} from {shown.source}, active since {loaded}")
                print(shown.policy_yaml, end="" if shown.policy_yaml.endswith("\n") else "\n")
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                print(f"policy refused, the running policy stays: {details}", file=sys.stderr)
                return 2
            name = code.name if code is not None else "error"
            print(
                f"pointsman policy {rpc}: router {args.router}: {name}: {details}", file=sys.stderr
            )
            return 1
    return 0


def add_policy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pointsman.tls import add_tls_arguments

    policy = sub.add_parser("policy", help="check a policy file; show or reload the router's")
    actions = policy.add_subparsers(dest="policy_command", required=True)
    check = actions.add_parser(
        "check", help="validate a policy file without applying it: 'ok VERSION' or the error"
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(func=_cmd_policy_check)
    for name, help_text in (
        ("reload", "make the router read its policy file now; prints the version active"),
        ("show", "print the router's active policy and its version"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument(
            "--router", default="127.0.0.1:8101", metavar="HOST:PORT", help="the router to ask"
        )
        action.add_argument(
            "--timeout", type=positive_seconds, default=5.0, help="seconds to wait for it"
        )
        action.add_argument(
            "--token-file",
            type=Path,
            metavar="FILE",
            help="admin bearer token to send (default: $POINTSMAN_ADMIN_TOKEN, if set)",
        )
        add_tls_arguments(action, "tls", "the channel to the router", listening=False)
        action.set_defaults(func=_cmd_policy_rpc)
