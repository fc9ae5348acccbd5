"""Nodes as hosts: each node in its own network namespace, joined by a routed fabric (blocking).

`criu-shim node up --fabric NAME` runs the node's containerd, CNI bridge, pods, proxy and
migration receiver inside a network namespace of its own (`csh-<tag>`, the node's "host"),
linked by a veth pair to a router namespace (`csr-<NAME>`) shared by every node of the
fabric. The router knows each node's pod CIDR only as a route via that node's link, so a pod
IP of node A is reachable from node B only through routes, as in a cluster with a routed
pod network. A migrated container's old pod IP follows it as a /32 route on the router
(the node's address hook, `hook_script`).

Addresses (X = the third octet of the node's pod subnet 10.234.X.0/24): the link is
10.235.X.0/30, the router's end .1, the node's end .2 (its "host IP", where the migration
receiver listens). The fabric's CA (node certificates for the migration channel) lives in
/run/criu-shim/fabric-<NAME>, 0700, and goes with the last node of the fabric.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition, InvalidArgument
from shim.node import pki
from shim.node.layout import RUN_ROOT, NodeLayout

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")  # csr-NAME stays short, and safe in a shell script
RECEIVER_PORT = 7543
NODE_LINK = "fab0"  # the node's end, inside its own namespace (each node has its own)
# The fabric's registry (shim.node.fabric_registry): HTTPS on an address of the router's own, outside
# every link's 10.235.X.0/30 (X is 1-250), which each host reaches through its default route.
REGISTRY_IP = "10.235.255.1"
REGISTRY_PORT = 5000
REGISTRY_HOST = f"{REGISTRY_IP}:{REGISTRY_PORT}"
# What a reserved address's host-local IPAM file holds instead of a pod's id (see hook_script).
IPAM_RESERVED = "criu-shim-migrated"
HOSTS_DIR = "certs.d"  # under the node's directory: containerd's registry config_path


@dataclass(frozen=True)
class Fabric:
    name: str

    @property
    def router(self) -> str:
        return f"csr-{self.name}"

    @property
    def dir(self) -> Path:
        return RUN_ROOT / f"fabric-{self.name}"

    @property
    def ca(self) -> pki.CertPair:
        return pki.CertPair(self.dir / "ca.crt", self.dir / "ca.key")


@dataclass(frozen=True)
class NodeHost:
    """One node's place on a fabric (pure: derived from its layout)."""

    layout: NodeLayout
    fabric: Fabric

    @property
    def netns(self) -> str:
        return f"csh-{self.layout.tag}"

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    @property
    def router_link(self) -> str:
        return f"cf{self.layout.tag}"  # 10 bytes, in the router's namespace

    @property
    def octet(self) -> int:
        return int(self.layout.subnet.split(".")[2])

    @property
    def router_ip(self) -> str:
        return f"10.235.{self.octet}.1"

    @property
    def host_ip(self) -> str:
        return f"10.235.{self.octet}.2"

    @property
    def receiver_address(self) -> str:
        return f"{self.host_ip}:{RECEIVER_PORT}"

    @property
    def pki_dir(self) -> Path:
        return self.layout.dir / "migrate"

    @property
    def cert(self) -> pki.CertPair:
        return pki.CertPair(self.pki_dir / "node.crt", self.pki_dir / "node.key")

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def hook(self) -> Path:
        return self.layout.bin_dir / "address-hook"

    def enter(self) -> list[str]:
        """The argv prefix that runs a command on this host (a child joins the namespace, never us)."""
        return ["nsenter", f"--net={self.netns_path}", "--"]


def check_name(name: str) -> Fabric:
    if not NAME_RE.match(name):
        raise InvalidArgument(f"fabric name {name!r}: 1-12 characters of a-z, 0-9 and '-', starting with a "
                              "letter or digit")
    return Fabric(name)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise FailedPrecondition(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _netns_exists(name: str) -> bool:
    return (Path("/run/netns") / name).exists()


def _sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"], check=True,
                   capture_output=True)


@contextlib.contextmanager
def _locked(fabric: Fabric) -> Iterator[None]:
    """Nodes joining and leaving one fabric at once must agree on the router's life."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / f"fabric-{fabric.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def attach(host: NodeHost) -> None:
    """Make the node's host namespace, its link to the router (made if missing), addresses, routes
    and its certificate. Undone by `detach`, which `node up` runs on any failure."""
    with _locked(host.fabric):
        _ensure_router(host.fabric)
        subnet = host.layout.subnet
        if (_ip("route", "show", "exact", subnet, netns=host.fabric.router).strip()
                and not _netns_exists(host.netns)):
            raise FailedPrecondition(f"pod subnet {subnet} of {host.layout.dir} is already routed on fabric "
                                     f"{host.fabric.name} (another node's tag collides); use another --dir")
        if not _netns_exists(host.netns):
            _ip("netns", "add", host.netns)
        _ip("link", "set", "lo", "up", netns=host.netns)
        if not Path(f"/sys/class/net/{host.router_link}").exists() and host.router_link not in _ip(
                "-o", "link", "show", netns=host.fabric.router):
            _ip("link", "add", host.router_link, "netns", host.fabric.router, "type", "veth", "peer", "name",
                NODE_LINK, "netns", host.netns)
        _ip("addr", "replace", f"{host.router_ip}/30", "dev", host.router_link, netns=host.fabric.router)
        _ip("link", "set", host.router_link, "up", netns=host.fabric.router)
        _ip("addr", "replace", f"{host.host_ip}/30", "dev", NODE_LINK, netns=host.netns)
        _ip("link", "set", NODE_LINK, "up", netns=host.netns)
        _ip("route", "replace", "default", "via", host.router_ip, netns=host.netns)
        _ip("route", "replace", subnet, "via", host.host_ip, netns=host.fabric.router)
        _sysctl(host.netns, "net.ipv4.ip_forward", "1")
        _issue_certificate(host)


def _ensure_router(fabric: Fabric) -> None:
    if not _netns_exists(fabric.router):
        _ip("netns", "add", fabric.router)
        _ip("link", "set", "lo", "up", netns=fabric.router)
        _sysctl(fabric.router, "net.ipv4.ip_forward", "1")
    fabric.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki.create_ca(fabric.dir, f"criu-shim fabric {fabric.name}")


def _issue_certificate(host: NodeHost) -> None:
    """The node's certificate for the migration channel: server and client, its host IP as SAN."""
    pki.issue(host.fabric.ca, host.cert, f"node-{host.layout.tag}", server=True, client=True,
              ips=(host.host_ip,))
    host.ca_cert.write_bytes(host.fabric.ca.cert.read_bytes())
    host.ca_cert.chmod(0o600)


