"""`criu-shim install` / `uninstall` on a test root, against each containerd's own default config and an
operator's customised one; every merged config is loaded by the real containerd (`config dump`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shim.install import containerd_config

BINARIES = {v: Path(f"/opt/criu-shim/containerd-{v}/bin") for v in ("1.6", "1.7", "2.x", "2.3", "2.4")}
LAUNCHER = "/usr/local/bin/containerd-shim-criu-v2"
CRI_V2 = "io.containerd.grpc.v1.cri"
CRI_V3 = "io.containerd.cri.v1.runtime"

OPERATOR_V2 = """\
# The operator's containerd config: comments, mirrors, gVisor, systemd cgroups.
version = 2
root = "/var/lib/containerd"   # the big disk

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true   # the kubelet uses the systemd driver
  BinaryName = "/usr/local/sbin/runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.gvisor]
  runtime_type = "io.containerd.runsc.v1"

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["https://mirror.example.com"]
"""

OPERATOR_V3 = """\
# The operator's containerd 2.x config.
version = 3

[grpc]
  address = "/run/k8s/containerd.sock"   # not the default socket

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = '/etc/containerd/certs.d'   # mirrors live there

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    SystemdCgroup = true

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata]
  runtime_type = 'io.containerd.kata.v2'
"""


def present() -> list[str]:
    return [v for v, d in BINARIES.items() if (d / "containerd").exists()]


def criu_shim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", *args], capture_output=True, text=True, timeout=120)


def install(root: Path, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return criu_shim("install", "--root", str(root), "--containerd-bin", str(BINARIES[version]),
                     "--criu-shim-bin", "/usr/local/bin/criu-shim", "--no-check", *extra)


def default_config(version: str) -> str:
    return subprocess.run([str(BINARIES[version] / "containerd"), "config", "default"], capture_output=True,
                          text=True, check=True, timeout=60).stdout


def containerd_accepts(version: str, config: Path) -> dict[str, Any]:
    """containerd itself loads the file (and its dump parses)."""
    dump = subprocess.run([str(BINARIES[version] / "containerd"), "--config", str(config), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    return tomllib.loads(dump.stdout)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in tree.items():
            out.update(leaves(value, (*prefix, key)))
        return out
    return {prefix: tree}


def cri_plugin(config: dict[str, Any]) -> dict[str, Any]:
    plugin = config["plugins"][CRI_V2 if config.get("version", 2) == 2 else CRI_V3]
    return plugin  # type: ignore[no-any-return]


def roundtrip(tmp_path: Path, version: str, original: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Install, check, install again (no change), uninstall (identical tree); the merged config and its dump."""
    root = tmp_path / "root"
    config = root / "etc/containerd/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(original)
    before = snapshot(root)
    done = install(root, version)
    assert done.returncode == 0, done.stderr
    merged_text = config.read_text()
    merged = tomllib.loads(merged_text)
    for line in original.splitlines():  # comments and formatting kept line by line
        if "default_runtime_name" not in line:
            assert line in merged_text.splitlines()
    lost = {k: v for k, v in leaves(tomllib.loads(original)).items() if leaves(merged).get(k) != v
            and k[-1] != "default_runtime_name"}
    assert not lost, lost
    dump = containerd_accepts(version, config)
    again = install(root, version)
    assert again.returncode == 0 and "already installed, nothing to change" in again.stdout
    assert config.read_text() == merged_text
    undone = criu_shim("uninstall", "--root", str(root))
    assert undone.returncode == 0, undone.stderr
    assert snapshot(root) == before  # byte for byte, and nothing left (state, directories)
    return merged, dump


@pytest.mark.parametrize("version", present())
def test_each_containerds_own_default_config(tmp_path: Path, version: str) -> None:
    merged, dump = roundtrip(tmp_path, version, default_config(version))
    containerd = cri_plugin(dump)["containerd"]
    assert containerd["default_runtime_name"] == "criu"
    criu = containerd["runtimes"]["criu"]
    assert criu["runtime_type"] == "io.containerd.runc.v2" and criu["runtime_path"] == LAUNCHER
    assert criu["container_annotations"] == ["restore.criu-shim.io/*", "org.criu.config"]
    assert cri_plugin(merged)["containerd"]["runtimes"]["criu"]["options"] == \
        cri_plugin(merged)["containerd"]["runtimes"]["runc"]["options"]


