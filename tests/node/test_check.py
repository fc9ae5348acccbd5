"""`criu-shim check` tells the truth about this machine: every value it reports is
cross-checked against an independent reading (another command or another file)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shim.paths_env import load_paths
from tests.node.pods import wait_for

CRIU = Path(load_paths().get("CRIU_BIN", "/opt/criu-shim/bin/criu"))
CAP_SYS_RESOURCE = 24

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(os.geteuid() != 0, reason="criu-shim check is only meaningful as root"),
    pytest.mark.skipif(not CRIU.exists(), reason=f"{CRIU} missing: run `make setup`"),
]


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim", "check", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False).stdout.strip()


@pytest.fixture(scope="module")
def table() -> subprocess.CompletedProcess[str]:
    return check()


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    done = check("--json")
    assert done.returncode in (0, 1), done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def row(report: dict[str, Any], area: str) -> dict[str, str]:
    found: list[dict[str, str]] = [finding for finding in report["findings"] if finding["area"] == area]
    (only,) = found
    return only


def test_checkpointing_is_available_here(table: subprocess.CompletedProcess[str]) -> None:
    assert table.returncode == 0, table.stdout + table.stderr
    if prlimit_on_another_user():
        assert table.stdout.splitlines()[-1] == "checkpoint/restore: available"
    else:  # these machines: root without CAP_SYS_RESOURCE
        assert table.stdout.splitlines()[-1] == ("checkpoint/restore: available, except for processes of "
                                                 "non-root users (CAP_SYS_RESOURCE missing)")
    assert re.match(r"^AREA +\| STATUS +\| DETAIL$", table.stdout.splitlines()[0])


def test_criu_version_matches_criu_itself(report: dict[str, Any]) -> None:
    version = re.search(r"Version: (\S+)", sh(str(CRIU), "--version"))
    assert version is not None
    assert version.group(1).startswith("4.2.")  # this kernel (>= 6.16) needs >= 4.2; setup installs 4.2.x
    assert row(report, "criu") == {"area": "criu", "status": "ok", "detail": f"CRIU {version.group(1)} at {CRIU}"}
    assert row(report, "criu check")["detail"] == sh(str(CRIU), "check").splitlines()[-1]


def test_dirty_tracking_matches_criu_itself(report: dict[str, Any]) -> None:
    supported = subprocess.run([str(CRIU), "check", "--feature", "mem_dirty_track"], capture_output=True,
                               timeout=60, check=False).returncode == 0
    assert row(report, "criu mem_dirty_track")["status"] == ("ok" if supported else "warn")


def test_kernel_matches_uname(report: dict[str, Any]) -> None:
    assert row(report, "kernel")["detail"] == sh("uname", "-r")


def test_cgroup_mode_matches_statfs(report: dict[str, Any]) -> None:
    # stat -f reads the filesystem magic: cgroup2fs at the root is v2, tmpfs means v1 controllers.
    root_type = sh("stat", "-f", "-c", "%T", "/sys/fs/cgroup")
    detail = row(report, "cgroup")["detail"]
    if root_type == "cgroup2fs":
        assert detail == "cgroup v2"
    else:
        assert root_type == "tmpfs"
        assert detail.startswith("cgroup v1")
        hybrid = Path("/sys/fs/cgroup/unified").is_dir() and \
            sh("stat", "-f", "-c", "%T", "/sys/fs/cgroup/unified") == "cgroup2fs"
        assert ("hybrid" in detail) == hybrid


def prlimit_on_another_user() -> bool:
    """util-linux prlimit on a process of nobody: the call CRIU makes for every process it dumps."""
    sleeper = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "sleep", "30"])
    try:
        wait_for(lambda: Path(f"/proc/{sleeper.pid}/status").read_text().count("65534") >= 2)
        return subprocess.run(["prlimit", "--pid", str(sleeper.pid), "--cpu"], capture_output=True,
                              timeout=10).returncode == 0
    finally:
        sleeper.kill()
        sleeper.wait()


def test_non_root_workloads_row_matches_a_real_prlimit(report: dict[str, Any]) -> None:
    verdict = row(report, "non-root workloads")
    if prlimit_on_another_user():
        assert verdict["status"] == "ok"
    else:
        assert verdict["status"] == "warn"
        assert verdict["detail"].startswith("processes running as a non-root user cannot be checkpointed")
        assert report["facts"]["privileges"]["prlimit_other_user"] is False


def test_cap_sys_resource_matches_proc_status(report: dict[str, Any]) -> None:
    # The child inherits this process's capabilities: read ours from the kernel's own table.
    cap_eff = int(re.findall(r"^CapEff:\s*(\w+)", Path("/proc/self/status").read_text(), re.MULTILINE)[0], 16)
    capabilities = row(report, "capabilities")
    if cap_eff >> CAP_SYS_RESOURCE & 1:
        assert capabilities["status"] == "ok"
    else:
        assert capabilities["status"] == "warn"
        assert "containerd needs restrict_oom_score_adj = true" in capabilities["detail"]


def test_lsm_matches_securityfs(report: dict[str, Any]) -> None:
    lsm = Path("/sys/kernel/security/lsm")
    expected = lsm.read_text().strip().replace(",", ", ") if lsm.exists() else "unknown (securityfs not mounted)"
    assert row(report, "lsm")["detail"] == expected
    enforce = Path("/sys/fs/selinux/enforce")
    if not enforce.exists():
        assert row(report, "selinux")["detail"].startswith("not active")


def test_runc_and_containerd_match_their_binaries(report: dict[str, Any]) -> None:
    paths = load_paths()
    runc = re.search(r"runc version (\d+\.\d+\.\d+)", sh(paths["RUNC_BIN"], "--version"))
    assert runc is not None
    assert row(report, "runc")["detail"] == f"runc {runc.group(1)} at {paths['RUNC_BIN']}"
    containerd = sh(f"{paths['CONTAINERD_1_7']}/containerd", "--version").split()[2]
    assert row(report, "containerd")["detail"].startswith(f"containerd {containerd.split('~')[0].lstrip('v')}:")


def test_root_is_reported(report: dict[str, Any]) -> None:
    assert row(report, "privileges") == {"area": "privileges", "status": "ok", "detail": "root"}
    assert report["facts"]["privileges"]["euid"] == 0
