"""The status a ttrpc Response carries: a gRPC code, a message, opaque details.

On the wire it is a `google.rpc.Status`. containerd maps the code back to its
errdefs (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION ...), so the code is
what matters; `shim.errors` is the one place codes are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shim.errors import Code, ShimError

__all__ = ["OK", "Code", "Status"]


@dataclass(frozen=True, slots=True)
class Status:
    """`details` are serialized `google.protobuf.Any` messages, kept but never read."""

    code: Code = Code.OK
    message: str = ""
    details: tuple[bytes, ...] = ()

    @property
    def ok(self) -> bool:
        return self.code == Code.OK

    @classmethod
    def of(cls, error: ShimError) -> Status:
        return cls(error.code, error.message)

    @classmethod
    def from_pb(cls, pb: Any) -> Status:
        """From a `google.rpc.Status`; a code outside the gRPC set reads as UNKNOWN."""
        try:
            code = Code(pb.code)
        except ValueError:
            code = Code.UNKNOWN
        return cls(code, pb.message, tuple(d.SerializeToString() for d in pb.details))

    def fill_pb(self, pb: Any) -> None:
        """Write into a `google.rpc.Status` (such as a `ttrpc.Response`'s `status` field)."""
        pb.code = self.code
        pb.message = self.message
        for raw in self.details:
            pb.details.add().ParseFromString(raw)


OK = Status()
