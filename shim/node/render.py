"""containerd and CNI configuration for a local node (pure: layout in, text out)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from shim.handoff import RESTORE_ANNOTATIONS
from shim.node.layout import NodeLayout

PAUSE_IMAGE = "localhost/criu-shim/pause:1"

# Snapshotters and plugins a local node never uses; disabling them keeps
# containerd's start fast and its log quiet.
_DISABLED = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
             "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
             "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]


def containerd_config(layout: NodeLayout, version: str, runc: Path, cni_bin_dir: Path,
                      restrict_oom: bool, hosts_dir: Path | None = None) -> str:
    """The containerd config file for `version` (shim.node.tools.CONTAINERD_VERSIONS); with
    `hosts_dir`, registries are configured by hosts.toml files there (a fabric node's registry)."""
    if version == "2.x":  # the native reference: containerd's own handler only
        text = _v3(layout, runc, cni_bin_dir, restrict_oom, criu_handler=False)
    elif version == "2.3-native":  # the same, with 2.3's own restore through CreateContainer on
        text = _v3(layout, runc, cni_bin_dir, restrict_oom, criu_handler=False, native_restore=True)
    elif version in ("2.1", "2.3", "2.4"):
        text = _v3(layout, runc, cni_bin_dir, restrict_oom, criu_handler=True)
    else:
        text = _v2(layout, runc, cni_bin_dir, restrict_oom, runtime_path=version != "1.6")
    if hosts_dir is None:
        return text
    images = 'plugins."io.containerd.grpc.v1.cri"' if text.startswith("version = 2") else \
        "plugins.'io.containerd.cri.v1.images'"
    return text + f'\n[{images}.registry]\n  config_path = "{hosts_dir}"\n'


def _common(layout: NodeLayout, version: int) -> str:
    return f"""version = {version}
root = "{layout.root}"
state = "{layout.state}"
disabled_plugins = {json.dumps(_DISABLED)}

[grpc]
  address = "{layout.containerd_socket}"

[ttrpc]
  address = "{layout.containerd_socket}.ttrpc"

[debug]
  level = "info"
"""


def _v2(layout: NodeLayout, runc: Path, cni_bin_dir: Path, restrict_oom: bool, runtime_path: bool) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    # 1.6 ignores runtime_path; its launcher is installed under the stock shim's name instead.
    path_line = f'  runtime_path = "{layout.bin_dir / "containerd-shim-criu-v2"}"\n' if runtime_path else ""
    return _common(layout, 2) + f"""
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = {str(restrict_oom).lower()}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

[{cri}.containerd]
  snapshotter = "overlayfs"
  # Every pod can receive a restored container, so criu-shim's handler is the default.
  default_runtime_name = "criu"

[{cri}.containerd.runtimes.criu]
  # The runc runtime type, so runc options (BinaryName, SystemdCgroup...) reach the
  # stock shim unchanged; runtime_path puts our launcher in front of it.
  runtime_type = "io.containerd.runc.v2"
{path_line}  container_annotations = {json.dumps(list(RESTORE_ANNOTATIONS))}

[{cri}.containerd.runtimes.criu.options]
  BinaryName = "{runc}"
  SystemdCgroup = false

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{cni_bin_dir}"
  conf_dir = "{layout.cni_conf_dir}"
  max_conf_num = 1

[plugins."io.containerd.internal.v1.opt"]
  path = "{layout.root}/opt"
"""


def _v3(layout: NodeLayout, runc: Path, cni_bin_dir: Path, restrict_oom: bool, criu_handler: bool,
        native_restore: bool = False) -> str:
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    # As on 1.7: criu-shim's handler is the default, the stock runc type so runc options reach the
    # stock shim, runtime_path puts our launcher in front of it. containerd's own restore through
    # CreateContainer stays off (2.3's enable_experimental_restore_via_create defaults to false,
    # 2.4 has none). Checkpoint and restore go through criu-shim; for a restore the proxy makes
    # containerd run our launcher for the one task (shim.restore.pod_shim).
    # The native reference of 2.3 has its own restore on instead (internal/cri/config/config.go,
    # RuntimeConfig.EnableExperimentalRestoreViaCreate, containerd v2.3.7).
    switch = "  enable_experimental_restore_via_create = true\n" if native_restore else ""
    criu = f"""
[{runtime}.containerd.runtimes.criu]
  runtime_type = "io.containerd.runc.v2"
  runtime_path = "{layout.bin_dir / "containerd-shim-criu-v2"}"
  container_annotations = {json.dumps(list(RESTORE_ANNOTATIONS))}

[{runtime}.containerd.runtimes.criu.options]
  BinaryName = "{runc}"
  SystemdCgroup = false
""" if criu_handler else ""
    return _common(layout, 3) + f"""
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[{runtime}]
  restrict_oom_score_adj = {str(restrict_oom).lower()}
  enable_selinux = false
{switch}
[{runtime}.containerd]
  default_runtime_name = "{"criu" if criu_handler else "runc"}"
{criu}
[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{runtime}.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  SystemdCgroup = false

[{runtime}.cni]
  bin_dirs = ["{cni_bin_dir}"]
  conf_dir = "{layout.cni_conf_dir}"
  max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.internal.v1.opt']
  path = "{layout.root}/opt"
"""


def cni_conflist(layout: NodeLayout) -> str:
    """A bridge network private to this node; no masquerade, so no iptables rules to leak.

    No loopback entry: containerd's CRI plugin adds the loopback network itself.
    """
    conf = {
        "cniVersion": "1.0.0",
        "name": layout.network_name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": layout.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(layout.cni_ipam_dir),
                    "ranges": [[{"subnet": layout.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ],
    }
    return json.dumps(conf, indent=2) + "\n"


def proxy_config(layout: NodeLayout, criu: Path, extra_dirs: Sequence[Path] = (),
                 extra_registries: Sequence[str] = (), export_registry: str | None = None) -> str:
    """The local node's criu-shim config: its CRIU, its audit log, restores from DIR/checkpoints
    (and `extra_dirs`: a kubelet's checkpoints dir) and images of localhost (and `extra_registries`);
    with `export_registry`, each kubelet checkpoint is published there (`kubectl checkpoint`)."""
    export = f'\n[export]\nregistry = "{export_registry}"\n' if export_registry else ""
    dirs = json.dumps([str(layout.checkpoints_dir), *map(str, extra_dirs)])
    registries = json.dumps(["localhost", *extra_registries])
    return f"""state_dir = "{layout.dir / 'state'}"

[checkpoint]
criu = "{criu}"
audit_log = "{layout.log_dir / 'audit.log'}"

[restore]
enabled = true
allowed_dirs = {dirs}
allowed_registries = {registries}
work_dir = "{layout.dir / 'restore'}"
{export}"""


def shim_launcher(template: str, python: str, runc_shim: Path | str = "containerd-shim-runc-v2") -> str:
    """node-config/containerd-shim-criu-v2 with this node's Python and stock shim baked in."""
    return template.replace("@PYTHON@", python).replace("@RUNC_SHIM@", str(runc_shim))
