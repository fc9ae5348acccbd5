"""Who is on the other end of a unix socket: the kernel's SO_PEERCRED answer, parsed once here.

The CRI proxy records it for the audit line of each checkpoint and restore; the ttrpc relay
admits only its own uid. Both read it through `credentials()`.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

# struct ucred: pid_t pid; uid_t uid; gid_t gid (three C ints on Linux).
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    """Credentials of the process on the other end of a unix socket (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


# What the proxy records when the kernel would not say (not a unix socket, already closed).
UNKNOWN = Peer(0, -1, -1)


def credentials(sock: object) -> Peer | None:
    """The peer of `sock` (a socket object as asyncio transports hand it out), None when unknown."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)
