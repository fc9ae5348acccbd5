"""Calls the proxy answers itself: the method table and the error edge.

Handlers are thin async functions `(Call) -> response message bytes`. This is
the one place where domain errors become a gRPC status, and where an
unexpected exception is turned into a fixed message for the peer (the
traceback goes to the log only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from shim.errors import DeadlineExceeded, Internal, ShimError
from shim.peer import Peer
from shim.proxy import grpcwire

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "criu-shim: internal error (details are in the criu-shim log)"


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    request: bytes
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    peer: Peer


Handler = Callable[[Call], Awaitable[bytes]]


class Dispatcher:
    def __init__(self, handlers: Mapping[str, Handler], count: Callable[[str, bool], None] | None = None) -> None:
        self._handlers = dict(handlers)
        # Told (method, answered here) once per call: the splice asks once per new request stream.
        self._count = count

    def intercepts(self, method: str) -> bool:
        answered = method in self._handlers
        if self._count is not None:
            self._count(method, answered)
        return answered

    async def call(self, method: str, body: bytes, metadata: tuple[tuple[str, str], ...],
                   timeout: float | None, peer: Peer) -> bytes:
        """Run the handler for `method`; raises only `ShimError`."""
        try:
            call = Call(method, grpcwire.decode_unary(body), metadata, timeout, peer)
            async with asyncio.timeout(timeout):
                return await self._handlers[method](call)
        except ShimError:
            raise
        except TimeoutError:
            raise DeadlineExceeded("context deadline exceeded") from None
        except Exception:
            log.exception("handler for %s failed unexpectedly", method)
            raise Internal(INTERNAL_MESSAGE) from None
