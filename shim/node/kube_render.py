"""Paths, command lines and config files of a local node's Kubernetes part (pure: layout in, text out).

One node runs etcd, kube-apiserver and a kubelet (`node up --kubernetes`); a node started with
`--join DIR1` runs only a kubelet registered with DIR1's API server. Everything lives under
DIR/kubernetes; the kubelet's cgroups under a cgroup root of its own (`criu-shim-<tag>`) in
every v1 hierarchy, so two nodes on one host never share a `kubepods` tree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from shim.errors import InvalidArgument
from shim.node.layout import NodeLayout

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service, named in the API server's certificate
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    kubelet: int


@dataclass(frozen=True)
class KubeLayout:
    node: NodeLayout

    @property
    def dir(self) -> Path:
        return self.node.dir / "kubernetes"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def cluster_file(self) -> Path:
        """JSON: the API server's URL, the CA's directory, the ports, whether this node runs the control plane."""
        return self.dir / "cluster.json"

    @property
    def etcd_data(self) -> Path:
        return self.dir / "etcd"

    @property
    def kubelet_data(self) -> Path:
        """The kubelet's root dir: pods, volumes, checkpoints (on DIR's disk)."""
        return self.dir / "kubelet"

    @property
    def kubelet_root(self) -> Path:
        """What --root-dir says: a short link to kubelet_data. The kubelet puts unix sockets under its
        root dir (pod-resources/, plugins_registry/), and a socket path may not exceed 107 bytes."""
        return self.node.run_dir / "kubelet"

    @property
    def kubelet_checkpoints(self) -> Path:
        """Where the kubelet writes checkpoint archives (its root dir's checkpoints/)."""
        return self.kubelet_data / "checkpoints"

    @property
    def pod_logs(self) -> Path:
        return self.dir / "pod-logs"

    @property
    def volume_plugins(self) -> Path:
        return self.dir / "volume-plugins"

    @property
    def kubelet_config(self) -> Path:
        return self.dir / "kubelet-config.json"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.dir / "kubelet.kubeconfig"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def registry_dir(self) -> Path:
        return self.dir / "registry"

    @property
    def node_name(self) -> str:
        return f"criu-shim-{self.node.tag}"

    @property
    def cgroup_root(self) -> str:
        """The kubelet's --cgroup-root: kubepods goes below it, in every v1 hierarchy."""
        return f"criu-shim-{self.node.tag}"


def kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    """A kubeconfig (JSON is YAML) with one cluster, one user, one context."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
    }
    return json.dumps(config, indent=2) + "\n"


def etcd_argv(etcd: Path, kube: KubeLayout, ports: Ports) -> list[str]:
    pki = kube.pki
    peer = f"http://127.0.0.1:{ports.etcd_peer}"  # peer traffic never leaves the process: one member
    client = f"https://127.0.0.1:{ports.etcd_client}"
    return [str(etcd), "--name", "criu-shim", "--data-dir", str(kube.etcd_data),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"criu-shim={peer}",
            "--cert-file", str(pki / "etcd.crt"), "--key-file", str(pki / "etcd.key"),
            "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth",
            "--log-level", "warn"]


def apiserver_argv(apiserver: Path, kube: KubeLayout, ports: Ports) -> list[str]:
    pki = kube.pki
    return [str(apiserver), "--bind-address", LOOPBACK, "--advertise-address", LOOPBACK,
            "--secure-port", str(ports.apiserver),
            "--etcd-servers", f"https://127.0.0.1:{ports.etcd_client}",
            "--etcd-cafile", str(pki / "ca.crt"), "--etcd-certfile", str(pki / "apiserver-etcd-client.crt"),
            "--etcd-keyfile", str(pki / "apiserver-etcd-client.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--kubelet-client-certificate", str(pki / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(pki / "apiserver-kubelet-client.key"),
            "--kubelet-certificate-authority", str(pki / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP",
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--service-account-issuer", SA_ISSUER,
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            # One loopback API server: the `kubernetes` Service's endpoints would name 127.0.0.1,
            # which the API refuses; nothing in a local node needs them.
            "--endpoint-reconciler-type", "none",
            "--allow-privileged=true", "--profiling=false"]


def check_gc_age(value: str) -> str:
    """An imageMaximumGCAge the kubelet takes and that is over the 1 s minimum age we set: 30s, 5m, 1h."""
    if not re.fullmatch(r"[1-9][0-9]*(s|m|h)", value) or value == "1s":
        raise InvalidArgument(f"image GC age {value!r}: a duration like 30s, 5m or 1h (over 1s)")
    return value


def kubelet_config(kube: KubeLayout, cri_endpoint: str, node_ip: str, port: int,
                   image_gc_max_age: str | None = None) -> str:
    """The KubeletConfiguration: criu-shim as runtime and image service, checkpoints on, cgroup v1.

    The kubelet listens on `node_ip` (the host's address: a Node's InternalIP may not be loopback,
    and the API server reaches the kubelet there); anonymous requests are refused, the rest are
    authorized by the API server. Image GC is off unless `image_gc_max_age` ("30s"): then each GC
    pass (at start, then every 5 minutes: the kubelet's fixed ImageGCPeriod) removes images no
    container has used for that long, the disk thresholds staying off."""
    pki = kube.pki
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": node_ip, "port": port, "readOnlyPort": 0, "healthzPort": 0,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet.crt"), "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "containerRuntimeEndpoint": cri_endpoint, "imageServiceEndpoint": cri_endpoint,
        # The kubelet's cgroup layout must match containerd's (runc options SystemdCgroup = false).
        "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{kube.cgroup_root}",
        # Kubernetes 1.35+ refuses cgroup v1 unless told otherwise; these machines are v1.
        "failCgroupV1": False, "failSwapOn": False,
        "featureGates": {"ContainerCheckpoint": True},
        "podLogsDir": str(kube.pod_logs), "volumePluginDir": str(kube.volume_plugins),
        # A development node on a shared disk: never evict the tests' pods or collect their images.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s", "serializeImagePulls": False,
        "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf",
        "nodeStatusUpdateFrequency": "5s",
    }
    if image_gc_max_age is not None:
        # The minimum age must be under the maximum; 0 would mean "unset" and default to 2 minutes.
        config["imageMaximumGCAge"], config["imageMinimumGCAge"] = check_gc_age(image_gc_max_age), "1s"
    return json.dumps(config, indent=2) + "\n"


def kubelet_argv(kubelet: Path, kube: KubeLayout, node_ip: str) -> list[str]:
    # No --pod-manifest-path / staticPodPath: static pods are off.
    return [str(kubelet), "--config", str(kube.kubelet_config), "--kubeconfig", str(kube.kubelet_kubeconfig),
            "--hostname-override", kube.node_name, "--node-ip", node_ip,
            "--root-dir", str(kube.kubelet_root), "--cert-dir", str(kube.pki), "--v", "2"]
