"""What `criu-shim install` writes, computed from what is there (nothing is written here).

Every path lives under `root` ("/" on a node, a directory for an image build or a test):

    etc/systemd/system/criu-shim.service                  the unit for `criu-shim serve`
    usr/local/bin/containerd-shim-criu-v2                  the runtime handler's launcher
    <containerd config>                                    the `criu` handler merged in (containerd_config)
    etc/systemd/system/kubelet.service.d/20-criu-shim.conf the kubelet's CRI endpoints -> criu-shim
    containerd 1.6 only (it ignores runtime_path, so the launcher takes the stock shim's name, first on
    containerd's PATH, and execs the real one by its full path):
    usr/local/lib/criu-shim/runc-shim/containerd-shim-runc-v2, etc/systemd/system/containerd.service.d/20-criu-shim.conf
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shim.errors import InvalidArgument
from shim.install import containerd_config

NODE_CONFIG = Path(__file__).resolve().parents[2] / "node-config"
CRI_SOCKET = "/run/criu-shim/cri.sock"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
UNIT = Path("etc/systemd/system/criu-shim.service")
LAUNCHER = Path("usr/local/bin/containerd-shim-criu-v2")
KUBELET_DROP_IN = Path("etc/systemd/system/kubelet.service.d/20-criu-shim.conf")
CONTAINERD_DROP_IN = Path("etc/systemd/system/containerd.service.d/20-criu-shim.conf")
SHIM_PATH_DIR = Path("usr/local/lib/criu-shim/runc-shim")
CONTAINERD_CONFIG = Path("etc/containerd/config.toml")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Change:
    path: Path  # absolute, under the root
    before: bytes | None  # None: the file does not exist
    after: bytes
    mode: int

    @property
    def changes_anything(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class Node:
    """The node as install sees it: where things are, which containerd, which Python runs criu-shim."""

    root: Path
    containerd_config: Path  # absolute, under root
    containerd_version: str | None  # "1.7.24", "2.4.2"; None: unknown (the config's version decides)
    criu_shim: str  # the criu-shim executable the unit runs
    python: str  # the interpreter that has criu-shim (the launcher's restore path)
    runc_shim: str  # the stock containerd-shim-runc-v2 the launcher becomes
    keep_default_runtime: bool = False
    kubelet: bool = True

    def under(self, relative: Path) -> Path:
        return self.root / relative

    @property
    def is_1_6(self) -> bool:
        return (self.containerd_version or "").lstrip("v").startswith("1.6.")


def changes(node: Node) -> list[Change]:
    """Every file install would write, with its present and its new content."""
    config_before = _read(node.containerd_config)
    launcher_path = "/" + str(LAUNCHER)
    empty_version = containerd_config.version_for(node.containerd_version) if node.containerd_version else None
    merged = containerd_config.merge(_text(config_before, node.containerd_config), str(node.containerd_config),
                                     launcher_path, node.keep_default_runtime, empty_version)
    wanted = [
        (node.under(UNIT), unit(node, _containerd_socket(merged)).encode(), 0o644),
        (node.under(LAUNCHER), launcher(node.python, node.runc_shim).encode(), 0o755),
        (node.containerd_config, merged.encode(), 0o644),
    ]
    if node.kubelet:
        wanted.append((node.under(KUBELET_DROP_IN), kubelet_drop_in().encode(), 0o644))
    if node.is_1_6:
        wanted.append((node.under(SHIM_PATH_DIR / "containerd-shim-runc-v2"),
                       launcher(node.python, node.runc_shim).encode(), 0o755))
        wanted.append((node.under(CONTAINERD_DROP_IN), containerd_drop_in().encode(), 0o644))
    return [Change(path, _read(path), after, mode) for path, after, mode in wanted]


def _text(data: bytes | None, path: Path) -> str:
    try:
        return (data or b"").decode("utf-8")  # TOML is UTF-8
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1 if data else 1
        raise InvalidArgument(f"{path}:{line}: not UTF-8 (byte {exc.start}), so not TOML; criu-shim cannot merge "
                              "it; nothing was changed") from None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _containerd_socket(config_text: str) -> str:
    """containerd's CRI socket: `[grpc] address`, else containerd's default."""
    address = tomllib.loads(config_text).get("grpc", {}).get("address")
    return address if isinstance(address, str) and address.startswith("/") else CONTAINERD_SOCKET


def unit(node: Node, containerd_socket: str) -> str:
    """node-config/criu-shim.service with this node's criu-shim and containerd socket."""
    text = (NODE_CONFIG / "criu-shim.service").read_text()
    text = text.replace("ExecStart=/usr/local/bin/criu-shim serve", f"ExecStart={node.criu_shim} serve")
    return text.replace(f"unix://{CONTAINERD_SOCKET}", f"unix://{containerd_socket}")


def launcher(python: str, runc_shim: str) -> str:
    template = (NODE_CONFIG / "containerd-shim-criu-v2").read_text()
    return template.replace("@PYTHON@", python).replace("@RUNC_SHIM@", runc_shim)


def kubelet_drop_in() -> str:
    endpoint = f"unix://{CRI_SOCKET}"
    return ("# criu-shim install: the kubelet talks CRI to criu-shim, which relays to containerd.\n"
            "# Flags come last on the kubelet's command line, so they win over kubeadm-flags.env.\n"
            "[Unit]\nAfter=criu-shim.service\nWants=criu-shim.service\n\n[Service]\n"
            f'Environment="KUBELET_EXTRA_ARGS=--container-runtime-endpoint={endpoint} '
            f'--image-service-endpoint={endpoint}"\n')


def containerd_drop_in() -> str:
    return ("# criu-shim install (containerd 1.6 ignores runtime_path): criu-shim's launcher answers to the\n"
            "# stock shim's name first on containerd's PATH and execs the real one by its full path.\n"
            f'[Service]\nEnvironment="PATH=/{SHIM_PATH_DIR}:{SYSTEM_PATH}"\n')
