"""Stage 1 of an inference call: its head, read from the raw bytes and the call's metadata.

Everything later stages need to know about a call, read once: the model name, version and
request id from the top-level protobuf fields (`sidecar.wire`, no parse, tensors never looked
at), and from ONE pass over the metadata the request id and priority class headers, the
version pin, and the metadata to forward to Triton (hop-by-hop keys dropped). Nothing here
depends on the route tables or the config: the head is what the caller said.

Two more things for affinity (issue 12): the session header (its name is the router's policy,
so the caller passes it) is one more key in the same metadata pass, and a sequence's id and
start/end flags are read from the parameters (`sidecar.sequence_wire`) only when the walk of
the top-level fields saw some: a request without parameters pays nothing for sequences. A
prompt prefix (issue 14) is a peek of the same bytes, lazily, for models whose route asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from pointsman.errors import DeadlineExpiredError
from pointsman.versions import PIN_HEADER
from sidecar.sequence_wire import SequenceStep, peek_sequence
from sidecar.upstream import Metadata
from sidecar.wire import peek_model, peek_request

__all__ = [
    "PRIORITY_HEADER",
    "REQUEST_ID_HEADER",
    "CallHead",
    "Context",
    "forward_metadata",
    "read_head",
    "time_left",
]

# grpc ships no type hints, so this is Any to mypy; it names what handlers receive.
Context: TypeAlias = grpc.aio.ServicerContext

PRIORITY_HEADER = "x-priority"
REQUEST_ID_HEADER = "x-request-id"
# Keys that describe one HTTP/2 hop, not the request: grpc sets its own for the next hop.
_HOP_BY_HOP = frozenset({"user-agent", "content-type", "te"})


class CallHead:
    """What one inference call asks for, as read from its bytes and metadata."""

    __slots__ = ("forward", "metadata", "model", "pinned_version", "priority", "request_id",
                 "sequence", "session", "version")  # fmt: skip

    def __init__(
        self,
        model: str,
        version: str,
        request_id: str,
        priority: str,
        pinned_version: str | None,
        metadata: Sequence[tuple[str, Any]],
        forward: Metadata,
        sequence: SequenceStep | None = None,
        session: str = "",
    ) -> None:
        self.model = model
        # The version the request names; "" for none (the decision stage may choose one).
        self.version = version
        # `x-request-id`, else the request's own `id`; "" for none (then no idempotency).
        self.request_id = request_id
        # The `x-priority` class name; "" for none (the policy's default class).
        self.priority = priority
        # The first `x-model-version` header, None without one.
        self.pinned_version = pinned_version
        # The caller's metadata as it came, and the part of it that goes on to Triton.
        self.metadata = metadata
        self.forward = forward
        # The request's place in a Triton sequence; None for a request outside any.
        self.sequence = sequence
        # The session header's value; "" for none (or session affinity off).
        self.session = session

    def headers(self) -> dict[str, str]:
        """The caller's text metadata, for the policy's header rules (built when asked)."""
        return {key: value for key, value in self.metadata if isinstance(value, str)}


def read_head(
    request: bytes,
    metadata: Sequence[tuple[str, Any]] | None,
    *,
    with_id: bool = True,
    session_header: str = "",
) -> CallHead:
    """The head of a call whose (first) request is `request`; raises InvalidRequestError for
    malformed bytes or sequence parameters. `with_id`: read the request's `id` too (a stream's
    first message is routed by its model alone). `session_header`: the metadata key naming a
    session ("" none)."""
    if with_id:
        name, version, body_id, parameters_at = peek_request(request)
        sequence = None if parameters_at < 0 else peek_sequence(request, parameters_at)
    else:
        (name, version), body_id = peek_model(request), ""
        sequence = peek_sequence(request)
    request_id = priority = session = ""
    pinned: str | None = None
    forward: list[tuple[str, Any]] = []
    for item in metadata or ():
        key = item[0]
        if _hop_local(key):
            continue
        forward.append(item)
        if key[0] == "x" and isinstance(item[1], str):
            if key == REQUEST_ID_HEADER:
                request_id = item[1]
            elif key == PRIORITY_HEADER:
                priority = item[1]
            elif key == PIN_HEADER and pinned is None:
                pinned = item[1]
        if key == session_header and isinstance(item[1], str):
            session = item[1]
    return CallHead(
        name,
        version,
        request_id or body_id,
        priority,
        pinned,
        metadata or (),
        tuple(forward),
        sequence,
        session,
    )


def forward_metadata(metadata: Sequence[tuple[str, Any]] | None) -> Metadata:
    """The caller's metadata minus hop-by-hop and reserved keys, for an upstream call."""
    if not metadata:
        return ()
    return tuple(item for item in metadata if not _hop_local(item[0]))


def _hop_local(key: str) -> bool:
    """Whether a metadata key belongs to this hop (grpc sets its own for the next one)."""
    return key in _HOP_BY_HOP or key[0] == ":" or key.startswith("grpc-")


def time_left(context: Context) -> float | None:
    """The caller's remaining time (None: no deadline). Raises DeadlineExpiredError once it
    has passed: a request whose caller has given up is never sent, since Triton would run it
    anyway."""
    timeout: float | None = context.time_remaining()
    if timeout is not None and timeout <= 0:
        raise DeadlineExpiredError("deadline expired before the request was sent")
    return timeout
