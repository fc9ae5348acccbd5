"""`criu-shim node up --kubernetes` / `--join DIR1`: a real control plane and kubelet on the local node.

    up:   local node (containerd + proxy) -> registry -> certificates -> etcd -> kube-apiserver
          -> kubelet (runtime and image service: the proxy) -> Node Ready, taints off
    down: kubelet -> the local node's own down (pods, mounts under DIR, containerd, proxy)
          -> kube-apiserver, etcd, registry -> cgroup root -> DIR/kubernetes (keys included)

Binaries come from `make peers` (scripts/paths.env KUBERNETES_BIN_DIR, ETCD_BIN_DIR).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.errors import FailedPrecondition, Unavailable
from shim.node import cgroups, cleanup, kubelet_host, local, pki, procs, render
from shim.node import kube_render as kr
from shim.node import registry as reg
from shim.node.kube_api import ApiClient, ApiError
from shim.node.layout import NodeLayout
from shim.node.tools import tools_for
from shim.paths_env import load_paths

log = logging.getLogger(__name__)

APISERVER_TIMEOUT = 90.0
NODE_READY_TIMEOUT = 120.0
CONTROL_PLANE = ("kube-apiserver", "etcd")  # stopped in this order, after the kubelet


@dataclass(frozen=True)
class Binaries:
    kubelet: Path
    apiserver: Path
    kubectl: Path
    etcd: Path


@dataclass(frozen=True)
class KubeEndpoints:
    node: local.Endpoints
    kubeconfig: Path
    kubectl: Path
    node_name: str
    registry: str

    def lines(self) -> str:
        return (f"{self.node.lines()}\nKUBECONFIG={self.kubeconfig}\nKUBECTL={self.kubectl}\n"
                f"NODE_NAME={self.node_name}\nREGISTRY={self.registry}")


def binaries() -> Binaries:
    paths = load_paths()
    kube, etcd = Path(paths["KUBERNETES_BIN_DIR"]), Path(paths["ETCD_BIN_DIR"])
    found = Binaries(kube / "kubelet", kube / "kube-apiserver", kube / "kubectl", etcd / "etcd")
    for path in (found.kubelet, found.apiserver, found.kubectl, found.etcd):
        if not path.exists():
            raise FailedPrecondition(f"{path} is missing: run `make peers` first")
    return found


def read_cluster(kube: kr.KubeLayout) -> dict[str, Any] | None:
    try:
        cluster: dict[str, Any] = json.loads(kube.cluster_file.read_text())
        return cluster
    except (OSError, ValueError):
        return None


def _admin(kube: kr.KubeLayout, server: str) -> ApiClient:
    return ApiClient(server, kube.pki / "ca.crt", pki.CertPair(kube.pki / "admin.crt", kube.pki / "admin.key"))


def up(directory: Path, version: str = "1.7", proxy_config: Path | None = None,
       join: Path | None = None, image_gc_max_age: str | None = None) -> KubeEndpoints:
    """The local node of `directory` with a kubelet; a control plane too unless `join` names one.
    `image_gc_max_age` turns the kubelet's image GC on (kube_render.kubelet_config)."""
    layout = NodeLayout(directory.resolve())
    kube = kr.KubeLayout(layout)
    bins = binaries()
    leader = _leader(join, layout) if join is not None else None
    if (existing := _running(kube, layout)) is not None:
        return existing
    if local._running(layout):  # its proxy runs with a config that knows no kubelet and no registry
        raise FailedPrecondition(f"node in {layout.dir} already runs without Kubernetes; `node down` it first")
    try:
        kube.dir.mkdir(parents=True, exist_ok=True)
        registry = reg.start_registry(kube.registry_dir)
        if proxy_config is None:
            proxy_config = layout.proxy_config_file
            registries = [registry.host] + ([leader["registry"]] if leader else [])
            proxy_config.write_text(render.proxy_config(layout, tools_for(version).criu,
                                                        extra_dirs=[kube.kubelet_checkpoints],
                                                        extra_registries=registries,
                                                        export_registry=registries[-1]))
        endpoints = local.up(directory, version, proxy_config)
        server = leader["server"] if leader else _start_control_plane(kube, bins)
        ca_dir = Path(leader["ca_dir"]) if leader else kube.pki
        node_ip = kubelet_host.host_ip()
        _kubelet_credentials(kube, ca_dir, server, node_ip)
        kube.kubelet_config.write_text(kr.kubelet_config(kube, endpoints.cri, node_ip, reg.free_port(),
                                                         image_gc_max_age))
        _write_cluster(kube, server, ca_dir, control_plane=leader is None, registry=registry.host)
        cgroups.create_root(kube.cgroup_root)
        kubelet_host.record_tables()
        _start_kubelet(kube, bins, server, node_ip)
    except BaseException:
        down(directory)
        raise
    return KubeEndpoints(endpoints, kube.admin_kubeconfig, bins.kubectl, kube.node_name, registry.host)