@pytest.mark.parametrize("version", [v for v in present() if v.startswith("1.")])
def test_operator_config_v2_keeps_mirrors_runtimes_and_systemd_cgroups(tmp_path: Path, version: str) -> None:
    merged, dump = roundtrip(tmp_path, version, OPERATOR_V2)
    runtimes = cri_plugin(dump)["containerd"]["runtimes"]
    assert runtimes["criu"]["options"]["SystemdCgroup"] is True  # the operator's runc options, copied
    assert runtimes["criu"]["options"]["BinaryName"] == "/usr/local/sbin/runc"
    assert runtimes["gvisor"]["runtime_type"] == "io.containerd.runsc.v1"
    assert cri_plugin(dump)["registry"]["mirrors"]["docker.io"]["endpoint"] == ["https://mirror.example.com"]


@pytest.mark.parametrize("version", [v for v in present() if v.startswith("2.")])
def test_operator_config_v3_keeps_its_socket_registry_and_runtimes(tmp_path: Path, version: str) -> None:
    root = tmp_path / "root"
    dry = tmp_path / "dry"
    (dry / "etc/containerd").mkdir(parents=True)
    (dry / "etc/containerd/config.toml").write_text(OPERATOR_V3)
    diff = install(dry, version, "--dry-run").stdout
    assert "--runtime-endpoint unix:///run/k8s/containerd.sock" in diff  # the unit follows [grpc] address
    merged, dump = roundtrip(tmp_path, version, OPERATOR_V3)
    assert root.exists()
    runtimes = dump["plugins"][CRI_V3]["containerd"]["runtimes"]
    assert runtimes["criu"]["options"]["SystemdCgroup"] is True
    assert runtimes["kata"]["runtime_type"] == "io.containerd.kata.v2"
    assert dump["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_dry_run_prints_every_diff_and_changes_nothing(tmp_path: Path) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(OPERATOR_V2)
    before = snapshot(root)
    done = install(root, version, "--dry-run")
    assert done.returncode == 0, done.stderr
    for name in ("etc/systemd/system/criu-shim.service", "usr/local/bin/containerd-shim-criu-v2",
                 "etc/containerd/config.toml", "etc/systemd/system/kubelet.service.d/20-criu-shim.conf"):
        assert f"+++ {root / name}" in done.stdout
    assert '-  default_runtime_name = "runc"' in done.stdout and '+  default_runtime_name = "criu"' in done.stdout
    assert "--- /dev/null" in done.stdout
    assert snapshot(root) == before


def test_containerd_1_6_gets_the_launcher_under_the_stock_name(tmp_path: Path) -> None:
    if "1.6" not in present():
        pytest.skip("no containerd 1.6")
    root = tmp_path / "root"
    done = install(root, "1.6")  # no config yet: containerd ran on its defaults
    assert done.returncode == 0, done.stderr
    shim = root / "usr/local/lib/criu-shim/runc-shim/containerd-shim-runc-v2"
    assert f'CRIU_SHIM_RUNC_SHIM:-{BINARIES["1.6"]}/containerd-shim-runc-v2' in shim.read_text()
    drop_in = (root / "etc/systemd/system/containerd.service.d/20-criu-shim.conf").read_text()
    assert 'Environment="PATH=/usr/local/lib/criu-shim/runc-shim:' in drop_in
    assert tomllib.loads((root / "etc/containerd/config.toml").read_text())["version"] == 2
    containerd_accepts("1.6", root / "etc/containerd/config.toml")
    assert criu_shim("uninstall", "--root", str(root)).returncode == 0
    assert not root.exists() or not any(root.rglob("*"))


# ------------------------------------------------------------------ refusals: nothing changes


@pytest.mark.parametrize("text, where, why", [
    ("version = 2\n[plugins\nx = 1\n", "config.toml:2:", "not valid TOML"),
    ("\x00\x01garbage", "config.toml:1:", "not valid TOML"),
    ("version = 2\nversion = 3\n", "config.toml", "not valid TOML"),
    ('[plugins.cri]\n  sandbox_image = "x"\n', "config.toml", "version 1"),
    ("version = 1\n", "config.toml:1:", "config version 1 is not one criu-shim merges"),
    ('version = "2"\n', "config.toml:1:", "config version '2' is not one"),
    ("version = 9\n", "config.toml:1:", "config version 9 is not one"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.criu]\n  runtime_type = '
     '"io.containerd.runc.v2"\n  runtime_path = "/opt/other/shim"\n', "config.toml:2:",
     "a runtime named 'criu' is already configured and it is not criu-shim's"),
    ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  default_runtime_name = "kata"\n'
     '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]\n  runtime_type = "io.containerd.kata.v2"\n',
     "config.toml:3:", "--keep-default-runtime"),
    ('version = 2\nplugins = "none"\n', "config.toml:2:", "`plugins` is a String, not a table"),
])
def test_a_config_install_cannot_merge_is_refused_and_nothing_changes(tmp_path: Path, text: str, where: str,
                                                                      why: str) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_bytes(text.encode())
    before = snapshot(root)
    for extra in ((), ("--dry-run",)):
        done = install(root, version, *extra)
        assert done.returncode == 1
        assert done.stderr.startswith(f"criu-shim: {root}/etc/containerd/") and where in done.stderr, done.stderr
        assert why in done.stderr and "nothing was changed" in done.stderr
        assert "Traceback" not in done.stderr
        assert snapshot(root) == before


