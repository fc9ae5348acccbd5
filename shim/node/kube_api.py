"""A minimal client of the local node's API server (blocking; standard library, mutual TLS).

`node up` needs four things from the API server: is it ready, is the Node registered and
Ready, take the registration taints off, create what kube-controller-manager would (the
`default` ServiceAccount, the `kube-root-ca.crt` ConfigMap). A full client is not worth it.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.node.pki import CertPair

_NO_PROXY = urllib.request.ProxyHandler({})  # loopback never goes through an HTTP proxy


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:500]}")
        self.status = status


@dataclass(frozen=True)
class ApiClient:
    server: str
    ca: Path
    user: CertPair

    def _opener(self) -> urllib.request.OpenerDirector:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.user.cert), str(self.user.key))
        return urllib.request.build_opener(_NO_PROXY, urllib.request.HTTPSHandler(context=context))

    def request(self, method: str, path: str, body: object | None = None,
                content_type: str = "application/json", timeout: float = 10.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with self._opener().open(req, timeout=timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")) from exc
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def ready(self) -> bool:
        try:
            return bool(self.request("GET", "/readyz") == "ok")
        except (OSError, ApiError):
            return False

    def node(self, name: str) -> dict[str, Any] | None:
        try:
            node: dict[str, Any] = self.request("GET", f"/api/v1/nodes/{name}")
            return node
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def node_ready(self, name: str) -> bool:
        try:
            node = self.node(name)
        except (OSError, ApiError):
            return False
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def remove_taints(self, name: str) -> None:
        """The kubelet registers with node.kubernetes.io/not-ready; the controller that lifts it is not run."""
        self.request("PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": None}},
                     content_type="application/merge-patch+json")

    def delete_node(self, name: str) -> bool:
        try:
            self.request("DELETE", f"/api/v1/nodes/{name}")
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    def create_if_missing(self, path: str, body: dict[str, Any]) -> None:
        try:
            self.request("POST", path, body)
        except ApiError as exc:
            if exc.status != 409:  # AlreadyExists
                raise
