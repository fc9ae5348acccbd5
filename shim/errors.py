"""Domain error categories, and the one place where each gets its wire status.

Domain code raises these; the RPC edges (the CRI proxy, later the ttrpc shim)
translate them to a gRPC status code exactly once. Anything else that escapes a
handler is a bug: the peer gets a fixed INTERNAL message, the log gets the
traceback (see `shim.proxy.dispatch`).
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes (shared by gRPC and ttrpc)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ShimError(Exception):
    """Base of every expected failure; `code` is what the peer sees."""

    code: Code = Code.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShimError):
    code = Code.INVALID_ARGUMENT


class NotFound(ShimError):
    code = Code.NOT_FOUND


class AlreadyExists(ShimError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ShimError):
    code = Code.FAILED_PRECONDITION


class PermissionDenied(ShimError):
    code = Code.PERMISSION_DENIED


class DeadlineExceeded(ShimError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(ShimError):
    code = Code.UNAVAILABLE


class ResourceExhausted(ShimError):
    code = Code.RESOURCE_EXHAUSTED


class Unknown(ShimError):
    """A failure of a tool we drive (CRIU, runc) whose cause is in its message.

    Code UNKNOWN on purpose: the kubelet e2e test matches
    `code = Unknown desc = CRIU binary not found or too old ...`.
    """

    code = Code.UNKNOWN


class Internal(ShimError):
    code = Code.INTERNAL


class Upstream(ShimError):
    """containerd's own error, relayed with its code and message unchanged."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
