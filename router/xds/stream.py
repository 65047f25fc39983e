"""One ADS stream's state machine (state of the world, xDS v3): no I/O, no grpc.

Per resource type the client subscribes to some names; the stream answers with every
subscribed resource that exists (all of them, every time: a Listener or Cluster missing from a
response does not exist, which is how a client learns that `xds:///nosuchmodel` names nothing).
Each response carries the type's version and a fresh nonce. The client then sends a request
that quotes the nonce:

- no error_detail: an ACK of `version_info`;
- error_detail set: a NACK. Nothing is re-sent for it: the same resources would be refused
  again, so a client that keeps NACKing gets no answer until the resources change (no storm);
- a nonce that is not the type's latest: stale (the client had not seen our newer response
  yet); ignored, the client will answer the newer one.

A request without a nonce (the first of a type) always gets a response, even an empty one. A
response is also sent when the subscribed names change, and when a subscribed resource
changes in the cache (`on_change`). On LDS and CDS, no names on the first request, or "*",
subscribes to everything (the wildcard).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from envoy.service.discovery.v3 import discovery_pb2

from pointsman.errors import InvalidRequestError
from router.xds.cache import Versioned
from router.xds.resources import CLUSTER_TYPE, LISTENER_TYPE

__all__ = ["MAX_NAMES", "MAX_TYPES", "AdsStream", "RequestKind", "ResourceView"]

# Bounds on what one stream may subscribe to: far above any real client, far below harm.
MAX_NAMES = 10_000
MAX_TYPES = 16
_WILDCARD_TYPES = frozenset({LISTENER_TYPE, CLUSTER_TYPE})


class ResourceView(Protocol):
    """What a stream reads of the cache."""

    def resources(self, type_url: str) -> Mapping[str, Versioned]: ...

    def version(self, type_url: str) -> str: ...


class RequestKind(enum.Enum):
    SUBSCRIBE = "subscribe"  # no nonce: the first request of a type
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # quotes an older nonce: ignored


@dataclass
class _Subscription:
    names: frozenset[str] = frozenset()
    wildcard: bool = False
    named_once: bool = False
    nonce: str = ""  # latest nonce sent for this type
    # What the latest response held (name -> resource version) and for which names.
    sent: dict[str, int] | None = None
    sent_for: tuple[frozenset[str], bool] | None = None
    acked_version: str = ""
    last_nack: str = ""


@dataclass
class AdsStream:
    """The stream's subscriptions; `on_request` and `on_change` return what to send."""

    view: ResourceView
    _subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    _nonces: int = 0

    def on_request(self, request: Any) -> tuple[RequestKind, list[Any]]:
        """Handles one DiscoveryRequest: (what kind it was, the responses to send).
        Raises InvalidRequestError for a request no ADS client may send."""
        type_url = request.type_url
        if not type_url:
            raise InvalidRequestError("DiscoveryRequest.type_url is required on an ADS stream")
        if len(request.resource_names) > MAX_NAMES:
            raise InvalidRequestError(
                f"{len(request.resource_names)} resource names in one request; at most {MAX_NAMES}"
            )
        subscription = self._subscriptions.get(type_url)
        if subscription is None:
            if len(self._subscriptions) >= MAX_TYPES:
                raise InvalidRequestError(f"more than {MAX_TYPES} resource types on one stream")
            subscription = self._subscriptions[type_url] = _Subscription()
        nonce = request.response_nonce
        if nonce and nonce != subscription.nonce:
            return RequestKind.STALE, []
        if not nonce:
            kind = RequestKind.SUBSCRIBE
        elif request.HasField("error_detail"):
            kind = RequestKind.NACK
            subscription.last_nack = request.error_detail.message
        else:
            kind = RequestKind.ACK
            subscription.acked_version = request.version_info
        self._subscribe(type_url, subscription, frozenset(request.resource_names))
        return kind, self._respond(type_url, subscription, always=not nonce)

    def on_change(self) -> list[Any]:
        """Responses for every type whose subscribed resources changed in the cache."""
        responses: list[Any] = []
        for type_url, subscription in self._subscriptions.items():
            if subscription.sent is not None:
                responses += self._respond(type_url, subscription, always=False)
        return responses

    def last_nack(self, type_url: str) -> str:
        subscription = self._subscriptions.get(type_url)
        return subscription.last_nack if subscription else ""

    def acked_version(self, type_url: str) -> str:
        subscription = self._subscriptions.get(type_url)
        return subscription.acked_version if subscription else ""

    @staticmethod
    def _subscribe(type_url: str, subscription: _Subscription, names: frozenset[str]) -> None:
        subscription.named_once |= bool(names - {"*"})
        subscription.wildcard = "*" in names or (
            type_url in _WILDCARD_TYPES and not names and not subscription.named_once
        )
        subscription.names = names - {"*"}

    def _respond(self, type_url: str, subscription: _Subscription, *, always: bool) -> list[Any]:
        available = self.view.resources(type_url)
        chosen = {
            name: item.version
            for name, item in available.items()
            if subscription.wildcard or name in subscription.names
        }
        wanted = (subscription.names, subscription.wildcard)
        if not always and chosen == subscription.sent and wanted == subscription.sent_for:
            return []
        self._nonces += 1
        subscription.nonce = str(self._nonces)
        subscription.sent, subscription.sent_for = chosen, wanted
        return [
            discovery_pb2.DiscoveryResponse(
                version_info=self.view.version(type_url),
                resources=[available[name].resource for name in sorted(chosen)],
                type_url=type_url,
                nonce=subscription.nonce,
            )
        ]
