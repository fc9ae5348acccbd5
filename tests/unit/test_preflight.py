"""`criu-shim check`: the rules on fabricated facts, the parsers on real and garbage output,
the probes on fake trees, and the CLI end to end with a fake `criu` script."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from shim import preflight
from shim.preflight import (
    CgroupMode,
    CriuProbe,
    Facts,
    FeatureProbe,
    Finding,
    LsmProbe,
    PrivilegeProbe,
    Status,
    ToolProbe,
    assess,
)
from tests.support.criu import fake_criu

ALL_CAPS = (1 << 41) - 1
NO_SYS_RESOURCE = ALL_CAPS & ~(1 << preflight.CAP_SYS_RESOURCE)


def criu(version_output: str = "Version: 4.2.1\n", check_ok: bool = True, missing: tuple[str, ...] = ()) -> CriuProbe:
    features = tuple(FeatureProbe(name, name not in missing, "nope" if name in missing else f"{name} is supported")
                     for name in preflight.CRIU_FEATURES)
    return CriuProbe(ToolProbe("criu", "/opt/criu-shim/bin/criu", "/opt/criu-shim/bin/criu", version_output),
                     check_ok, "Looks good." if check_ok else "Error (criu/vdso.c:123): vdso: Unexpected rt vDSO area bounds",
                     features)


def tool(name: str, version_output: str) -> ToolProbe:
    return ToolProbe(name, f"/opt/{name}", f"/opt/{name}", version_output)


def healthy(**overrides: object) -> Facts:
    """A node where everything works: each test breaks one thing."""
    facts = Facts(
        kernel="6.18.44-fc-v669",
        criu=criu(),
        runc=tool("runc", "runc version 1.1.15+ds1\ncommit: 1.1.15+ds1-2+b4\nspec: 1.2.0"),
        containerd=tool("containerd", "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1"),
        checkpointctl=ToolProbe("checkpointctl", "/opt/checkpointctl", "/opt/checkpointctl"),
        cgroup=CgroupMode.V2,
        lsm=LsmProbe(("lockdown", "capability", "landlock", "bpf")),
        privileges=PrivilegeProbe(0, ALL_CAPS),
        criu_on_path="/opt/criu-shim/bin/criu",
    )
    return replace(facts, **overrides)  # type: ignore[arg-type]


def by_area(findings: list[Finding], area: str) -> list[Finding]:
    return [finding for finding in findings if finding.area == area]


def status_of(findings: list[Finding], area: str) -> Status:
    (finding,) = by_area(findings, area)
    return finding.status


def fails(findings: list[Finding]) -> list[str]:
    return [finding.detail for finding in findings if finding.status is Status.FAIL]


# ---------------------------------------------------------------- rules


def test_healthy_node_is_available() -> None:
    findings = assess(healthy())
    assert fails(findings) == []
    assert preflight.available(findings)
    assert preflight.summary(findings) == "checkpoint/restore: available"
    assert status_of(findings, "criu") is Status.OK


def test_criu_4_1_on_kernel_6_18_fails_with_inet_explanation() -> None:
    findings = assess(healthy(criu=criu("Version: 4.1.1\n"), kernel="6.18.0-1-amd64"))
    (detail,) = fails(findings)
    assert "CRIU older than 4.2 cannot dump INET sockets (TCP/UDP) on kernel >= 6.16" in detail
    assert preflight.CRIU_MISSING in detail
    assert preflight.summary(findings).startswith("checkpoint/restore: NOT available: ")


def test_criu_4_1_on_old_kernel_is_fine() -> None:
    assert fails(assess(healthy(criu=criu("Version: 4.1.1\n"), kernel="6.1.0-31-amd64"))) == []


def test_criu_4_2_1_on_kernel_6_18_is_ok() -> None:
    findings = assess(healthy(criu=criu("Version: 4.2.1\n"), kernel="6.18.0"))
    assert status_of(findings, "criu") is Status.OK
    assert "4.2.1" in by_area(findings, "criu")[0].detail


def test_missing_criu_fails_with_the_e2e_phrase() -> None:
    missing = CriuProbe(ToolProbe("criu", "/opt/criu-shim/bin/criu (paths.env CRIU_BIN) or `criu` on PATH", None), None)
    findings = assess(healthy(criu=missing))
    (detail,) = fails(findings)
    assert "CRIU binary not found or too old" in detail
    assert "not found at /opt/criu-shim/bin/criu" in detail
    assert not any(finding.area.startswith("criu ") for finding in findings)  # no feature rows without CRIU


def test_criu_older_than_3_16_fails_anywhere() -> None:
    (detail,) = fails(assess(healthy(criu=criu("Version: 3.15\nGitID: v3.15\n"), kernel="5.10.0")))
    assert "CRIU 3.15" in detail and ">= 3.16" in detail


def test_failing_criu_check_fails_with_its_last_line() -> None:
    (detail,) = fails(assess(healthy(criu=criu("Version: 3.17.1\n", check_ok=False), kernel="6.1.0")))
    assert "check` failed" in detail and "Unexpected rt vDSO area bounds" in detail


def test_not_root_fails() -> None:
    findings = assess(healthy(privileges=PrivilegeProbe(1000, 0)))
    assert any("not running as root" in detail for detail in fails(findings))


def test_root_without_cap_sys_admin_fails() -> None:
    findings = assess(healthy(privileges=PrivilegeProbe(0, ALL_CAPS & ~(1 << preflight.CAP_SYS_ADMIN))))
    assert status_of(findings, "privileges") is Status.FAIL


def test_no_cap_sys_resource_warns_about_oom_score_adj() -> None:
    findings = assess(healthy(privileges=PrivilegeProbe(0, NO_SYS_RESOURCE)))
    assert status_of(findings, "capabilities") is Status.WARN
    assert "containerd needs restrict_oom_score_adj = true" in by_area(findings, "capabilities")[0].detail
    assert preflight.available(findings)


def test_non_root_processes_cannot_be_dumped_without_cap_sys_resource() -> None:
    findings = assess(healthy(privileges=PrivilegeProbe(0, NO_SYS_RESOURCE, prlimit_other_user=False)))
    (finding,) = by_area(findings, preflight.NON_ROOT)
    assert finding.status is Status.WARN
    assert "processes running as a non-root user cannot be checkpointed" in finding.detail
    assert "Can't get rlimit 0: Operation not permitted" in finding.detail  # what CRIU will say
    assert "needs CAP_SYS_RESOURCE in containerd's effective set" in finding.detail  # what a node needs
    assert preflight.available(findings)  # root processes still work: a limit, not a failure
    assert preflight.summary(findings) == ("checkpoint/restore: available, except for processes of non-root "
                                           "users (CAP_SYS_RESOURCE missing)")


def test_the_measurement_wins_over_the_capability_bits() -> None:
    measured = assess(healthy(privileges=PrivilegeProbe(0, ALL_CAPS, prlimit_other_user=False)))
    assert status_of(measured, preflight.NON_ROOT) is Status.WARN  # an LSM may refuse what the bits allow
    inferred = assess(healthy(privileges=PrivilegeProbe(0, ALL_CAPS)))
    assert status_of(inferred, preflight.NON_ROOT) is Status.OK
    assert preflight.summary(inferred) == "checkpoint/restore: available"
    unknown = assess(healthy(privileges=PrivilegeProbe(1000, None)))
    assert status_of(unknown, preflight.NON_ROOT) is Status.WARN


def test_other_capabilities_criu_uses_are_named_when_missing() -> None:
    findings = assess(healthy(privileges=PrivilegeProbe(0, ALL_CAPS & ~(1 << 19) & ~(1 << 12))))
    (finding,) = by_area(findings, "criu capabilities")
    assert finding.status is Status.WARN
    assert "CAP_NET_ADMIN (TCP repair and network locking)" in finding.detail
    assert "CAP_SYS_PTRACE (seizing the processes it dumps)" in finding.detail
    assert not by_area(assess(healthy()), "criu capabilities")


def test_missing_dirty_tracking_warns() -> None:
    findings = assess(healthy(criu=criu(missing=("mem_dirty_track",))))
    assert status_of(findings, "criu mem_dirty_track") is Status.WARN
    assert "pre-dump/iterative migration unavailable (CONFIG_MEM_SOFT_DIRTY off)" in \
        by_area(findings, "criu mem_dirty_track")[0].detail
    assert preflight.available(findings)


def test_missing_nftables_lock_warns() -> None:
    findings = assess(healthy(criu=criu(missing=("network_lock_nftables",))))
    assert status_of(findings, "criu network_lock_nftables") is Status.WARN


def test_missing_runc_fails() -> None:
    (detail,) = fails(assess(healthy(runc=ToolProbe("runc", "`runc` on PATH", None))))
    assert "runc not found" in detail


def test_runc_1_3_with_another_criu_on_path_warns() -> None:
    findings = assess(healthy(runc=tool("runc", "runc version 1.3.6+ds1"), criu_on_path="/usr/sbin/criu"))
    assert [f.status for f in by_area(findings, "runc")] == [Status.OK, Status.WARN]
    assert "/opt/criu-shim/bin first on the PATH" in by_area(findings, "runc")[1].detail


def test_missing_checkpointctl_warns() -> None:
    findings = assess(healthy(checkpointctl=ToolProbe("checkpointctl", "`checkpointctl` on PATH", None)))
    assert status_of(findings, "checkpointctl") is Status.WARN
    assert preflight.available(findings)


@pytest.mark.parametrize(("output", "status"), [
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", Status.OK),
    ("containerd github.com/containerd/containerd v1.7.24 88bf19b2105c8b17560993bee28a01ddc2f97182", Status.OK),
    ("containerd github.com/containerd/containerd/v2 2.1.9+unknown ", Status.INFO),
    ("containerd github.com/containerd/containerd v1.5.9 1407cab", Status.WARN),
    ("exec format error", Status.WARN),
])
def test_containerd_release(output: str, status: Status) -> None:
    assert status_of(assess(healthy(containerd=tool("containerd", output))), "containerd") is status


def test_selinux_enforcing_labels_passed_on_restore() -> None:
    findings = assess(healthy(lsm=LsmProbe(("capability", "selinux"), "", True)))
    assert status_of(findings, "selinux") is Status.OK
    assert "labels" in by_area(findings, "selinux")[0].detail


def test_no_selinux_and_unknown_lsms_are_info() -> None:
    findings = assess(healthy(lsm=LsmProbe(None, "securityfs not mounted")))
    assert by_area(findings, "lsm")[0].detail == "unknown (securityfs not mounted)"
    assert status_of(findings, "selinux") is Status.INFO


@pytest.mark.parametrize(("mode", "status"), [(CgroupMode.V2, Status.OK), (CgroupMode.V1, Status.INFO),
                                              (CgroupMode.HYBRID, Status.INFO), (CgroupMode.UNKNOWN, Status.WARN)])
def test_cgroup_modes(mode: CgroupMode, status: Status) -> None:
    findings = assess(healthy(cgroup=mode))
    assert status_of(findings, "cgroup") is status
    if mode is CgroupMode.HYBRID:
        assert "cgroup v1" in by_area(findings, "cgroup")[0].detail


# ---------------------------------------------------------------- garbage in, a clear finding out


@pytest.mark.parametrize("garbage", ["", "Segmentation fault", "Version: four.two", "Version:\n", "\x00\xff"])
def test_unparsable_criu_version_is_a_clear_failure(garbage: str) -> None:
    (detail,) = fails(assess(healthy(criu=criu(garbage))))
    assert "cannot read a version" in detail and preflight.CRIU_MISSING in detail


def test_unparsable_kernel_assumes_the_worst() -> None:
    findings = assess(healthy(kernel="weird", criu=criu("Version: 4.1.1")))
    assert status_of(findings, "kernel") is Status.WARN
    assert any("cannot dump INET sockets" in detail for detail in fails(findings))
    assert fails(assess(healthy(kernel="weird"))) == []


def test_unparsable_runc_version_warns() -> None:
    assert status_of(assess(healthy(runc=tool("runc", "??"))), "runc") is Status.WARN


def test_unusable_criu_fails() -> None:
    broken = CriuProbe(ToolProbe("criu", "x", "/opt/criu", "", "cannot run /opt/criu: Exec format error"), None)
    (detail,) = fails(assess(healthy(criu=broken)))
    assert "Exec format error" in detail and preflight.CRIU_MISSING in detail


# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize(("output", "version"), [
    ("Version: 4.2.1\n", (4, 2, 1)),
    ("Version: 3.17.1\n", (3, 17, 1)),
    ("Version: 4.0\nGitID: v4.0-12-g3a1b2c3\n", (4, 0)),
    ("Version: 3.16.1-dirty\n", (3, 16, 1)),
    ("Warn (criu/kerndat.c:1): something\nVersion: 4.1.1\n", (4, 1, 1)),
    ("4.2.1", None),
    ("garbage", None),
])
def test_parse_criu_version(output: str, version: tuple[int, ...] | None) -> None:
    assert preflight.parse_criu_version(output) == version


def test_parse_other_versions() -> None:
    assert preflight.parse_kernel_release("6.18.44-fc-v669") == (6, 18, 44)
    assert preflight.parse_kernel_release("6.1.0-31-amd64") == (6, 1, 0)
    assert preflight.parse_kernel_release("6.16") == (6, 16)
    assert preflight.parse_kernel_release("linux") is None
    assert preflight.parse_runc_version("runc version 1.1.15+ds1\ncommit: x") == (1, 1, 15)
    assert preflight.parse_runc_version("runc version v1.3.0-rc.1") == (1, 3, 0)
    assert preflight.parse_containerd_version("containerd github.com/containerd/containerd/v2 v2.1.9 abc") == (2, 1, 9)
    assert preflight.parse_cap_eff("Name:\tx\nCapEff:\t000001fffeffffff\n") == 0x1FFFEFFFFFF
    assert preflight.parse_cap_eff("CapEff: zz") is None


# ---------------------------------------------------------------- probes on fake trees

# {root} stands for /sys/fs/cgroup, so that the fallback files of the test host are never seen.
V1 = """31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
37 31 0:34 / {root}/memory rw,relatime - cgroup cgroup rw,memory
"""
HYBRID = V1 + "40 31 0:37 / {root}/unified rw,relatime - cgroup2 cgroup2 rw\n"
V2 = "30 23 0:27 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.mark.parametrize(("mountinfo", "mode"), [(V1, "v1"), (HYBRID, "hybrid"), (V2, "v2"), ("", "unknown"),
                                                 ("garbage\n - \n1 2 3\n", "unknown")])
def test_probe_cgroup(mountinfo: str, mode: str, tmp_path: Path) -> None:
    assert preflight.probe_cgroup(mountinfo.format(root=tmp_path), tmp_path) == mode


def test_probe_cgroup_falls_back_to_files(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert preflight.probe_cgroup("", tmp_path) == "v2"


def test_probe_lsm(tmp_path: Path) -> None:
    security, selinuxfs = tmp_path / "security", tmp_path / "selinux"
    assert preflight.probe_lsm(security, selinuxfs) == LsmProbe(None, "securityfs not mounted", None)
    security.mkdir()
    (security / "lsm").write_text("lockdown,capability,selinux")
    selinuxfs.mkdir()
    (selinuxfs / "enforce").write_text("1")
    assert preflight.probe_lsm(security, selinuxfs) == LsmProbe(("lockdown", "capability", "selinux"), "", True)


def test_find_tool_takes_an_explicit_path_literally(tmp_path: Path) -> None:
    configured = fake_criu(tmp_path, "4.2.1")
    probe = preflight.find_tool("criu", str(tmp_path / "nope"), str(configured), "CRIU_BIN")
    assert probe.path is None and str(tmp_path / "nope") in probe.looked_at
    assert preflight.find_tool("criu", None, str(configured), "CRIU_BIN").path == str(configured)
