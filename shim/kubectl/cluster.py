"""The API server, as `kubectl checkpoint` uses it: the Kubernetes Python client's kubeconfig handling
(KUBECONFIG with several files, contexts, client certificates, tokens, exec plugins) and transport,
with JSON in and out (pods are handled as the plain objects the API serves)."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from shim.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ShimError,
    Unavailable,
    Unknown,
)

REQUEST_TIMEOUT = 30.0  # any API call but the checkpoint itself
POLL = 0.5


class KubeletError(Unknown):
    """The kubelet answered the checkpoint with an error: its status and its own message."""


@dataclass(frozen=True)
class Target:
    namespace: str
    pod: str


def _path(*parts: str) -> str:
    return "/".join(urllib.parse.quote(p, safe="") for p in parts)


class Cluster:
    """One API server, from a kubeconfig and context, as kubectl would pick them."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        files = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        try:
            # The client's kubeconfig loader has no annotations (its ApiClient has).
            self.api = k8s_config.new_client_from_config(config_file=files, context=context)  # type: ignore[no-untyped-call]
            contexts, current = k8s_config.list_kube_config_contexts(config_file=files)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot load kubeconfig {files}: {exc}") from None
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
        self.default_namespace = str(((chosen or {}).get("context") or {}).get("namespace") or "default")
        self.server = str(self.api.configuration.host)

    def close(self) -> None:
        self.api.close()

    # ------------------------------------------------------------ transport

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                timeout: float = REQUEST_TIMEOUT, what: str = "") -> tuple[int, bytes]:
        """One API call; (status, body). A connection failure is Unavailable; HTTP errors are the caller's."""
        method, url, headers, data, _ = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), body=body,
            header_params={"Accept": "application/json", **({"Content-Type": "application/json"} if body else {})},
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(method, url, headers, data, _request_timeout=timeout)
        except urllib3.exceptions.MaxRetryError as exc:
            reason = exc.reason
            if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
                raise DeadlineExceeded(f"{what or path}: no answer from {self.server} within {timeout:.0f}s") from None
            raise Unavailable(f"cannot reach the API server {self.server}: {reason}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"cannot reach the API server {self.server}: {exc}") from None
        except ApiException as exc:  # the client's own: a TLS failure without retries (status 0), a 429 given up
            if not exc.status:
                raise Unavailable(f"cannot reach the API server {self.server}: {' '.join(str(exc.reason).split())}") \
                    from None
            raise api_error(int(exc.status), str(exc.body or exc.reason or "").encode(), what or path) from None
        return int(response.status), bytes(response.read() or b"")

    def json(self, method: str, path: str, body: Any = None, what: str = "") -> dict[str, Any]:
        status, data = self.request(method, path, body, what=what)
        if not 200 <= status < 300:
            raise api_error(status, data, what or f"{method} {path}")
        try:
            doc: dict[str, Any] = json.loads(data)
        except ValueError:
            raise Unknown(f"{what or path}: the API server answered HTTP {status} with no JSON") from None
        return doc

    # ------------------------------------------------------------ pods and nodes

    def pod(self, target: Target) -> dict[str, Any]:
        return self.json("GET", f"/api/v1/namespaces/{_path(target.namespace)}/pods/{_path(target.pod)}",
                         what=f"pod {target.pod} in namespace {target.namespace}")

    def pod_or_none(self, target: Target) -> dict[str, Any] | None:
        try:
            return self.pod(target)
        except NotFound:
            return None

    def node(self, name: str) -> dict[str, Any]:
        return self.json("GET", f"/api/v1/nodes/{_path(name)}", what=f"node {name}")

    def create_pod(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        name = manifest.get("metadata", {}).get("name", "")
        return self.json("POST", f"/api/v1/namespaces/{_path(namespace)}/pods", manifest,
                         what=f"creating pod {name} in namespace {namespace}")

    def delete_pod(self, target: Target) -> None:
        status, data = self.request("DELETE", f"/api/v1/namespaces/{_path(target.namespace)}/pods/{_path(target.pod)}")
        if status != 404 and not 200 <= status < 300:
            raise api_error(status, data, f"deleting pod {target.pod} in namespace {target.namespace}")

    def events(self, target: Target) -> list[str]:
        query = {"fieldSelector": f"involvedObject.name={target.pod},involvedObject.kind=Pod"}
        status, data = self.request("GET", f"/api/v1/namespaces/{_path(target.namespace)}/events", query=query)
        try:
            items = json.loads(data).get("items") or [] if status == 200 else []
        except (ValueError, AttributeError):  # only a hint for a timeout's message: none rather than a crash
            return []
        return [f"{e.get('reason', '')}: {e.get('message', '')}" for e in items
                if isinstance(e, dict) and e.get("type") == "Warning"]

    def checkpoint(self, node: str, target: Target, container: str, timeout: int) -> str:
        """The kubelet checkpoint API through the API server's node proxy; the archive's path on the node."""
        path = f"/api/v1/nodes/{_path(node)}/proxy/checkpoint/{_path(target.namespace)}/{_path(target.pod)}/" \
               f"{_path(container)}"
        # The kubelet waits up to `timeout` for the runtime; leave the request some slack beyond it.
        status, data = self.request("POST", path, query={"timeout": str(timeout)}, timeout=timeout + 30.0,
                                    what=f"checkpoint of {target.namespace}/{target.pod}/{container}")
        if not 200 <= status < 300:
            raise checkpoint_error(status, data, node, target, container)
        try:
            items = json.loads(data)["items"]
            if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], str):
                raise ValueError(items)
        except (ValueError, KeyError, TypeError):
            raise Unknown(f"the kubelet on node {node} answered the checkpoint with {data[:300]!r}, "
                          'not {"items": [PATH]}') from None
        return str(items[0])

    def wait_running(self, target: Target, container: str, timeout: float) -> dict[str, Any]:
        """Until the pod's `container` runs; a container that waits with an error, or a failed pod, is an error
        naming the kubelet's reason and message (a refused restore says why here)."""
        deadline = time.monotonic() + timeout
        last = "not created yet"
        while True:
            pod = self.pod_or_none(target)
            if pod is not None:
                state, last, failed = container_state(pod, container)
                if state == "running":
                    return pod
                if failed:
                    raise FailedPrecondition(f"pod {target.pod} in namespace {target.namespace}: {last}")
            if time.monotonic() > deadline:
                warnings = "; ".join(self.events(target)[-3:])
                raise DeadlineExceeded(f"pod {target.pod} in namespace {target.namespace} is not running after "
                                       f"{timeout:.0f}s: {last}" + (f"; events: {warnings}" if warnings else ""))
            time.sleep(POLL)


