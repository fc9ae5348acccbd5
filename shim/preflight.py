"""`criu-shim check`: what this node can and cannot do for checkpoint/restore.

Probing (subprocesses, /proc, /sys) is kept apart from judging: the probes only
record what they saw, `assess()` is pure and turns those facts into findings, so
every rule is unit-tested on fabricated facts and the probes stay dumb. Probes
never raise for a missing or broken tool: "not found" is a fact like any other.
"""

from __future__ import annotations

import enum
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from shim.criu import (
    CRIU_FLOOR,
    CRIU_INET_FIX,
    CRIU_MISSING,
    KERNEL_INET_BREAK,
    FeatureProbe,
    parse_criu_version,
    probe_feature,
)
from shim.hosttools import NUMBERS, Version, last_line, parse_kernel_release, run_probe, show, version_in
from shim.paths_env import load_paths

CRIU_FEATURES = ("network_lock_nftables", "tcp_half_closed", "timens", "external_net_ns",
                 "mem_dirty_track", "uffd", "uffd-noncoop")
# containerd releases whose CRI returns Unimplemented for CheckpointContainer.
CONTAINERD_TARGETS = ((1, 6), (1, 7))
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
# The other capabilities CRIU uses on a dump or a restore (it runs as root, with containerd's set).
CRIU_CAPS = {
    2: ("CAP_DAC_OVERRIDE", "reading and writing files of every user"),
    6: ("CAP_SETGID", "restoring each process's groups"),
    7: ("CAP_SETUID", "restoring each process's user"),
    12: ("CAP_NET_ADMIN", "TCP repair and network locking"),
    18: ("CAP_SYS_CHROOT", "entering the container's root on restore"),
    19: ("CAP_SYS_PTRACE", "seizing the processes it dumps"),
}
NON_ROOT = "non-root workloads"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Status(enum.Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


class CgroupMode(enum.StrEnum):
    """How this node mounts cgroups (a StrEnum: `--json` shows the plain word)."""

    V1 = "v1"  # v1 controllers only ("legacy")
    HYBRID = "hybrid"  # v1 controllers, cgroup2 at /sys/fs/cgroup/unified
    V2 = "v2"  # /sys/fs/cgroup is cgroup2
    UNKNOWN = "unknown"  # neither mountinfo nor the files tell


@dataclass(frozen=True)
class Finding:
    area: str
    status: Status
    detail: str


# ---------------------------------------------------------------- facts


@dataclass(frozen=True)
class ToolProbe:
    """One executable: where we looked, what we found, what `--version` said."""

    name: str
    looked_at: str  # human description of the search, for "not found" messages
    path: str | None
    version_output: str = ""
    error: str = ""  # why it could not be run, when found but unusable


@dataclass(frozen=True)
class CriuProbe:
    tool: ToolProbe
    check_ok: bool | None  # None: `criu check` was not run (no binary)
    check_last_line: str = ""
    features: tuple[FeatureProbe, ...] = ()


@dataclass(frozen=True)
class LsmProbe:
    active: tuple[str, ...] | None  # None: could not be read
    unknown_reason: str = ""
    selinux_enforcing: bool | None = None  # None: selinuxfs absent


@dataclass(frozen=True)
class PrivilegeProbe:
    euid: int
    cap_eff: int | None  # None: /proc/self/status unreadable
    # CRIU's first step on each process: prlimit() on a process of another user. None: not tried.
    prlimit_other_user: bool | None = None


@dataclass(frozen=True)
class Facts:
    kernel: str
    criu: CriuProbe
    runc: ToolProbe
    containerd: ToolProbe
    checkpointctl: ToolProbe
    cgroup: CgroupMode
    lsm: LsmProbe
    privileges: PrivilegeProbe
    criu_on_path: str | None  # what a runc that ignores --criu would execute


# ---------------------------------------------------------------- version parsing


def parse_runc_version(text: str) -> Version | None:
    """`runc --version`: "runc version 1.1.15+ds1"."""
    return version_in(r"^runc version\s+" + NUMBERS, text)


def parse_containerd_version(text: str) -> Version | None:
    """`containerd --version`: "containerd github.com/containerd/containerd[/v2] v1.7.24 <commit>"
    (distributions drop the "v": "1.7.24~ds1")."""
    return version_in(r"^containerd\s+\S+\s+" + NUMBERS, text)


# ---------------------------------------------------------------- probing


def _paths_env() -> dict[str, str]:
    # A node without the dev setup has no paths.env: fall back to $PATH silently.
    try:
        return load_paths()
    except OSError:
        return {}


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tool(name: str, explicit: str | None, configured: str | None, configured_key: str) -> ToolProbe:
    """An explicit flag is taken literally (no fallback: the user asked for that one);
    otherwise the paths.env entry if it exists, otherwise `name` on $PATH."""
    if explicit is not None:
        path = Path(explicit) if "/" in explicit else Path(shutil.which(explicit) or explicit)
        return ToolProbe(name, f"{explicit} (given on the command line)", str(path) if _executable(path) else None)
    if configured and _executable(Path(configured)):
        return ToolProbe(name, f"{configured} (paths.env {configured_key})", configured)
    found = shutil.which(name)
    where = f"{configured} (paths.env {configured_key}) or " if configured else ""
    return ToolProbe(name, f"{where}`{name}` on PATH", found)


def with_version(tool: ToolProbe, *flag: str) -> ToolProbe:
    if tool.path is None:
        return tool
    code, output = run_probe([tool.path, *flag])
    if code is None:
        return ToolProbe(tool.name, tool.looked_at, tool.path, "", output)
    return ToolProbe(tool.name, tool.looked_at, tool.path, output.strip())


def probe_criu(explicit: str | None) -> CriuProbe:
    paths = _paths_env()
    tool = with_version(find_tool("criu", explicit, paths.get("CRIU_BIN"), "CRIU_BIN"), "--version")
    if tool.path is None or tool.error:
        return CriuProbe(tool, None)
    code, output = run_probe([tool.path, "check"])
    features = tuple(probe_feature(tool.path, name) for name in CRIU_FEATURES)
    return CriuProbe(tool, code == 0, last_line(output), features)


def probe_containerd(explicit: str | None) -> ToolProbe:
    # paths.env and users alike may name the bin directory rather than the binary.
    if explicit is not None and Path(explicit).is_dir():
        explicit = str(Path(explicit) / "containerd")
    configured = _paths_env().get("CONTAINERD_1_7")
    if configured:
        configured = str(Path(configured) / "containerd")
    return with_version(find_tool("containerd", explicit, configured, "CONTAINERD_1_7"), "--version")


def _mount_types(mountinfo: str) -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo lines."""
    types = {}
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if sep and len(fields) > 4 and after.split():
            types[fields[4]] = after.split()[0]
    return types


def fs_type_at(path: Path, mountinfo: str) -> str | None:
    """The type of the file system `path` lies on: that of the deepest mount point above it (the last
    mounted there, when mounts are stacked)."""
    types = _mount_types(mountinfo)
    return next((types[str(p)] for p in (path, *path.parents) if str(p) in types), None)


def probe_cgroup(mountinfo: str, root: Path = CGROUP_ROOT) -> CgroupMode:
    """v2 when /sys/fs/cgroup itself is cgroup2; hybrid when v1 controllers sit beside a
    cgroup2 "unified" mount; v1 when there are only v1 controllers. mountinfo says what is
    mounted (the statfs magic, without ctypes); the files are the fallback when it is unreadable."""
    types = _mount_types(mountinfo)
    if types.get(str(root)) == "cgroup2" or (root / "cgroup.controllers").exists():
        return CgroupMode.V2
    v1 = any(kind == "cgroup" and mount.startswith(f"{root}/") for mount, kind in types.items())
    v1 = v1 or (root / "memory" / "memory.limit_in_bytes").exists()
    unified = types.get(f"{root}/unified") == "cgroup2" or (root / "unified" / "cgroup.controllers").exists()
    if v1:
        return CgroupMode.HYBRID if unified else CgroupMode.V1
    return CgroupMode.UNKNOWN


def probe_lsm(security: Path = Path("/sys/kernel/security"), selinuxfs: Path = Path("/sys/fs/selinux")) -> LsmProbe:
    enforce = selinuxfs / "enforce"
    try:
        selinux = enforce.read_text().strip() == "1" if enforce.exists() else None
    except OSError:
        selinux = None
    lsm = security / "lsm"
    if not lsm.exists():
        # Mounting securityfs would answer, but a preflight must not change the node.
        return LsmProbe(None, "securityfs not mounted", selinux)
    try:
        names = tuple(name for name in lsm.read_text().strip().split(",") if name)
    except OSError as exc:
        return LsmProbe(None, f"cannot read {lsm}: {exc.strerror}", selinux)
    return LsmProbe(names, "", selinux)


def parse_cap_eff(status: str) -> int | None:
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status, re.MULTILINE)
    return int(match.group(1), 16) if match else None


def probe_privileges() -> PrivilegeProbe:
    try:
        cap_eff = parse_cap_eff(Path("/proc/self/status").read_text())
    except OSError:
        cap_eff = None
    return PrivilegeProbe(os.geteuid(), cap_eff, probe_prlimit_other_user())


def probe_prlimit_other_user(uid: int = 65534) -> bool | None:
    """Can we read the resource limits of another user's process, as CRIU does on every dump?

    Measured, not inferred: a `sleep` running as `uid` (nobody) is asked for its
    RLIMIT_CPU with prlimit(), CRIU's own call. None when that cannot be tried.
    """
    if os.geteuid() != 0:
        return None
    try:
        child = subprocess.Popen(["sleep", "30"], user=uid, group=uid, extra_groups=[],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        resource.prlimit(child.pid, resource.RLIMIT_CPU)
        return True
    except PermissionError:
        return False
    except OSError:
        return None
    finally:
        child.kill()
        child.wait()


def probe_kernel() -> str:
    return os.uname().release


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def probe(criu: str | None = None, runc: str | None = None, containerd_bin: str | None = None) -> Facts:
    paths = _paths_env()
    return Facts(
        kernel=probe_kernel(),
        criu=probe_criu(criu),
        runc=with_version(find_tool("runc", runc, paths.get("RUNC_BIN"), "RUNC_BIN"), "--version"),
        containerd=probe_containerd(containerd_bin),
        checkpointctl=find_tool("checkpointctl", None, paths.get("CHECKPOINTCTL_BIN"), "CHECKPOINTCTL_BIN"),
        cgroup=probe_cgroup(_read("/proc/self/mountinfo")),
        lsm=probe_lsm(),
        privileges=probe_privileges(),
        criu_on_path=shutil.which("criu"),
    )


# ---------------------------------------------------------------- assessment (pure)


def assess(facts: Facts) -> list[Finding]:
    return [*assess_privileges(facts.privileges), *assess_non_root(facts.privileges), *assess_kernel(facts.kernel),
            *assess_criu(facts.criu, facts.kernel), *assess_features(facts.criu),
            *assess_runc(facts.runc, facts.criu, facts.criu_on_path), *assess_containerd(facts.containerd),
            *assess_cgroup(facts.cgroup), *assess_lsm(facts.lsm), *assess_checkpointctl(facts.checkpointctl)]


def _has_cap(cap_eff: int, cap: int) -> bool:
    return bool(cap_eff >> cap & 1)


def assess_privileges(privileges: PrivilegeProbe) -> list[Finding]:
    findings = [_assess_root(privileges)]
    if privileges.cap_eff is None:
        findings.append(Finding("capabilities", Status.WARN,
                                "cannot read CapEff from /proc/self/status: capabilities unknown"))
    elif not _has_cap(privileges.cap_eff, CAP_SYS_RESOURCE):
        findings.append(Finding(
            "capabilities", Status.WARN,
            "CAP_SYS_RESOURCE is not in the effective set: containerd needs restrict_oom_score_adj = true "
            "in its CRI config, or every pod fails with runc's \"can't get final child's PID from pipe: EOF\""))
    else:
        findings.append(Finding("capabilities", Status.OK, "CAP_SYS_RESOURCE present"))
    return findings


def assess_non_root(privileges: PrivilegeProbe) -> list[Finding]:
    """Processes of other users: CRIU reads their limits with prlimit(), which needs CAP_SYS_RESOURCE."""
    findings = []
    if privileges.cap_eff is not None:
        missing = [f"{name} ({why})" for bit, (name, why) in sorted(CRIU_CAPS.items())
                   if not _has_cap(privileges.cap_eff, bit)]
        if missing:
            findings.append(Finding("criu capabilities", Status.WARN, "CRIU uses capabilities this process lacks: "
                                    + ", ".join(missing) + "; dumps or restores that need them fail"))
    works = privileges.prlimit_other_user
    if works is None and privileges.cap_eff is not None:
        works = _has_cap(privileges.cap_eff, CAP_SYS_RESOURCE)
    if works is None:
        findings.append(Finding(NON_ROOT, Status.WARN, "unknown whether processes of non-root users can be "
                                "checkpointed (run criu-shim check as root)"))
    elif works:
        findings.append(Finding(NON_ROOT, Status.OK, "processes of any user can be checkpointed "
                                "(prlimit() on another user's process works)"))
    else:
        findings.append(Finding(NON_ROOT, Status.WARN, NON_ROOT_MISSING))
    return findings


NON_ROOT_MISSING = (
    "processes running as a non-root user cannot be checkpointed on this node: CRIU reads each process's "
    "resource limits with prlimit(), which for another user's process needs CAP_SYS_RESOURCE, and this node "
    "withholds it even from root (CRIU fails with \"Can't get rlimit 0: Operation not permitted\"); root "
    "processes are not affected. A node for non-root workloads needs CAP_SYS_RESOURCE in containerd's "
    "effective set (runc and CRIU inherit it; systemd's default). Pods with their own user namespace "
    "(hostUsers: false) are dumped here, but CRIU 4.2 cannot restore them (checkpoint-restore/criu#2651)")


def _assess_root(privileges: PrivilegeProbe) -> Finding:
    if privileges.euid != 0:
        return Finding("privileges", Status.FAIL,
                       f"not running as root (euid {privileges.euid}): CRIU needs root to dump and restore containers")
    if privileges.cap_eff is not None and not _has_cap(privileges.cap_eff, CAP_SYS_ADMIN):
        return Finding("privileges", Status.FAIL, "root, but CAP_SYS_ADMIN is not in the effective set: CRIU needs it")
    return Finding("privileges", Status.OK, "root")


def assess_kernel(release: str) -> list[Finding]:
    if parse_kernel_release(release) is None:
        return [Finding("kernel", Status.WARN, f"cannot parse kernel release {release!r}: "
                        "the CRIU/kernel compatibility rules below assume the worst")]
    return [Finding("kernel", Status.INFO, release)]


def assess_criu(criu: CriuProbe, kernel: str) -> list[Finding]:
    tool = criu.tool
    if tool.path is None:
        return [Finding("criu", Status.FAIL, f"{CRIU_MISSING}: not found at {tool.looked_at}")]
    if tool.error:
        return [Finding("criu", Status.FAIL, f"{CRIU_MISSING}: {tool.path} is unusable ({tool.error})")]
    findings = [_assess_criu_version(tool, kernel)]
    if criu.check_ok is False:
        findings.append(Finding("criu check", Status.FAIL,
                                f"`{tool.path} check` failed: {criu.check_last_line}"))
    elif criu.check_ok:
        findings.append(Finding("criu check", Status.OK, criu.check_last_line))
    return findings


def _assess_criu_version(tool: ToolProbe, kernel: str) -> Finding:
    version = parse_criu_version(tool.version_output)
    if version is None:
        seen = last_line(tool.version_output)[:80]
        return Finding("criu", Status.FAIL, f"{CRIU_MISSING}: cannot read a version from `{tool.path} --version` "
                       f"(it said {seen!r}); need CRIU >= {show(CRIU_FLOOR)}")
    if version < CRIU_FLOOR:
        return Finding("criu", Status.FAIL, f"{CRIU_MISSING}: CRIU {show(version)} at {tool.path}; runc and "
                       f"containerd need CRIU >= {show(CRIU_FLOOR)}")
    kernel_version = parse_kernel_release(kernel)
    # An unparsable kernel counts as new: wrongly failing beats a dump that breaks later.
    new_kernel = kernel_version is None or kernel_version >= KERNEL_INET_BREAK
    if version < CRIU_INET_FIX and new_kernel:
        return Finding("criu", Status.FAIL,
                       f"{CRIU_MISSING}: CRIU {show(version)} at {tool.path}. CRIU older than "
                       f"{show(CRIU_INET_FIX)} cannot dump INET sockets (TCP/UDP) on kernel >= "
                       f"{show(KERNEL_INET_BREAK)} (this kernel: {kernel}): any container with a network "
                       f"socket fails with \"Can't get 1:16 opt\". Install CRIU >= {show(CRIU_INET_FIX)}")
    return Finding("criu", Status.OK, f"CRIU {show(version)} at {tool.path}")


# What a missing CRIU feature costs, in plain words.
FEATURE_CONSEQUENCES = {
    "network_lock_nftables": "CRIU cannot lock the network with nftables; it needs iptables "
                             "(`--network-lock iptables`, the default) installed instead",
    "tcp_half_closed": "containers holding half-closed TCP connections cannot be checkpointed",
    "timens": "containers in a time namespace cannot be checkpointed",
    "external_net_ns": "network devices whose peer is in another network namespace (veth) cannot be dumped",
    "mem_dirty_track": "pre-dump/iterative migration unavailable (CONFIG_MEM_SOFT_DIRTY off); "
                       "plain checkpoint and restore still work",
    "uffd": "lazy restore unavailable: restores put all memory in place before the process runs "
            "(slower for large containers)",
    "uffd-noncoop": "lazy restore unavailable (criu-shim needs it for multi-process containers): restores put "
                    "all memory in place before the process runs",
}


def assess_features(criu: CriuProbe) -> list[Finding]:
    findings = []
    for feature in criu.features:
        if feature.supported:
            findings.append(Finding(f"criu {feature.name}", Status.OK, "supported"))
        else:
            consequence = FEATURE_CONSEQUENCES.get(feature.name, "feature unavailable")
            findings.append(Finding(f"criu {feature.name}", Status.WARN, f"{consequence} [{feature.detail}]"))
    return findings


def assess_runc(runc: ToolProbe, criu: CriuProbe, criu_on_path: str | None) -> list[Finding]:
    if runc.path is None:
        return [Finding("runc", Status.FAIL, f"runc not found at {runc.looked_at}: containerd's shim drives "
                        "CRIU through runc, so nothing can be checkpointed")]
    if runc.error:
        return [Finding("runc", Status.FAIL, f"{runc.path} is unusable ({runc.error})")]
    version = parse_runc_version(runc.version_output)
    if version is None:
        return [Finding("runc", Status.WARN, f"cannot read a version from `{runc.path} --version` "
                        f"(it said {last_line(runc.version_output)[:80]!r})")]
    findings = [Finding("runc", Status.OK, f"runc {show(version)} at {runc.path}")]
    # runc 1.3 ignores --criu and runs `criu` from PATH: the CRIU checked above may not be the one used.
    if version >= (1, 3) and criu.tool.path is not None and criu_on_path != criu.tool.path:
        findings.append(Finding("runc", Status.WARN, f"runc {show(version)} ignores --criu and runs `criu` from "
                                f"PATH (here: {criu_on_path or 'none'}); put {Path(criu.tool.path).parent} "
                                "first on the PATH of containerd and its shims"))
    return findings


def assess_containerd(containerd: ToolProbe) -> list[Finding]:
    if containerd.path is None:
        return [Finding("containerd", Status.WARN, f"containerd not found at {containerd.looked_at} "
                        "(use --containerd-bin): cannot tell which release the node runs")]
    if containerd.error:
        return [Finding("containerd", Status.WARN, f"{containerd.path} is unusable ({containerd.error})")]
    version = parse_containerd_version(containerd.version_output)
    if version is None:
        return [Finding("containerd", Status.WARN, f"cannot read a version from `{containerd.path} --version` "
                        f"(it said {last_line(containerd.version_output)[:80]!r})")]
    if version[:2] in CONTAINERD_TARGETS:
        return [Finding("containerd", Status.OK, f"containerd {show(version)}: its CRI has no CheckpointContainer; "
                        "criu-shim provides it")]
    if version >= (2, 0):
        return [Finding("containerd", Status.INFO, f"containerd {show(version)} implements CRI checkpoint "
                        "natively; criu-shim targets 1.6/1.7")]
    return [Finding("containerd", Status.WARN, f"containerd {show(version)} is untested: criu-shim targets 1.6/1.7")]


def assess_cgroup(mode: CgroupMode) -> list[Finding]:
    if mode is CgroupMode.V2:
        return [Finding("cgroup", Status.OK, "cgroup v2")]
    if mode in (CgroupMode.V1, CgroupMode.HYBRID):
        shape = ("hybrid: controllers on v1, v2 mounted at /sys/fs/cgroup/unified" if mode is CgroupMode.HYBRID
                 else "legacy")
        # Checkpointing works on v1; the risk is the kubelet's future, not CRIU.
        return [Finding("cgroup", Status.INFO, f"cgroup v1 ({shape}): checkpoint/restore works; note that "
                        "Kubernetes deprecates cgroup v1 (kubelet failCgroupV1)")]
    return [Finding("cgroup", Status.WARN, "cannot tell the cgroup mode from /proc/self/mountinfo or /sys/fs/cgroup")]


def assess_lsm(lsm: LsmProbe) -> list[Finding]:
    if lsm.active is None:
        findings = [Finding("lsm", Status.INFO, f"unknown ({lsm.unknown_reason})")]
    else:
        findings = [Finding("lsm", Status.INFO, ", ".join(lsm.active) or "none")]
    if lsm.selinux_enforcing:
        findings.append(Finding("selinux", Status.OK, "enforcing: the container's SELinux process and mount labels "
                                "are passed to CRIU on restore"))
    elif lsm.selinux_enforcing is False:
        findings.append(Finding("selinux", Status.INFO, "permissive: labels are still passed on restore, "
                                "denials are only logged"))
    elif lsm.active is not None and "selinux" in lsm.active:
        findings.append(Finding("selinux", Status.WARN, "listed as active but /sys/fs/selinux is not mounted"))
    else:
        findings.append(Finding("selinux", Status.INFO, "not active: no SELinux labels to restore"))
    return findings


def assess_checkpointctl(tool: ToolProbe) -> list[Finding]:
    if tool.path is None:
        return [Finding("checkpointctl", Status.WARN, f"not found at {tool.looked_at}: checkpoint archives "
                        "cannot be inspected independently (optional)")]
    return [Finding("checkpointctl", Status.OK, tool.path)]


# ---------------------------------------------------------------- rendering


def available(findings: list[Finding]) -> bool:
    return not any(finding.status is Status.FAIL for finding in findings)


def summary(findings: list[Finding]) -> str:
    reasons = [finding.detail for finding in findings if finding.status is Status.FAIL]
    if not reasons and any(f.area == NON_ROOT and f.detail == NON_ROOT_MISSING for f in findings):
        return "checkpoint/restore: available, except for processes of non-root users (CAP_SYS_RESOURCE missing)"
    if not reasons:
        return "checkpoint/restore: available"
    return "checkpoint/restore: NOT available: " + "; ".join(reasons)


def render_table(findings: list[Finding]) -> str:
    header = ("AREA", "STATUS", "DETAIL")
    rows = [header, *((f.area, f.status.value.upper(), f.detail) for f in findings)]
    area_width = max(len(row[0]) for row in rows)
    status_width = max(len(row[1]) for row in rows)
    return "\n".join(f"{area:<{area_width}} | {status:<{status_width}} | {detail}" for area, status, detail in rows)


def render_json(facts: Facts, findings: list[Finding]) -> str:
    document = {
        "available": available(findings),
        "summary": summary(findings),
        "findings": [{"area": f.area, "status": f.status.value, "detail": f.detail} for f in findings],
        "facts": asdict(facts),
    }
    return json.dumps(document, indent=2)


def run(criu: str | None = None, runc: str | None = None, containerd_bin: str | None = None,
        as_json: bool = False) -> int:
    """The `criu-shim check` command: 0 when checkpoint/restore can work here, 1 otherwise."""
    facts = probe(criu, runc, containerd_bin)
    findings = assess(facts)
    if as_json:
        print(render_json(facts, findings))
    else:
        print(render_table(findings))
        print(summary(findings))
    sys.stdout.flush()
    return 0 if available(findings) else 1
