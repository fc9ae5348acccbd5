"""node-config/ is what a real node installs: it must parse and agree with the code."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from shim.handoff import RESTORE_ANNOTATIONS

NODE_CONFIG = Path(__file__).resolve().parents[2] / "node-config"


def test_containerd_fragment_registers_the_criu_handler_as_default() -> None:
    config = tomllib.loads((NODE_CONFIG / "containerd-cri.toml").read_text())
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["containerd"]["default_runtime_name"] == "criu"
    criu = cri["containerd"]["runtimes"]["criu"]
    assert criu["runtime_type"] == "io.containerd.runc.v2"  # runc options reach the stock shim
    assert criu["runtime_path"].endswith("containerd-shim-criu-v2")
    assert tuple(criu["container_annotations"]) == RESTORE_ANNOTATIONS


def test_launcher_only_diverts_restores_and_kubelet_points_at_the_proxy() -> None:
    launcher = (NODE_CONFIG / "containerd-shim-criu-v2").read_text()
    assert "\"restore.criu-shim.io/dir\"" in launcher and "exec \"$CRIU_SHIM_RUNC_SHIM\" \"$@\"" in launcher
    assert (NODE_CONFIG / "containerd-shim-criu-v2").stat().st_mode & 0o111
    flags = (NODE_CONFIG / "kubelet-flags.env").read_text()
    assert "--container-runtime-endpoint=unix:///run/criu-shim/cri.sock" in flags
    unit = (NODE_CONFIG / "criu-shim.service").read_text()
    assert "criu-shim serve" in unit and "Before=kubelet.service" in unit


def _rendered(version: str) -> dict[str, Any]:
    from shim.node import render
    from shim.node.layout import NodeLayout
    text = render.containerd_config(NodeLayout(Path("/n")), version, Path("/r/runc"), Path("/cni"), True)
    return tomllib.loads(text)


@pytest.mark.parametrize("version", ["2.1", "2.3", "2.4"])
def test_v3_node_config_of_built_containerds_registers_the_criu_handler(version: str) -> None:
    config = _rendered(version)
    assert config["version"] == 3
    containerd = config["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]
    assert containerd["default_runtime_name"] == "criu"
    criu = containerd["runtimes"]["criu"]
    assert criu["runtime_type"] == "io.containerd.runc.v2"
    assert criu["runtime_path"] == "/n/bin/containerd-shim-criu-v2"
    assert tuple(criu["container_annotations"]) == RESTORE_ANNOTATIONS
    assert criu["options"] == {"BinaryName": "/r/runc", "SystemdCgroup": False}
    # containerd's own restore through CreateContainer is not switched on
    assert "enable_experimental_restore_via_create" not in config["plugins"]["io.containerd.cri.v1.runtime"]


def test_v3_node_config_of_the_native_reference_has_containerds_handler_only() -> None:
    containerd = _rendered("2.x")["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]
    assert containerd["default_runtime_name"] == "runc"
    assert set(containerd["runtimes"]) == {"runc"}


def test_v3_node_config_of_the_native_2_3_reference_switches_its_own_restore_on() -> None:
    runtime = _rendered("2.3-native")["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["enable_experimental_restore_via_create"] is True  # containerd v2.3.7's key
    assert runtime["containerd"]["default_runtime_name"] == "runc"
    assert set(runtime["containerd"]["runtimes"]) == {"runc"}


def test_variants_run_the_binaries_of_their_release(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from shim.node import tools

    for release in ("2_X", "2_3"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "containerd").touch()
    paths = {"CONTAINERD_2_X": str(tmp_path / "2_X"), "CONTAINERD_2_3": str(tmp_path / "2_3"),
             "RUNC_BIN": "/r", "CRIU_BIN": "/c", "CNI_BIN_DIR": "/cni", "CHECKPOINTCTL_BIN": "/k"}
    monkeypatch.setattr(tools, "load_paths", lambda: paths)
    assert tools.tools_for("2.1").containerd_bin_dir == tmp_path / "2_X"
    assert tools.tools_for("2.3-native").containerd_bin_dir == tmp_path / "2_3"
