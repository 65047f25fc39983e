"""TLS and mutual TLS for every gRPC hop: one typed, frozen block per side of a hop.

A `TlsConfig` describes either the listening side of a server (`server_credentials`) or the
calling side of a channel (`channel_credentials`); the sidecar and the router each have one
for their listening port and one per outgoing hop (towards the router, towards Triton). An
empty block (no file named) means plaintext, which is the default on every hop.

    tls:                           # listening: needs cert_file and key_file
      cert_file: /etc/pointsman/server.pem
      key_file: /etc/pointsman/server.key
      ca_file: /etc/pointsman/clients-ca.pem
      require_client_cert: true    # mutual TLS: callers must present a cert signed by ca_file
    triton_tls:                    # calling: ca_file verifies the server (system roots if empty)
      ca_file: /etc/pointsman/triton-ca.pem
      cert_file: /etc/pointsman/client.pem   # with key_file: our identity for mutual TLS
      key_file: /etc/pointsman/client.key
      server_name: triton.internal # check the server's cert for this name, not the address's

Files are read when credentials are built (at start-up), so a missing or unreadable file is a
ConfigError naming the field before anything listens. A block is read by the one config reader
(pointsman/config/); file paths written in a config file are relative to that file.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pointsman.config import flag_dest, read_fields, rule, with_flags
from pointsman.errors import ConfigError

__all__ = [
    "TlsConfig",
    "add_port",
    "add_tls_arguments",
    "aio_channel",
    "channel_options",
    "check_calling",
    "check_listening",
    "sync_channel",
    "tls_from_args",
    "tls_from_mapping",
]


@dataclass(frozen=True)
class TlsConfig:
    """One side of one hop. `where` names the config block in error messages."""

    # PEM certificate chain presented to the peer (server cert, or client cert for mTLS).
    cert_file: str = dataclasses.field(default="", metadata=rule(file=True))
    # PEM private key of cert_file.
    key_file: str = dataclasses.field(default="", metadata=rule(file=True))
    # PEM CA bundle that verifies the peer: on a server, the client certs (mTLS); on a
    # channel, the server cert (empty: the system's roots).
    ca_file: str = dataclasses.field(default="", metadata=rule(file=True))
    # Listening side only: refuse callers without a client cert signed by ca_file.
    require_client_cert: bool = False
    # Calling side only: the name the server's cert must carry, when it is not the host
    # part of the address (e.g. dialling 127.0.0.1 a cert issued to triton.internal).
    server_name: str = ""
    where: str = dataclasses.field(default="tls", compare=False, metadata=rule(skip=True))

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file", "server_name"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{self.where}.{name}: must be a string")
        if not isinstance(self.require_client_cert, bool):
            raise ConfigError(f"{self.where}.require_client_cert: must be true or false")
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise ConfigError(f"{self.where}.{missing}: cert_file and key_file go together")
        if self.require_client_cert and not self.ca_file:
            raise ConfigError(
                f"{self.where}.ca_file: require_client_cert needs the CA that signs client certs"
            )

    @property
    def enabled(self) -> bool:
        """True when this hop speaks TLS (any certificate or CA named)."""
        return bool(self.cert_file or self.ca_file or self.server_name)

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise ConfigError(
                f"{self.where}.{name}: cannot read {path!r}: {error.strerror}"
            ) from None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a listening port; ConfigError without cert and key."""
        if not self.cert_file:
            raise ConfigError(f"{self.where}.cert_file: a TLS server needs cert_file and key_file")
        key, chain = self._read("key_file"), self._read("cert_file")
        assert key is not None and chain is not None  # both named, checked above
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=self._read("ca_file"),
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a channel: verifies the server, presents our cert if named."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("ca_file"),
            private_key=self._read("key_file"),
            certificate_chain=self._read("cert_file"),
        )


def channel_options(tls: TlsConfig | None) -> tuple[tuple[str, Any], ...]:
    """Channel options TLS needs (the server name override), empty for plaintext."""
    if tls is None or not tls.server_name:
        return ()
    return (("grpc.ssl_target_name_override", tls.server_name),)


def aio_channel(
    address: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: TLS when `tls` is enabled, else plaintext."""
    if tls is None or not tls.enabled:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=(*options, *channel_options(tls))
    )


def sync_channel(
    address: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """The blocking twin of `aio_channel`, for command-line clients."""
    if tls is None or not tls.enabled:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(
        address, tls.channel_credentials(), options=(*options, *channel_options(tls))
    )


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Binds `address` with TLS when `tls` is enabled; the bound port (0: could not bind)."""
    if tls is None or not tls.enabled:
        port: int = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.server_credentials())
    return port


def tls_from_mapping(data: object, where: str) -> TlsConfig:
    """A TlsConfig from parsed YAML (None: plaintext); errors name `where.field`."""
    if isinstance(data, TlsConfig):
        return dataclasses.replace(data, where=where)
    return TlsConfig(**read_fields(TlsConfig, data, where), where=where)


def check_listening(tls: TlsConfig) -> None:
    """A listening port's block: TLS needs our own cert; server_name has no meaning."""
    if tls.enabled and not tls.cert_file:
        raise ConfigError(f"{tls.where}.cert_file: a TLS server needs cert_file and key_file")
    if tls.server_name:
        raise ConfigError(f"{tls.where}.server_name: only for outgoing channels")


def check_calling(tls: TlsConfig) -> None:
    """An outgoing hop's block: require_client_cert is for servers only."""
    if tls.require_client_cert:
        raise ConfigError(f"{tls.where}.require_client_cert: only for a listening port")


_FLAG_FIELDS = (
    ("cert", "cert_file", "FILE", "PEM certificate chain we present"),
    ("key", "key_file", "FILE", "PEM private key of that certificate"),
    ("ca", "ca_file", "FILE", "PEM CA bundle that verifies the peer"),
)


def add_tls_arguments(
    parser: argparse.ArgumentParser, prefix: str, hop: str, *, listening: bool
) -> None:
    """Flags --PREFIX-cert/-key/-ca, plus --PREFIX-require-client-cert on a listening port
    or --PREFIX-server-name on a channel; `hop` says which connection in the help text. They
    set the config block named like the prefix (--triton-tls-ca: `triton_tls.ca_file`), laid
    over the config file by `pointsman.config.with_flags`."""
    block = prefix.replace("-", "_")
    group = parser.add_argument_group(f"TLS of {hop}")
    for suffix, name, metavar, text in _FLAG_FIELDS:
        group.add_argument(
            f"--{prefix}-{suffix}", dest=flag_dest(f"{block}.{name}"), metavar=metavar, help=text
        )
    if listening:
        group.add_argument(
            f"--{prefix}-require-client-cert",
            dest=flag_dest(f"{block}.require_client_cert"),
            action="store_true",
            default=None,
            help="mutual TLS: refuse callers without a client certificate signed by the CA",
        )
    else:
        group.add_argument(
            f"--{prefix}-server-name",
            dest=flag_dest(f"{block}.server_name"),
            metavar="NAME",
            help="name the server's certificate must carry, if not the address's host",
        )


def tls_from_args(args: argparse.Namespace, prefix: str, where: str) -> TlsConfig:
    """The block that the flags of `add_tls_arguments(prefix)` describe, for a command that
    has no config file; errors name `where`."""
    flags = with_flags({}, args)
    return tls_from_mapping(flags.get(prefix.replace("-", "_")), where)