# Reasons the kubelet gives a waiting container that will not start without a change.
_FATAL_WAITING = {"CreateContainerError", "CreateContainerConfigError", "ErrImagePull", "ImagePullBackOff",
                  "InvalidImageName", "RunContainerError", "CrashLoopBackOff", "ErrImageNeverPull"}


def container_state(pod: dict[str, Any], container: str) -> tuple[str, str, bool]:
    """(state, what to tell the user, whether it has failed for good) of `container` in `pod`."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded"):
        return status["phase"].lower(), f"pod phase {status['phase']}: {status.get('message', '')}".strip(": "), True
    for entry in status.get("containerStatuses") or []:
        if entry.get("name") != container:
            continue
        state = entry.get("state") or {}
        if "running" in state:
            return "running", "running", False
        if "waiting" in state:
            waiting = state["waiting"] or {}
            reason, message = waiting.get("reason", ""), waiting.get("message", "")
            return "waiting", f"container {container} waiting: {reason}: {message}".rstrip(": "), \
                reason in _FATAL_WAITING
        if "terminated" in state:
            done = state["terminated"] or {}
            return "terminated", (f"container {container} terminated: {done.get('reason', '')} "
                                  f"(exit code {done.get('exitCode')}): {done.get('message', '')}").rstrip(": "), False
    phase = status.get("phase", "Pending")
    return "pending", f"pod phase {phase}", False


def status_message(data: bytes) -> str:
    """The message of a Kubernetes Status object, else the body as text (the kubelet answers plain text)."""
    text = data.decode(errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(doc, dict) and doc.get("kind") == "Status" and doc.get("message"):
        return str(doc["message"])
    return text[:2000]


def api_error(status: int, data: bytes, what: str) -> ShimError:
    message = status_message(data)
    if status == 401:
        return PermissionDenied(f"{what}: the API server refused your credentials (HTTP 401 Unauthorized): {message}")
    if status == 403:
        return PermissionDenied(f"{what}: forbidden by RBAC (HTTP 403): {message}")
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404): {message}")
    if status == 409:
        return FailedPrecondition(f"{what}: already exists (HTTP 409): {message}")
    if status in (400, 422):
        return InvalidArgument(f"{what}: refused (HTTP {status}): {message}")
    return Unknown(f"{what}: HTTP {status}: {message}")


def checkpoint_error(status: int, data: bytes, node: str, target: Target, container: str) -> ShimError:
    message = status_message(data)
    what = f"checkpoint of container {container} of pod {target.pod} in namespace {target.namespace}"
    if status == 403:
        return PermissionDenied(f"{what}: forbidden by RBAC (HTTP 403): {message} (checkpointing needs the "
                                f"`create` verb on `nodes/proxy` for node {node})")
    if status == 401:
        return PermissionDenied(f"{what}: the API server refused your credentials (HTTP 401): {message}")
    if status == 404:
        return NotFound(f"{what}: the kubelet on node {node} answered HTTP 404: {message} (is the "
                        "ContainerCheckpoint feature gate on there?)" if not message or message == "404 page not found"
                        else f"{what}: the kubelet on node {node} answered HTTP 404: {message}")
    return KubeletError(f"{what}: the kubelet on node {node} answered HTTP {status}: {message}")
