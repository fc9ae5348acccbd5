"""The nodes' mutual TLS: one policy for every connection between two nodes' criu-shim.

Both ends present a node certificate of the cluster's CA and check the other's; TLS 1.3 only.
Used by the migration channel (shim.migrate.channel: control connection, archive, page tunnel)
and by the target's page daemon, which fetches a lazy migration's memory from the source's page
end itself (shim.restore.remote_pages). A page connection is also pinned to one certificate:
the one the other node showed on the migration's control connection (`digest`).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition


@dataclass(frozen=True)
class Credentials:
    """A node's certificate and key, and the CA its peers' certificates must chain to."""

    cert: Path
    key: Path
    ca: Path


def context(purpose: ssl.Purpose, creds: Credentials) -> ssl.SSLContext:
    """TLS 1.3, our certificate presented, the peer's required and checked against the CA: the
    cluster's CA alone. (ssl.create_default_context also loads the system's CA store: a peer
    with a certificate of any public CA would have passed, and reading the store took ~40 ms.)"""
    server = purpose == ssl.Purpose.CLIENT_AUTH
    made = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    made.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        made.load_verify_locations(cafile=str(creds.ca))
        made.load_cert_chain(str(creds.cert), str(creds.key))
    except (OSError, ssl.SSLError) as exc:  # never echo key material, only which file
        raise FailedPrecondition(f"cannot load the node certificate {creds.cert} / key {creds.key} / CA "
                                 f"{creds.ca}: {exc.__class__.__name__}: {getattr(exc, 'strerror', None) or exc}"
                                 ) from None
    made.verify_mode = ssl.CERT_REQUIRED
    return made


def server_context(creds: Credentials) -> ssl.SSLContext:
    """The accepting side: clients must present a certificate of the CA."""
    return context(ssl.Purpose.CLIENT_AUTH, creds)


def client_context(creds: Credentials, *, check_hostname: bool = True) -> ssl.SSLContext:
    """The dialling side: the server's certificate must chain to the CA and, with `check_hostname`,
    name the address dialled (an IP SAN). A pinned connection checks `digest` instead."""
    made = context(ssl.Purpose.SERVER_AUTH, creds)
    made.check_hostname = check_hostname
    return made


def digest(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The SHA-256 of the certificate the peer presented (hex), or "" without one."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return hashlib.sha256(der).hexdigest() if der else ""


def give_up_after(sock: socket.socket, idle: float) -> None:
    """Let the kernel end a connection once the peer stops answering for about `idle` seconds, so a
    cut link fails a migration instead of hanging it.

    TCP_USER_TIMEOUT ends it once sent data stays unacknowledged that long; keepalive probes, sent
    every fifth of it while nothing else is, make that hold for an end that only waits, too (a lazy
    target whose page requests were all acknowledged before the cut, waiting for the pages: found
    with the link cut mid-fill, its task left waiting on memory that never came).
    """
    probe = max(1, int(idle / 5))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(idle * 1000)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
