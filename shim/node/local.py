"""`criu-shim node up|down`: a whole containerd node in one directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shim.errors import FailedPrecondition, Unavailable
from shim.node import cleanup, fabric, kdat, procs, render
from shim.node.layout import RUN_ROOT, NodeLayout
from shim.node.tools import REPO_ROOT, Tools, tools_for
from shim.restore import lazy, relay_processes

log = logging.getLogger(__name__)

IMAGES_INDEX = REPO_ROOT / "build" / "images" / "images.json"
SHIM_LAUNCHER = REPO_ROOT / "node-config" / "containerd-shim-criu-v2"
START_TIMEOUT = 60.0
RECEIVER_IDLE_TIMEOUT = 10.0  # a development node gives up on a cut transfer sooner than a real one


@dataclass(frozen=True)
class Endpoints:
    containerd: str
    cri: str
    host: fabric.NodeHost | None = None

    def lines(self) -> str:
        text = f"CONTAINERD_ENDPOINT={self.containerd}\nCRI_ENDPOINT={self.cri}"
        if (h := self.host) is not None:  # what `criu-shim migrate` on and to this node needs
            text += (f"\nFABRIC={h.fabric.name}\nFABRIC_ROUTER={h.fabric.router}\nNODE_NETNS={h.netns}"
                     f"\nHOST_IP={h.host_ip}\nPOD_SUBNET={h.layout.subnet}\nMIGRATE_ADDRESS={h.receiver_address}"
                     f"\nMIGRATE_CERT={h.cert.cert}\nMIGRATE_KEY={h.cert.key}\nMIGRATE_CA={h.ca_cert}"
                     f"\nADDRESS_HOOK={h.hook}\nCHECKPOINTS_DIR={h.layout.checkpoints_dir}")
        return text


def endpoints(layout: NodeLayout, host: fabric.NodeHost | None = None) -> Endpoints:
    return Endpoints(f"unix://{layout.containerd_socket}", f"unix://{layout.cri_socket}", host)


def up(directory: Path, version: str = "1.7", proxy_config: Path | None = None,
       fabric_name: str | None = None) -> Endpoints:
    """Start containerd, CNI and the proxy for `directory`; idempotent. With `fabric_name`, all of
    it runs in the node's own network namespace on that fabric (shim.node.fabric)."""
    layout = NodeLayout(directory.resolve())
    host = fabric.NodeHost(layout, fabric.check_name(fabric_name)) if fabric_name else None
    if layout.dir.exists() and not layout.dir.is_dir():
        raise FailedPrecondition(f"{layout.dir} exists and is not a directory")
    if not cleanup.is_root():
        raise FailedPrecondition("a local node needs root (containerd, CNI and CRIU do)")
    tools = tools_for(version)
    recorded = _recorded_version(layout)
    if _running(layout):
        if recorded != version or _recorded_fabric(layout) != fabric_name:
            raise FailedPrecondition(f"node in {layout.dir} already runs containerd {recorded} (fabric "
                                     f"{_recorded_fabric(layout)}); `node down` it first")
        return endpoints(layout, host)
    _prepare(layout, version, tools, fabric_name)
    log.info("%s", kdat.ensure_cache(tools.criu))
    if proxy_config is None:
        proxy_config = layout.proxy_config_file
        # a fabric node restores checkpoint images of its fabric's registry (migrate --mode registry)
        registries = (fabric.REGISTRY_HOST,) if host is not None else ()
        proxy_config.write_text(render.proxy_config(layout, tools.criu, extra_registries=registries))
    try:
        if host is not None:
            fabric.attach(host)
            host.hook.write_text(fabric.hook_script(host))
            host.hook.chmod(0o700)
            fabric.write_registry_hosts(host)
        enter = host.enter() if host is not None else []
        _start_containerd(layout, tools, enter)
        _import_images(layout, tools)
        _start_proxy(layout, proxy_config, enter)
        if host is not None:
            _start_receiver(layout, host, proxy_config)
    except BaseException:
        down(directory)
        raise
    return endpoints(layout, host)


