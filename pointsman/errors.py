"""One error hierarchy for the whole project, mapped to gRPC status in one place.

    PointsmanError                 UNKNOWN
     ├── InvalidRequestError       INVALID_ARGUMENT   malformed bytes, missing model name
     ├── ModelNotFoundError        NOT_FOUND          no instance's repository knows the model
     ├── NoReadyInstanceError      UNAVAILABLE        the model exists but nothing can serve it
     ├── DeadlineExpiredError      DEADLINE_EXCEEDED  not sent: Triton would run it anyway
     ├── OverloadedError           RESOURCE_EXHAUSTED too much in flight; retry later
     ├── NotSupportedError         UNIMPLEMENTED      an RPC the sidecar deliberately refuses
     ├── ManagedByRouterError      FAILED_PRECONDITION placement is the router's job
     ├── SequenceNotLiveError      FAILED_PRECONDITION no instance holds the sequence of a step
     ├── SequenceLostError         ABORTED            the instance holding a sequence failed
     ├── UnauthenticatedError      UNAUTHENTICATED    an admin RPC without a valid token
     ├── PermissionDeniedError     PERMISSION_DENIED  an admin RPC from a caller not allowed
     └── ConfigError               INVALID_ARGUMENT   a config or policy file that does not validate

Upstream (Triton) errors are not wrapped: their status code and message pass through as they are.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

__all__ = [
    "ConfigError",
    "DeadlineExpiredError",
    "InvalidRequestError",
    "ManagedByRouterError",
    "ModelNotFoundError",
    "NoReadyInstanceError",
    "NotSupportedError",
    "OverloadedError",
    "PermissionDeniedError",
    "PointsmanError",
    "SequenceLostError",
    "SequenceNotLiveError",
    "UnauthenticatedError",
    "abort",
    "status_of",
]


class PointsmanError(Exception):
    """Base of every error Pointsman raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidRequestError(PointsmanError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(PointsmanError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, model_name: str, version: str = "") -> None:
        what = f"model '{model_name}'" + (f" version '{version}'" if version else "")
        super().__init__(f"{what} is not known to any Triton instance in the fleet")
        self.model_name = model_name


class NoReadyInstanceError(PointsmanError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, model_name: str, version: str = "", detail: str = "") -> None:
        what = f"model '{model_name}'" + (f" version '{version}'" if version else "")
        msg = f"no ready Triton instance serves {what}"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.model_name = model_name


class DeadlineExpiredError(PointsmanError):
    """The caller's deadline passed before the request could be sent, so it is not sent at
    all: Triton executes queued requests even after their deadline, freeing no capacity."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class OverloadedError(PointsmanError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotSupportedError(PointsmanError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ManagedByRouterError(PointsmanError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SequenceNotLiveError(PointsmanError):
    """A step that continues a sequence (no START) which no instance holds: it never started,
    it ended, it was idle past the model's max_sequence_idle_microseconds, or its instance
    restarted. Its state, if it had any, is lost; the client must start it again."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SequenceLostError(PointsmanError):
    """A step of a live sequence whose instance failed (unreachable, or gone from the fleet):
    the sequence's state was on that instance only and is lost. Never sent elsewhere, where it
    would run without its state; the client must start the sequence again."""

    code = grpc.StatusCode.ABORTED


class UnauthenticatedError(PointsmanError):
    """An admin RPC that brings no credentials, or a token that does not match."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(PointsmanError):
    """An admin RPC from a known caller (or a remote one) that is not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ConfigError(PointsmanError):
    """A configuration that does not validate; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for any exception: ours by class, upstream RPC errors as they came."""
    if isinstance(error, PointsmanError):
        return error.code, str(error)
    if isinstance(error, grpc.RpcError):
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else None
        return code or grpc.StatusCode.UNKNOWN, details or ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """Ends the RPC with the status that `status_of` gives for `error`."""
    code, message = status_of(error)
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
