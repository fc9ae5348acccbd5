"""The nodes' mutual TLS (shim.node_tls): a peer gets in with a certificate of the cluster's CA, and only then.

The system's CA store is not trusted: a certificate from any public CA must not make a migration
source (or a page end). The store is pointed at a second CA here (SSL_CERT_FILE, which OpenSSL's
default paths honour), standing in for the public ones.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from shim import node_tls
from shim.node import pki


def _node(tmp_path: Path, ca: pki.CertPair, name: str) -> node_tls.Credentials:
    pair = pki.issue(ca, pki.CertPair(tmp_path / f"{name}.crt", tmp_path / f"{name}.key"), name, server=True,
                     client=True, ips=("127.0.0.1",))
    return node_tls.Credentials(pair.cert, pair.key, ca.cert)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[node_tls.Credentials, node_tls.Credentials]:
    """(a node of the cluster, a holder of a 'public' certificate whose CA the system store trusts)"""
    public = pki.create_ca(tmp_path / "public", "a public CA")
    monkeypatch.setenv("SSL_CERT_FILE", str(public.cert))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    return _node(tmp_path, pki.create_ca(tmp_path / "cluster", "the cluster"), "node"), _node(tmp_path, public, "out")


def _handshake(server: node_tls.Credentials, client: node_tls.Credentials) -> str:
    """'ok', or what each side said (both, whichever came first)."""
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with node_tls.server_context(server).wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            outcome.append(f"server: {exc}")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname()) as sock, \
                node_tls.client_context(client).wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"x")
            tls.recv(1)  # the server's verdict on our certificate comes after the handshake (TLS 1.3)
    except (ssl.SSLError, OSError) as exc:
        outcome.append(f"client: {exc}")
    finally:
        thread.join(10)
        listener.close()
    return "; ".join(sorted(outcome)) or "ok"


def test_only_the_cluster_ca_is_trusted(cluster: tuple[node_tls.Credentials, node_tls.Credentials]) -> None:
    node, _ = cluster
    for made in (node_tls.server_context(node), node_tls.client_context(node)):
        assert made.cert_store_stats()["x509_ca"] == 1
        assert [dict(x[0] for x in c["subject"])["commonName"] for c in made.get_ca_certs()] == ["the cluster"]
        assert made.verify_mode == ssl.CERT_REQUIRED and made.minimum_version == ssl.TLSVersion.TLSv1_3


def test_two_nodes_of_the_cluster_get_in(cluster: tuple[node_tls.Credentials, node_tls.Credentials],
                                         tmp_path: Path) -> None:
    node, _ = cluster
    other = _node(tmp_path, pki.CertPair(tmp_path / "cluster" / "ca.crt", tmp_path / "cluster" / "ca.key"), "other")
    assert _handshake(node, other) == "ok"


def test_a_certificate_of_a_ca_the_system_trusts_is_refused_both_ways(
        cluster: tuple[node_tls.Credentials, node_tls.Credentials]) -> None:
    node, outsider = cluster
    outsider = node_tls.Credentials(outsider.cert, outsider.key, node.ca)  # it trusts our CA; we must not trust its
    said = _handshake(node, outsider)
    assert said.startswith(("client: ", "server: ")) and "server: [SSL: CERTIFICATE_VERIFY_FAILED]" in said, said
    said = _handshake(outsider, node)
    assert "client: [SSL: CERTIFICATE_VERIFY_FAILED]" in said, said