def _prepare(layout: NodeLayout, version: str, tools: Tools, fabric_name: str | None = None) -> None:
    # A fabric node's bridge lives in its own namespace, and the fabric refuses a subnet its router
    # already routes: it keeps the subnet its tag picks. A host node takes the first one no other
    # live host node has claimed and the host does not route.
    subnet = layout.subnet if fabric_name is not None else _free_subnet(layout)
    if (dev := cleanup.subnet_in_use(subnet, layout.bridge)) is not None:
        raise FailedPrecondition(f"subnet {subnet} for {layout.dir} is already routed via {dev}")
    for path in (layout.dir, layout.run_dir, layout.cni_conf_dir, layout.log_dir, layout.pid_dir, layout.bin_dir):
        path.mkdir(parents=True, exist_ok=True)
    if fabric_name is None:
        layout.subnet_claim.write_text(subnet + "\n")
    layout.checkpoints_dir.mkdir(mode=0o700, exist_ok=True)
    text = render.shim_launcher(SHIM_LAUNCHER.read_text(), sys.executable,
                                tools.containerd_bin_dir / "containerd-shim-runc-v2")
    # containerd 1.6 ignores runtime_path: there the launcher takes the stock shim's
    # name, first on containerd's PATH, and execs the real one by its full path.
    name = "containerd-shim-runc-v2" if version == "1.6" else "containerd-shim-criu-v2"
    for stale in layout.bin_dir.glob("containerd-shim-*"):
        stale.unlink()
    launcher = layout.bin_dir / name
    launcher.write_text(text)
    launcher.chmod(0o755)
    # Searchable, not listable, like containerd's own /run/containerd: in a pod with a user namespace
    # the container's mapped root must reach its rootfs under the state dir. The sockets in it
    # stay root's (0660).
    os.chmod(layout.run_dir, 0o711)
    layout.config_file.write_text(render.containerd_config(
        layout, version, tools.runc, tools.cni_bin_dir, restrict_oom=not cleanup.has_cap_sys_resource(),
        hosts_dir=layout.dir / fabric.HOSTS_DIR if fabric_name is not None else None))
    (layout.cni_conf_dir / "10-criu-shim.conflist").write_text(render.cni_conflist(layout))
    (layout.dir / "node.json").write_text(json.dumps({"containerd": version, "fabric": fabric_name}) + "\n")


def _recorded_version(layout: NodeLayout) -> str | None:
    try:
        return str(json.loads((layout.dir / "node.json").read_text())["containerd"])
    except (OSError, ValueError, KeyError):
        return None


def _recorded_fabric(layout: NodeLayout) -> str | None:
    try:
        name = json.loads((layout.dir / "node.json").read_text()).get("fabric")
        return str(name) if name else None
    except (OSError, ValueError, AttributeError):
        return None


def _running(layout: NodeLayout) -> bool:
    pids = [procs.read_pid(layout.pid_dir / n) for n in ("containerd.pid", "proxy.pid")]
    return all(p is not None and procs.alive(p) for p in pids)


def _free_subnet(layout: NodeLayout) -> str:
    """This node's claimed subnet, or the first candidate neither claimed by another live node nor routed."""
    if layout.subnet_claim.is_file():
        return layout.subnet
    claimed = set()
    for claim in RUN_ROOT.glob(f"*/{layout.subnet_claim.name}"):
        with contextlib.suppress(OSError):
            claimed.add(claim.read_text().strip())
    for subnet in layout.subnet_candidates():
        if subnet not in claimed and cleanup.subnet_in_use(subnet, layout.bridge) is None:
            return subnet
    raise FailedPrecondition(f"no free pod subnet in 10.234.0.0/16 for {layout.dir}: {len(claimed)} nodes are up")