def test_uninstall_refuses_files_changed_since_install_unless_forced(tmp_path: Path) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    config = root / "etc/containerd/config.toml"
    config.write_text(OPERATOR_V2)
    config.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(config, 0, 4242)  # a group of the operator's: install and uninstall keep it
    owner = (config.stat().st_uid, config.stat().st_gid)
    assert install(root, version).returncode == 0
    assert config.stat().st_mode & 0o777 == 0o640 and (config.stat().st_uid, config.stat().st_gid) == owner
    kept = list((root / "var/lib/criu-shim/install").iterdir())
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in kept)
    assert (root / "var/lib/criu-shim/install").stat().st_mode & 0o777 == 0o700
    config.write_text(config.read_text() + "# edited after install\n")
    refused = criu_shim("uninstall", "--root", str(root))
    assert refused.returncode == 1 and "changed since criu-shim install" in refused.stderr
    assert str(config) in refused.stderr and "--force" in refused.stderr
    assert (root / "etc/systemd/system/criu-shim.service").exists()  # nothing was undone
    forced = criu_shim("uninstall", "--root", str(root), "--force")
    assert forced.returncode == 0, forced.stderr
    assert config.read_text() == OPERATOR_V2 and config.stat().st_mode & 0o777 == 0o640
    assert (config.stat().st_uid, config.stat().st_gid) == owner
    nothing = criu_shim("uninstall", "--root", str(root))
    assert nothing.returncode == 1 and "nothing to uninstall" in nothing.stderr


def test_merge_is_pure_and_idempotent_without_containerd() -> None:
    once = containerd_config.merge(OPERATOR_V2, "x", LAUNCHER)
    assert containerd_config.merge(once, "x", LAUNCHER) == once
    kept = containerd_config.merge(OPERATOR_V2, "x", LAUNCHER, keep_default=True)
    assert tomllib.loads(kept)["plugins"][CRI_V2]["containerd"]["default_runtime_name"] == "runc"
    assert containerd_config.version_for("1.6.20") == 2 and containerd_config.version_for("v2.4.2") == 3


def test_a_config_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_bytes(b"version = 2\n# caf\xe9\n")
    before = snapshot(root)
    done = install(root, version)
    assert done.returncode == 1 and "config.toml:2: not UTF-8" in done.stderr and "Traceback" not in done.stderr
    assert snapshot(root) == before