def _leader(join: Path, layout: NodeLayout) -> dict[str, Any]:
    leader_kube = kr.KubeLayout(NodeLayout(join.resolve()))
    if leader_kube.node.dir == layout.dir:
        raise FailedPrecondition(f"--join {join}: a node cannot join itself")
    cluster = read_cluster(leader_kube)
    if cluster is None or not cluster.get("control_plane"):
        raise FailedPrecondition(f"--join {join}: no control plane there (start it with "
                                 f"`criu-shim node up --dir {join} --kubernetes`)")
    if not _admin(leader_kube, cluster["server"]).ready():
        raise Unavailable(f"--join {join}: the API server {cluster['server']} does not answer")
    return cluster


def _running(kube: kr.KubeLayout, layout: NodeLayout) -> KubeEndpoints | None:
    cluster = read_cluster(kube)
    names = ("kubelet",) + (CONTROL_PLANE if cluster and cluster.get("control_plane") else ())
    pids = [procs.read_pid(layout.pid_dir / f"{n}.pid") for n in names]
    registry = reg.running_registry(kube.registry_dir)
    if cluster is None or registry is None or not all(p is not None and procs.alive(p) for p in pids):
        return None
    if not local._running(layout):
        return None
    return KubeEndpoints(local.endpoints(layout), kube.admin_kubeconfig, binaries().kubectl, kube.node_name,
                         registry.host)


def _write_cluster(kube: kr.KubeLayout, server: str, ca_dir: Path, control_plane: bool, registry: str) -> None:
    data = {"server": server, "ca_dir": str(ca_dir), "control_plane": control_plane, "registry": registry,
            "node_name": kube.node_name}
    kube.cluster_file.write_text(json.dumps(data, indent=2) + "\n")