def _start_containerd(layout: NodeLayout, tools: Tools, enter: Sequence[str] = ()) -> None:
    """containerd for `layout`; `enter`: the command prefix that runs it in a fabric host's netns
    (none for a plain node: the node tests restart a plain node's containerd with this)."""
    env = dict(os.environ, PATH=f"{layout.bin_dir}:{tools.containerd_bin_dir}:{tools.runc.parent}:{tools.criu.parent}:"
               + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    pid = procs.spawn([*enter, str(tools.containerd), "--config", str(layout.config_file)],
                      layout.log_dir / "containerd.log", layout.pid_dir / "containerd.pid", env)
    _wait_cri(layout.containerd_socket, pid, layout.log_dir / "containerd.log")


def _start_proxy(layout: NodeLayout, proxy_config: Path, enter: Sequence[str] = ()) -> None:
    argv = [*enter, sys.executable, "-m", "shim", "serve", "--listen", f"unix://{layout.cri_socket}",
            "--runtime-endpoint", f"unix://{layout.containerd_socket}", "--config", str(proxy_config)]
    pid = procs.spawn(argv, layout.log_dir / "criu-shim.log", layout.pid_dir / "proxy.pid")
    _wait_cri(layout.cri_socket, pid, layout.log_dir / "criu-shim.log")


def _start_receiver(layout: NodeLayout, host: fabric.NodeHost, proxy_config: Path) -> None:
    """`criu-shim migrate-receiver` on the node's host IP, with the node's certificate and hook."""
    argv = [*host.enter(), sys.executable, "-m", "shim", "migrate-receiver", "--listen", host.receiver_address,
            "--runtime-endpoint", f"unix://{layout.cri_socket}", "--config", str(proxy_config),
            "--checkpoints-dir", str(layout.checkpoints_dir), "--address-hook", str(host.hook),
            "--idle-timeout", str(RECEIVER_IDLE_TIMEOUT),
            "--cert", str(host.cert.cert), "--key", str(host.cert.key), "--ca", str(host.ca_cert)]
    log_file = layout.log_dir / "migrate-receiver.log"
    pid = procs.spawn(argv, log_file, layout.pid_dir / "receiver.pid")
    if not procs.wait_until(lambda: _listening(host) or not procs.alive(pid), START_TIMEOUT) or not procs.alive(pid):
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:]) if log_file.exists() else ""
        raise Unavailable(f"the migration receiver did not listen on {host.receiver_address}; last lines of "
                          f"{log_file}:\n{tail}")


def _listening(host: fabric.NodeHost) -> bool:
    out = subprocess.run([*host.enter(), "ss", "-Hltn", f"src {host.host_ip}"], capture_output=True,
                         text=True).stdout
    return f":{fabric.RECEIVER_PORT}" in out


def _wait_cri(socket: Path, pid: int, log_file: Path) -> None:
    from shim.node.cri import CriClient

    ok = procs.wait_until(lambda: socket.exists() or not procs.alive(pid), START_TIMEOUT)
    if ok and procs.alive(pid):
        with CriClient(socket) as client:
            try:
                client.wait_ready(START_TIMEOUT)
                return
            except Exception:
                pass
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:]) if log_file.exists() else ""
    raise Unavailable(f"{socket} did not answer within {START_TIMEOUT:.0f}s; last lines of {log_file}:\n{tail}")


def _import_images(layout: NodeLayout, tools: Tools) -> None:
    if not IMAGES_INDEX.exists():
        raise FailedPrecondition(f"{IMAGES_INDEX} is missing: run `make images` first")
    for image in json.loads(IMAGES_INDEX.read_text()):
        if image.get("on_demand"):  # the real-application images: imported by the tests that use them
            continue
        import_image(layout.containerd_socket, tools, image)


def import_image(containerd_socket: Path, tools: Tools, image: dict[str, str]) -> None:
    """`ctr images import` one images.json entry into the CRI namespace (idempotent)."""
    tar = Path(image["tar"])
    tar = tar if tar.is_absolute() else REPO_ROOT / tar
    subprocess.run([str(tools.ctr), "--address", str(containerd_socket), "-n", "k8s.io",
                    "images", "import", str(tar)], check=True, capture_output=True)