def registry_hosts_toml(fabric: Fabric) -> str:
    """containerd's hosts.toml for the fabric's registry: HTTPS, its certificate issued by the fabric's CA."""
    url = f"https://{REGISTRY_HOST}"
    return (f'server = "{url}"\n\n[host."{url}"]\n  capabilities = ["pull", "resolve"]\n'
            f'  ca = "{fabric.ca.cert}"\n')


def write_registry_hosts(host: NodeHost) -> Path:
    """The node's containerd pulls from the fabric's registry (its config_path is DIR/certs.d)."""
    target = host.layout.dir / HOSTS_DIR / REGISTRY_HOST / "hosts.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(registry_hosts_toml(host.fabric))
    return target


def hook_script(host: NodeHost) -> str:
    """The node's address hook: `claim IP VIA` routes a migrated pod IP to the local pod VIA (on
    this host and on the router); `release IP` drops this host's route for it and the router's, if
    that still leads here (once the next node has claimed the IP, the router's route is that node's).

    `reserve IP` keeps this node's IPAM (CNI host-local: a file per address, holding the id of
    the pod it went to) from giving IP to a new pod once the pod it left is deleted: the file
    gets our marker instead of that pod's id, so the pod's CNI DEL does not free it, and the
    fabric notes where the file is. `free IP` (on whichever node the container holding IP was
    removed) deletes that file again, unless another node claimed IP since (the router routes
    it there): then the address still lives, elsewhere.
    """
    ipaddress.ip_address(host.host_ip)  # all values below are ours, checked, and safe to quote
    ipam = host.layout.cni_ipam_dir / host.layout.network_name
    reserved = host.fabric.dir / "reserved"
    return f"""#!/bin/sh
# criu-shim address hook of node {host.layout.tag} on fabric {host.fabric.name} (written by node up).
# claim IP VIA: a container keeping pod IP IP now runs in the local pod whose IP is VIA.
# release IP: the container with IP left this node (or was removed here).
# reserve IP: IP left the pod this node's IPAM gave it to: keep it from other pods.
# free IP: the container holding IP was removed here: its IPAM may give IP out again.
set -eu
case "${{1:-}}" in
  claim)   ip route replace "$2/32" via "$3" dev {host.layout.bridge}
           ip -n {host.fabric.router} route replace "$2/32" via {host.host_ip} ;;
  release) ip route del "$2/32" 2>/dev/null || true
           ip -n {host.fabric.router} route del "$2/32" via {host.host_ip} 2>/dev/null || true ;;
  reserve) [ -f "{ipam}/$2" ] || exit 0   # not an address of this node's IPAM
           printf '{IPAM_RESERVED}\\n' > "{ipam}/$2"
           mkdir -p "{reserved}" && printf '%s\\n' "{ipam}/$2" > "{reserved}/$2" ;;
  free)    case "$(ip -n {host.fabric.router} route show "$2/32")" in
             ""|*"via {host.host_ip} "*) ;;
             *) exit 0 ;;   # claimed by another node since: still in use there
           esac
           [ -f "{reserved}/$2" ] || exit 0
           file=$(cat "{reserved}/$2")
           if [ "$(head -n 1 "$file" 2>/dev/null)" = "{IPAM_RESERVED}" ]; then rm -f "$file"; fi
           rm -f "{reserved}/$2" ;;
  check)   ip -n {host.fabric.router} route show >/dev/null ;;
  *) echo "usage: $0 claim IP VIA | release IP | reserve IP | free IP | check" >&2; exit 2 ;;
esac
"""


def detach(host: NodeHost) -> list[str]:
    """Remove the node's namespace (its links and routes go with it) and, after the last node,
    the router and the fabric's CA. Idempotent."""
    done = []
    with _locked(host.fabric):
        if _netns_exists(host.netns):
            _ip("netns", "del", host.netns, check=False)
            done.append(f"removed host netns {host.netns}")
        if _netns_exists(host.fabric.router):
            _ip("link", "del", host.router_link, netns=host.fabric.router, check=False)
            links = _ip("-o", "link", "show", netns=host.fabric.router, check=False)
            if not re.search(r"^\d+: cf", links, re.M):  # no node left on the fabric
                _ip("netns", "del", host.fabric.router, check=False)
                shutil.rmtree(host.fabric.dir, ignore_errors=True)
                (RUN_ROOT / f"fabric-{host.fabric.name}.lock").unlink(missing_ok=True)  # we still hold it
                done.append(f"removed fabric {host.fabric.name} (router netns {host.fabric.router})")
    shutil.rmtree(host.pki_dir, ignore_errors=True)
    return done
