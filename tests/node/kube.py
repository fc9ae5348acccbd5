"""Driving a local Kubernetes node (`criu-shim node up --kubernetes`) from tests, through kubectl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTPROGS = "localhost/criu-shim/testprogs:1"
COUNTER = ["/usr/local/bin/counter"]


@dataclass(frozen=True)
class KubeNode:
    dir: Path
    cri: str
    kubeconfig: Path
    kubectl: Path
    name: str
    registry: str
    containerd: str  # the version: "1.7", "1.6"

    @property
    def checkpoints_dir(self) -> Path:
        """The kubelet's own: its --root-dir's checkpoints/."""
        return self.dir / "kubernetes" / "kubelet" / "checkpoints"

    def run(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                             capture_output=True, text=True, timeout=120)
        if check:
            assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
        return res

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.run("get", kind, name, "-o", "json").stdout)
        return found

    def create(self, manifest: dict[str, Any]) -> None:
        self.run("create", "-f", "-", stdin=json.dumps(manifest))

    def checkpoint(self, pod: str, container: str, namespace: str = "default") -> subprocess.CompletedProcess[str]:
        """The kubelet checkpoint API, through the API server's node proxy (what users call)."""
        return self.run("create", "--raw",
                        f"/api/v1/nodes/{self.name}/proxy/checkpoint/{namespace}/{pod}/{container}?timeout=60",
                        "-f", "/dev/null", check=False)

    def events(self, pod: str) -> str:
        return self.run("get", "events", "--field-selector", f"involvedObject.name={pod}", "-o",
                        "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}").stdout

    def delete_pod(self, name: str) -> None:
        self.run("delete", "pod", name, "--ignore-not-found", "--wait=true", "--timeout=60s")


def node_up(directory: Path, version: str = "1.7", *options: str) -> KubeNode:
    """`node up --kubernetes` with `options` (e.g. --image-gc-max-age 30s)."""
    res = subprocess.run([sys.executable, "-m", "shim", "node", "up", "--dir", str(directory), "--containerd",
                          version, "--kubernetes", *options], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    values = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return KubeNode(directory, values["CRI_ENDPOINT"], Path(values["KUBECONFIG"]), Path(values["KUBECTL"]),
                    values["NODE_NAME"], values["REGISTRY"], version)


def node_down(directory: Path) -> None:
    """`node down --purge`: everything the node made goes, or the test fails with why."""
    res = subprocess.run([sys.executable, "-m", "shim", "node", "down", "--dir", str(directory), "--purge"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def pod_manifest(node: KubeNode, name: str, image: str, pull: str = "Never",
                 env: dict[str, str] | None = None, liveness: bool = False,
                 restart: str = "Always") -> dict[str, Any]:
    """A counter pod bound to `node` (no scheduler runs); `liveness`: an exec probe every second."""
    container: dict[str, Any] = {"name": "counter", "image": image, "imagePullPolicy": pull, "command": COUNTER,
                                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
    if liveness:
        container["livenessProbe"] = {"exec": {"command": ["cat", "/tmp/count"]}, "periodSeconds": 1,
                                      "failureThreshold": 1}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 2, "restartPolicy": restart,
                     "containers": [container]}}


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def container_status(node: KubeNode, pod: str) -> dict[str, Any]:
    statuses = node.get("pod", pod).get("status", {}).get("containerStatuses") or [{}]
    status: dict[str, Any] = statuses[0]
    return status


def running(node: KubeNode, pod: str) -> bool:
    return "running" in container_status(node, pod).get("state", {})


def count(node: KubeNode, pod: str) -> int:
    """The counter's own count, read inside the container (kubectl exec)."""
    res = node.run("exec", pod, "--", "cat", "/tmp/count", check=False)
    return int(res.stdout.strip()) if res.returncode == 0 and res.stdout.strip().isdigit() else 0


def probes(node: KubeNode, pod: str, result: str = "successful") -> int:
    """The kubelet's own count of liveness probes of `pod` with `result` (its /metrics/probes)."""
    text = node.run("get", "--raw", f"/api/v1/nodes/{node.name}/proxy/metrics/probes").stdout
    total = 0
    for line in text.splitlines():
        if (line.startswith("prober_probe_total{") and f'pod="{pod}"' in line and 'probe_type="Liveness"' in line
                and f'result="{result}"' in line):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total