def down(directory: Path, purge: bool = False) -> list[str]:
    """Stop everything `up` started and remove what it left; returns what was cleaned."""
    layout = NodeLayout(directory.resolve())
    report: list[str] = []
    netns = _remove_pods(layout, report)
    for name in ("receiver.pid", "proxy.pid", "containerd.pid"):
        pid = procs.read_pid(layout.pid_dir / name)
        if pid is not None and procs.alive(pid):
            procs.stop(pid)
            report.append(f"stopped {name.removesuffix('.pid')} ({pid})")
        (layout.pid_dir / name).unlink(missing_ok=True)
    for pid in procs.processes_mentioning(str(layout.containerd_socket)):
        procs.stop(pid, timeout=5)
        report.append(f"stopped leftover shim {pid}")
    relay_pids = set(procs.processes_mentioning("shim.runtime relay-for")) | set(
        procs.processes_mentioning("shim.runtime relay-spare"))
    for pid in relay_pids & set(procs.processes_mentioning(str(layout.dir))):  # this node's restore relays only
        procs.stop(pid, timeout=5)
        report.append(f"stopped leftover restore relay {pid}")
    # Spares work in the node's restore root (cwd): a spare page daemon, or one its relay had forked and
    # not yet exec'd (an idle-priority child on a loaded machine still bears the relay's command line),
    # is found by that, whatever its command line says by now.
    ours = {pid for pid in procs.processes_mentioning("shim.runtime") if procs.cwd_under(pid, layout.dir)}
    for pid in set(procs.processes_mentioning("lazy-pages")) & set(procs.processes_mentioning(str(layout.dir))) | ours:
        procs.stop(pid, timeout=5)  # a lazy restore's page daemon whose relay is gone
        report.append(f"stopped leftover lazy-pages daemon {pid}")
    report += [f"released loop device {d}" for d in lazy.release_all(layout.dir / "restore")]
    report += [f"removed {f}" for f in relay_processes.remove_files(_restore_keys(layout.dir / "restore"))]
    report += [f"unmounted {m}" for m in cleanup.unmount_runc_leftovers(layout.dir)]
    report += [f"unmounted {m}" for m in cleanup.unmount_all(layout.dir, layout.run_dir)]
    report += [f"removed netns {p}" for p in netns if cleanup.remove_netns(p)]
    if cleanup.delete_link(layout.bridge):
        report.append(f"deleted bridge {layout.bridge}")
    if count := cleanup.remove_cni_cache(layout.network_name):
        report.append(f"removed {count} CNI cache entries")
    cleanup.remove_tree(layout.cni_ipam_dir)
    cleanup.remove_tree(layout.run_dir)
    if (fabric_name := _recorded_fabric(layout)) is not None:  # after every pod and process of the host
        report += fabric.detach(fabric.NodeHost(layout, fabric.Fabric(fabric_name)))
    if purge:
        cleanup.remove_tree(layout.dir)
    return report


def _restore_keys(work_root: Path) -> set[str]:
    """The restores under the node's work root (their dirs, configs and layer files share the key)."""
    if not work_root.is_dir():
        return set()
    return {entry.name.split(".", 1)[0] for entry in work_root.iterdir()}


def _remove_pods(layout: NodeLayout, report: list[str]) -> list[Path]:
    """Remove every pod through CRI, so CNI and containerd undo their own work."""
    pid = procs.read_pid(layout.pid_dir / "containerd.pid")
    if pid is None or not procs.alive(pid) or not layout.containerd_socket.exists():
        return []
    from shim.node.cri import CriClient

    try:
        with CriClient(layout.containerd_socket) as client:
            netns = client.sandbox_netns_paths()
            if count := client.remove_all_pods():
                report.append(f"removed {count} pods")
            return netns
    except Exception as exc:  # a broken node must still come down
        log.warning("could not remove pods through CRI: %s", exc)
        return []