def test_a_2x_config_on_a_1x_containerd_is_refused(tmp_path: Path) -> None:
    if "1.7" not in present():
        pytest.skip("no containerd 1.7")
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text("# 2.x\nversion = 3\n")
    done = install(root, "1.7")
    assert done.returncode == 1
    assert "config.toml:2: config version 3 is for containerd 2.x, but this node's containerd is 1.x" in done.stderr
    assert not (root / "var").exists()


def test_a_symlinked_config_stays_a_symlink(tmp_path: Path) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    root = tmp_path / "root"
    (root / "etc/containerd").mkdir(parents=True)
    real = root / "srv/containerd.toml"
    real.parent.mkdir(parents=True)
    real.write_text(default_config(version))
    (root / "etc/containerd/config.toml").symlink_to(real)
    before = snapshot(root)
    assert install(root, version).returncode == 0
    assert (root / "etc/containerd/config.toml").is_symlink()
    assert 'default_runtime_name = "criu"' in real.read_text()
    assert criu_shim("uninstall", "--root", str(root)).returncode == 0
    assert (root / "etc/containerd/config.toml").is_symlink() and snapshot(root) == before


def test_python_and_criu_shim_paths_for_an_image(tmp_path: Path) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    done = install(tmp_path / "image", version, "--python", "/usr/lib/criu-shim/venv/bin/python", "--dry-run")
    assert 'PYTHON="${CRIU_SHIM_PYTHON:-/usr/lib/criu-shim/venv/bin/python}"' in done.stdout
    assert "+ExecStart=/usr/local/bin/criu-shim serve" in done.stdout
    assert not (tmp_path / "image").exists()


def test_no_config_and_no_containerd_says_what_to_give(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = criu_shim("install", "--root", str(root), "--no-check", "--criu-shim-bin", "/x/criu-shim")
    if "containerd" in subprocess.run(["sh", "-c", "command -v containerd"], capture_output=True, text=True).stdout:
        pytest.skip("containerd is on PATH here")
    assert done.returncode == 1
    assert f"{root}/etc/containerd/config.toml: missing or empty, and no containerd binary" in done.stderr
    assert "--containerd-bin" in done.stderr and not root.exists()


def test_install_runs_criu_shim_check(tmp_path: Path) -> None:
    version = (present() or pytest.skip("no containerd under /opt/criu-shim"))[0]
    root = tmp_path / "root"
    done = criu_shim("install", "--root", str(root), "--containerd-bin", str(BINARIES[version]),
                     "--criu-shim-bin", "/usr/local/bin/criu-shim")
    assert "wrote " in done.stdout
    assert "criu check" in done.stdout and "AREA" in done.stdout  # the preflight table
    assert criu_shim("uninstall", "--root", str(root)).returncode == 0


def test_the_installed_unit_is_node_configs() -> None:
    from shim.install import files

    node = files.Node(Path("/"), Path("/etc/containerd/config.toml"), "1.7.24", "/usr/local/bin/criu-shim",
                      "/usr/bin/python3", "/usr/bin/containerd-shim-runc-v2")
    assert files.unit(node, files.CONTAINERD_SOCKET) == (files.NODE_CONFIG / "criu-shim.service").read_text()
    assert "ExecStart=/opt/x/criu-shim serve" in files.unit(
        files.Node(Path("/"), Path("/c"), None, "/opt/x/criu-shim", "p", "r"), "/run/k8s/c.sock")


def test_help_has_examples() -> None:
    for command in ("install", "uninstall"):
        out = criu_shim(command, "--help").stdout
        assert "examples:" in out and f"criu-shim {command}" in out
    assert "--dry-run" in criu_shim("install", "--help").stdout


def test_the_kubelet_drop_in_sets_node_configs_flags() -> None:
    from shim.install import files

    flags = (files.NODE_CONFIG / "kubelet-flags.env").read_text()
    wanted = next(line for line in flags.splitlines() if line.startswith("KUBELET_EXTRA_ARGS="))
    value = wanted.split("=", 1)[1].strip('"')
    assert f'Environment="KUBELET_EXTRA_ARGS={value}"' in files.kubelet_drop_in()
