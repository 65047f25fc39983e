"""Who may call admin RPCs: a bearer token or an allowed mTLS identity.

Admin RPCs change what the fleet does (the router's ReloadPolicy today); read-only RPCs stay
open. `AdminAuthInterceptor` guards the admin methods of a grpc.aio server, and the decision
itself is the pure function `authorize`:

    caller sends `authorization: Bearer T`  T == the configured token        -> allowed
                                             anything else                    -> UNAUTHENTICATED
    caller's verified client cert (mTLS)     CN or a SAN on admin_identities  -> allowed
                                             not on the list                  -> PERMISSION_DENIED
    neither token nor identities configured  server bound to loopback only,
                                             and the caller on loopback       -> allowed
                                             otherwise                        -> PERMISSION_DENIED
    credentials configured, caller brings none                                -> UNAUTHENTICATED

Without credentials the server's own binding is required to be loopback, not only the caller's
address: behind a local proxy (a service mesh's sidecar, a port-forward) remote callers arrive
from 127.0.0.x too, while a server bound to loopback can only be reached from its own host.

Tokens are compared with `hmac.compare_digest` and never logged or put in an error message.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pointsman.errors import (
    ConfigError,
    PermissionDeniedError,
    PointsmanError,
    UnauthenticatedError,
)

__all__ = [
    "ADMIN_TOKEN_ENV",
    "AdminAuth",
    "AdminAuthInterceptor",
    "authorize",
    "bearer_metadata",
    "is_loopback_host",
    "is_loopback_peer",
    "load_admin_token",
    "peer_identities",
]

log = logging.getLogger(__name__)

# The environment variable a token may come from when no token file is configured.
ADMIN_TOKEN_ENV = "POINTSMAN_ADMIN_TOKEN"
_AUTHORIZATION = "authorization"
_BEARER = "bearer "


@dataclass(frozen=True)
class AdminAuth:
    """What admits an admin call. Empty token and identities: nobody, unless the server
    is bound to loopback only (then callers on this host)."""

    # The shared secret; repr=False keeps it out of logs and tracebacks.
    token: str = field(default="", repr=False)
    # Client-certificate names (CN or SAN) admitted without a token; needs mutual TLS.
    identities: frozenset[str] = frozenset()
    # True when the server listens on a loopback address only (see `is_loopback_host`).
    loopback_listener: bool = False

    @property
    def open_on_loopback(self) -> bool:
        """No credentials configured: only callers on this host are admitted."""
        return not self.token and not self.identities


def load_admin_token(
    token_file: str | Path | None, environ: Mapping[str, str] = os.environ, *, where: str
) -> str:
    """The token from `token_file` (first line, trimmed) or else $POINTSMAN_ADMIN_TOKEN."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"{where}: cannot read {str(token_file)!r}: {error.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"{where}: {str(token_file)!r} is empty")
        return token
    return environ.get(ADMIN_TOKEN_ENV, "").strip()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (none for an empty token)."""
    return ((_AUTHORIZATION, f"Bearer {token}"),) if token else ()


def _bearer_of(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key.lower() == _AUTHORIZATION:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            return text[len(_BEARER) :].strip() if text.lower().startswith(_BEARER) else ""
    return None


def peer_identities(auth_context: Mapping[str, Sequence[bytes]]) -> frozenset[str]:
    """CN and SANs of the caller's certificate, as gRPC verified them (empty without mTLS)."""
    names = [
        *auth_context.get("x509_common_name", ()),
        *auth_context.get("x509_subject_alternative_name", ()),
    ]
    return frozenset(n.decode(errors="replace") for n in names)


def is_loopback_host(listen: str) -> bool:
    """Whether a listen address (host:port) binds loopback only: 127.x.x.x, localhost, ::1."""
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def is_loopback_peer(peer: str) -> bool:
    """gRPC's peer string: ipv4:127.x.x.x:port, ipv6:[::1]:port or unix:path."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))


def authorize(
    auth: AdminAuth,
    *,
    metadata: Iterable[tuple[str, str | bytes]],
    identities: frozenset[str],
    peer: str,
    method: str,
) -> PointsmanError | None:
    """None when the call is admitted, else the error to answer it with."""
    bearer = _bearer_of(metadata)
    if bearer is not None and auth.token:
        if hmac.compare_digest(bearer.encode(), auth.token.encode()):
            return None
        return UnauthenticatedError(f"{method}: the bearer token does not match")
    if identities & auth.identities:
        return None
    if auth.open_on_loopback:
        if auth.loopback_listener and is_loopback_peer(peer):
            return None
        return PermissionDeniedError(
            f"{method} is an admin RPC: with no admin token or identities configured it is "
            "only accepted on a server bound to loopback, from this host"
        )
    if identities and auth.identities:
        return PermissionDeniedError(
            f"{method}: client certificate {sorted(identities)} is not on admin_identities"
        )
    return UnauthenticatedError(
        f"{method} is an admin RPC: send 'authorization: Bearer <token>'"
        + (" or a client certificate on admin_identities" if auth.identities else "")
    )


_Behavior = Callable[..., Any]


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls of `admin_methods` (full paths, /package.Service/Method) that
    `authorize` does not admit; every other method passes untouched.

    `trust_peer_certs` must be True only when the port requires verified client certificates
    (mutual TLS): otherwise a certificate name proves nothing.
    """

    def __init__(
        self, auth: AdminAuth, admin_methods: Iterable[str], *, trust_peer_certs: bool
    ) -> None:
        self._auth = auth
        self._methods = frozenset(admin_methods)
        self._trust_peer_certs = trust_peer_certs

    def _refusal(self, context: grpc.aio.ServicerContext, method: str) -> PointsmanError | None:
        identities = (
            peer_identities(context.auth_context()) if self._trust_peer_certs else frozenset()
        )
        return authorize(
            self._auth,
            metadata=context.invocation_metadata() or (),
            identities=identities,
            peer=context.peer(),
            method=method.rsplit("/", 1)[-1],
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method not in self._methods:
            return handler
        return _guarded(handler, lambda context: self._refusal(context, method))


def _guarded(
    handler: grpc.RpcMethodHandler,
    refusal: Callable[[grpc.aio.ServicerContext], PointsmanError | None],
) -> grpc.RpcMethodHandler:
    """`handler` with the check in front, for whichever of the four kinds it is."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        error = refusal(context)
        if error is not None:
            # Who was refused and why, never what they sent (it may be a near-miss token).
            log.warning("refused admin call from %s: %s", context.peer(), error.code.name)
            await context.abort(error.code, str(error))

    kinds: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler], bool], ...] = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attribute, make, streams_out in kinds:
        inner: _Behavior | None = getattr(handler, attribute)
        if inner is None:
            continue
        behavior = _streaming(inner, check) if streams_out else _single(inner, check)
        return make(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _single(
    inner: _Behavior, check: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> _Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        return await inner(request, context)

    return behavior


def _streaming(
    inner: _Behavior, check: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> _Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        async for response in inner(request, context):
            yield response

    return behavior
