"""SELinux labels for a restored container: which CRIU options to pass (pure), and a probe.

CRIU re-applies the SELinux label it recorded at dump unless told otherwise.
A restored container lives in a new pod, whose rootfs containerd mounts with
the *new* container's mount label; with the old label the process could not
touch its own files. So, like CRI-O (`--lsm-profile=selinux:` and
`--lsm-mount-context` from the new spec; anchors 3.5), the restore passes the
new container's labels to CRIU through the CRIU config file runc hands it:

    lsm-profile selinux:<user>:<role>:<type>:<level>
    lsm-mount-context <user>:object_r:container_file_t:<level>

(CRIU config files hold one long option per line without the leading dashes,
its argument after whitespace; `criu --help` lists both options, which need
CRIU >= 3.16. CRIU only replaces an existing `context=` mount option with the
mount context.)

The labels are derived the way containerd 1.6/1.7 derives them at
CreateContainer (`toLabel` + go-selinux `label.InitLabels`), starting from the
policy's container contexts (`lxc_contexts` of the targeted policy):

* process label: `system_u:system_r:container_t:<level>`; the CRI
  `SELinuxOption` user, role and type replace their parts.
* mount label: `system_u:object_r:container_file_t:<level>`; only user and
  level are taken from the options (role and type stay those of a file).
* level: from the options. When the options are entirely empty, containerd
  copies the pod sandbox's process label (`selinux.DupSecOpt`), user, role,
  type and level; so does this module when given that label. Otherwise
  containerd reserves a *random* MCS level, which cannot be known before
  containerd creates the container: that is refused (FailedPrecondition) with
  the fix (set `seLinuxOptions.level`), rather than restoring a process that
  cannot read its own rootfs. `lsm_options_from_spec` reads both labels from
  the created container's OCI spec instead, which covers every case.

Without SELinux enforcing nothing is passed and CRIU behaves as before.
Every label part is checked against the SELinux grammar before it reaches
the config file: a space, newline, `#` or quote in a label could otherwise add
options of its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.api.cri.v1 import api_pb2 as cri
from shim.errors import FailedPrecondition, InvalidArgument

SELINUXFS = Path("/sys/fs/selinux")
DEFAULT_USER = "system_u"
DEFAULT_ROLE = "system_r"
DEFAULT_TYPE = "container_t"  # containerd's (and CRI-O's) default process type
FILE_ROLE = "object_r"
FILE_TYPE = "container_file_t"  # what a container's rootfs is labelled with

# Policy identifiers (checkpolicy's lexer): a letter or _, then letters, digits, _ . -
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,254}")
# MLS/MCS level or range: s0, s0:c1,c2, s0-s0:c0.c1023, s0:c1-s0:c1.c9
_CATEGORIES = r"c\d{1,4}(?:\.c\d{1,4})?(?:,c\d{1,4}(?:\.c\d{1,4})?)*"
_SENSITIVITY = rf"s\d{{1,4}}(?::{_CATEGORIES})?"
_LEVEL = re.compile(rf"{_SENSITIVITY}(?:-{_SENSITIVITY})?")
# The last line of defence: one option and one argument, nothing CRIU's parser treats specially.
_LINE = re.compile(r"(?:lsm-profile|lsm-mount-context) [A-Za-z0-9_.:,-]+")


@dataclass(frozen=True, slots=True)
class Label:
    user: str
    role: str
    type: str
    level: str

    def __str__(self) -> str:
        return f"{self.user}:{self.role}:{self.type}:{self.level}"


def selinux_enforcing(root: Path = SELINUXFS) -> bool:
    """SELinux is on and enforcing: selinuxfs is mounted and its `enforce` holds "1"."""
    try:
        return (root / "enforce").read_text().strip() == "1"
    except (FileNotFoundError, NotADirectoryError):
        return False


def restore_lsm_options(enforcing: bool, security_context: cri.LinuxContainerSecurityContext | None,
                        sandbox_process_label: str | None = None) -> list[str]:
    """CRIU config-file lines setting the restored process's label and its rootfs mount context.

    `security_context` is the new container's (`request.config.linux.security_context`);
    `sandbox_process_label` is the new pod sandbox's process label (its runtime
    spec's `process.selinuxLabel`), which containerd uses when the container's
    own SELinux options are empty. Not enforcing: [] (CRIU keeps its default).
    """
    if not enforcing:
        return []
    label = process_label(security_context, sandbox_process_label)
    return _lines(label, Label(label.user, FILE_ROLE, FILE_TYPE, label.level))


def lsm_options_from_spec(enforcing: bool, spec: Mapping[str, Any]) -> list[str]:
    """The same lines, from a created container's OCI spec (`process.selinuxLabel`, `linux.mountLabel`).

    Exact in every case, random MCS levels included, for a caller that writes
    the CRIU config after containerd created the container (before it starts).
    A spec without labels (SELinux off in containerd, or a privileged
    container without one) gives [].
    """
    if not enforcing:
        return []
    process, linux = spec.get("process"), spec.get("linux")
    process_value = process.get("selinuxLabel", "") if isinstance(process, Mapping) else ""
    mount_value = linux.get("mountLabel", "") if isinstance(linux, Mapping) else ""
    if not isinstance(process_value, str) or not isinstance(mount_value, str):
        raise InvalidArgument("the container's OCI spec holds a non-string SELinux label")
    lines: list[str] = []
    if process_value:
        lines += _lines(parse_label(process_value, "process.selinuxLabel"), None)
    if mount_value:
        lines += _lines(None, parse_label(mount_value, "linux.mountLabel"))
    return lines


def process_label(security_context: cri.LinuxContainerSecurityContext | None,
                  sandbox_process_label: str | None = None) -> Label:
    """The process label containerd will give the container (see the module doc)."""
    options = (security_context.selinux_options
               if security_context is not None and security_context.HasField("selinux_options") else None)
    given = {k: getattr(options, k) for k in ("user", "role", "type", "level")} if options is not None else {}
    given = {k: v for k, v in given.items() if v}
    for part, value in given.items():
        _check_part(part, value, f"seLinuxOptions.{part}")
    if not given and sandbox_process_label:
        return parse_label(sandbox_process_label, "the pod sandbox's SELinux label", need_level=True)
    if "level" not in given:
        raise FailedPrecondition(
            "SELinux is enforcing and the restored container's SELinux level is not known in advance "
            "(containerd would pick a random MCS level, which CRIU cannot be given before the container exists): "
            "set securityContext.seLinuxOptions.level (e.g. \"s0:c123,c456\") for the restored container or its pod")
    return Label(given.get("user", DEFAULT_USER), given.get("role", DEFAULT_ROLE), given.get("type", DEFAULT_TYPE),
                 given["level"])


def parse_label(value: str, what: str, need_level: bool = False) -> Label:
    """A full SELinux context `user:role:type[:level]`, every part checked."""
    parts = value.split(":", 3)
    if len(parts) < 3 or (need_level and len(parts) < 4):
        raise InvalidArgument(f"{what} {value!r} is not an SELinux context user:role:type:level")
    user, role, type_ = parts[:3]
    level = parts[3] if len(parts) == 4 else ""
    for part, text in (("user", user), ("role", role), ("type", type_)) + ((("level", level),) if level else ()):
        _check_part(part, text, what)
    return Label(user, role, type_, level)


def _check_part(part: str, value: str, what: str) -> None:
    pattern = _LEVEL if part == "level" else _IDENTIFIER
    if not pattern.fullmatch(value):
        raise InvalidArgument(f"{what}: {value!r} is not a valid SELinux {part}")


def _lines(process: Label | None, mount: Label | None) -> list[str]:
    lines: list[str] = []
    if process is not None:
        lines.append(f"lsm-profile selinux:{_context(process)}")
    if mount is not None:
        lines.append(f"lsm-mount-context {_context(mount)}")
    for line in lines:
        if not _LINE.fullmatch(line):  # unreachable after the part checks; kept as the invariant
            raise InvalidArgument(f"refusing CRIU option line {line!r}")
    return lines


def _context(label: Label) -> str:
    return str(label) if label.level else f"{label.user}:{label.role}:{label.type}"