def _start_control_plane(kube: kr.KubeLayout, bins: Binaries) -> str:
    ports = kr.Ports(reg.free_port(), reg.free_port(), reg.free_port(), 0)
    ca = pki.create_ca(kube.pki, "criu-shim local cluster")
    out = kube.pki
    pki.issue(ca, pki.CertPair(out / "etcd.crt", out / "etcd.key"), "etcd", server=True, client=True,
              dns=pki.LOOPBACK_NAMES, ips=pki.LOOPBACK_IPS)
    pki.issue(ca, pki.CertPair(out / "apiserver-etcd-client.crt", out / "apiserver-etcd-client.key"),
              "kube-apiserver-etcd-client", client=True)
    pki.issue(ca, pki.CertPair(out / "apiserver.crt", out / "apiserver.key"), "kube-apiserver", server=True,
              dns=(*pki.LOOPBACK_NAMES, "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   "kubernetes.default.svc.cluster.local"), ips=(*pki.LOOPBACK_IPS, kr.SERVICE_IP))
    # The API server reaches kubelets (logs, exec, checkpoint) as a cluster admin.
    pki.issue(ca, pki.CertPair(out / "apiserver-kubelet-client.crt", out / "apiserver-kubelet-client.key"),
              "kube-apiserver-kubelet-client", organizations=("system:masters",), client=True)
    pki.service_account_keys(out)
    kube.etcd_data.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_dir, pid_dir = kube.node.log_dir, kube.node.pid_dir
    etcd = procs.spawn(kr.etcd_argv(bins.etcd, kube, ports), log_dir / "etcd.log", pid_dir / "etcd.pid")
    apiserver = procs.spawn(kr.apiserver_argv(bins.apiserver, kube, ports), log_dir / "kube-apiserver.log",
                            pid_dir / "kube-apiserver.pid")
    server = f"https://127.0.0.1:{ports.apiserver}"
    _issue_admin(kube, kube.pki, server)
    client = _admin(kube, server)
    if not procs.wait_until(lambda: client.ready() or not procs.alive(apiserver) or not procs.alive(etcd),
                            APISERVER_TIMEOUT, 0.25) or not client.ready():
        raise Unavailable(f"kube-apiserver did not become ready within {APISERVER_TIMEOUT:.0f}s\n"
                          + _tail(log_dir / "kube-apiserver.log") + "\n" + _tail(log_dir / "etcd.log"))
    return server


def _issue_admin(kube: kr.KubeLayout, ca_dir: Path, server: str) -> None:
    ca = pki.CertPair(ca_dir / "ca.crt", ca_dir / "ca.key")
    admin = pki.issue(ca, pki.CertPair(kube.pki / "admin.crt", kube.pki / "admin.key"), "criu-shim-admin",
                      organizations=("system:masters",), client=True)
    text = kr.kubeconfig(server, kube.pki / "ca.crt", admin.cert, admin.key, "admin")
    kube.admin_kubeconfig.write_text(text)
    kube.admin_kubeconfig.chmod(0o600)


def _kubelet_credentials(kube: kr.KubeLayout, ca_dir: Path, server: str, node_ip: str) -> None:
    ca = pki.CertPair(ca_dir / "ca.crt", ca_dir / "ca.key")
    if ca_dir != kube.pki:  # a joining node: the leader's CA certificate, never its key
        kube.pki.mkdir(mode=0o700, parents=True, exist_ok=True)
        (kube.pki / "ca.crt").write_bytes(ca.cert.read_bytes())
        _issue_admin(kube, ca_dir, server)
    name = kube.node_name
    client = pki.issue(ca, pki.CertPair(kube.pki / "kubelet-client.crt", kube.pki / "kubelet-client.key"),
                       f"system:node:{name}", organizations=("system:nodes",), client=True)
    pki.issue(ca, pki.CertPair(kube.pki / "kubelet.crt", kube.pki / "kubelet.key"), name, server=True,
              dns=(*pki.LOOPBACK_NAMES, name), ips=(node_ip,))
    kube.kubelet_kubeconfig.write_text(kr.kubeconfig(server, kube.pki / "ca.crt", client.cert, client.key,
                                                     f"system:node:{name}"))
    kube.kubelet_kubeconfig.chmod(0o600)


def _start_kubelet(kube: kr.KubeLayout, bins: Binaries, server: str, node_ip: str) -> None:
    for path in (kube.kubelet_data, kube.pod_logs, kube.volume_plugins):
        path.mkdir(parents=True, exist_ok=True)
    kube.kubelet_root.unlink(missing_ok=True)
    kube.kubelet_root.symlink_to(kube.kubelet_data)
    log_file = kube.node.log_dir / "kubelet.log"
    pid = procs.spawn(kr.kubelet_argv(bins.kubelet, kube, node_ip), log_file, kube.node.pid_dir / "kubelet.pid")
    client = _admin(kube, server)
    if not procs.wait_until(lambda: client.node_ready(kube.node_name) or not procs.alive(pid),
                            NODE_READY_TIMEOUT, 0.25) or not procs.alive(pid):
        raise Unavailable(f"node {kube.node_name} did not become Ready within {NODE_READY_TIMEOUT:.0f}s\n"
                          + _tail(log_file))
    client.remove_taints(kube.node_name)
    _controller_manager_stand_ins(client, kube)


def _controller_manager_stand_ins(client: ApiClient, kube: kr.KubeLayout) -> None:
    """What kube-controller-manager (not run) would create and pods in `default` need."""
    client.create_if_missing("/api/v1/namespaces/default/serviceaccounts",
                             {"metadata": {"name": "default"}})
    client.create_if_missing("/api/v1/namespaces/default/configmaps",
                             {"metadata": {"name": "kube-root-ca.crt"},
                              "data": {"ca.crt": (kube.pki / "ca.crt").read_text()}})


def _tail(log_file: Path, lines: int = 15) -> str:
    if not log_file.exists():
        return ""
    text = "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    return f"last lines of {log_file}:\n{text}"


def down(directory: Path, purge: bool = False) -> list[str]:
    """Everything `up` started, in reverse; a node without Kubernetes goes down as before."""
    layout = NodeLayout(directory.resolve())
    kube = kr.KubeLayout(layout)
    cluster = read_cluster(kube)
    was_kubernetes = kube.dir.exists()  # a plain node's down never touches the host's iptables
    report = [f"stopped kubelet ({pid})" for pid in _stop(layout, "kubelet")]
    if cluster is not None and not cluster.get("control_plane"):
        report += _deregister(kube, cluster)
    report += local.down(directory, purge=False)
    for name in CONTROL_PLANE:
        report += [f"stopped {name} ({pid})" for pid in _stop(layout, name)]
    if reg.stop_registry(kube.registry_dir):
        report.append("stopped registry")
    report += [f"removed cgroup {p}" for p in cgroups.remove_root(kube.cgroup_root)]
    if was_kubernetes:
        report += kubelet_host.remove_leftovers()
    report += [f"unmounted {m}" for m in cleanup.unmount_all(kube.dir)]
    if kube.dir.exists():
        cleanup.remove_tree(kube.dir)  # certificates and keys, etcd's data, the kubelet's root dir
        report.append(f"removed {kube.dir}")
    if purge:
        cleanup.remove_tree(layout.dir)
    return report


def _stop(layout: NodeLayout, name: str) -> list[int]:
    pid_file = layout.pid_dir / f"{name}.pid"
    pid = procs.read_pid(pid_file)
    stopped = []
    if pid is not None and procs.alive(pid):
        procs.stop(pid)
        stopped.append(pid)
    pid_file.unlink(missing_ok=True)
    return stopped


def _deregister(kube: kr.KubeLayout, cluster: dict[str, Any]) -> list[str]:
    """A joined node takes its Node object out of the leader's cluster (if the leader still answers)."""
    try:
        if _admin(kube, cluster["server"]).delete_node(kube.node_name):
            return [f"deleted node {kube.node_name} from {cluster['server']}"]
    except (OSError, ApiError, KeyError) as exc:
        log.warning("could not delete node %s: %s", kube.node_name, exc)
    return []
