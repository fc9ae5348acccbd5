"""SELinux at restore: the decision, the exact CRIU config lines, and labels that try to add options."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.errors import FailedPrecondition, InvalidArgument
from shim.restore.selinux import (
    Label,
    lsm_options_from_spec,
    parse_label,
    process_label,
    restore_lsm_options,
    selinux_enforcing,
)


def context(**options: str) -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(selinux_options=cri.SELinuxOption(**options))


# -- the probe ------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [("1", True), ("1\n", True), ("0", False), ("0\n", False)])
def test_enforcing_reads_the_enforce_file(tmp_path: Path, content: str, expected: bool) -> None:
    (tmp_path / "enforce").write_text(content)
    assert selinux_enforcing(tmp_path) is expected


def test_no_selinuxfs_is_not_enforcing(tmp_path: Path) -> None:
    assert selinux_enforcing(tmp_path / "absent") is False
    assert selinux_enforcing(tmp_path) is False  # mounted nowhere: no enforce file
    (tmp_path / "file").write_text("")
    assert selinux_enforcing(tmp_path / "file") is False


# -- the decision and the lines ---------------------------------------------------


@pytest.mark.parametrize("security_context", [None, cri.LinuxContainerSecurityContext(), context(level="s0:c1,c2"),
                                              context(user="a b")])
def test_not_enforcing_passes_nothing(security_context: cri.LinuxContainerSecurityContext | None) -> None:
    # Not even validation: without SELinux the options are containerd's business.
    assert restore_lsm_options(False, security_context, "system_u:system_r:container_t:s0:c1,c2") == []


def test_level_only_takes_the_container_defaults() -> None:
    assert restore_lsm_options(True, context(level="s0:c123,c456")) == [
        "lsm-profile selinux:system_u:system_r:container_t:s0:c123,c456",
        "lsm-mount-context system_u:object_r:container_file_t:s0:c123,c456",
    ]


def test_every_part_given() -> None:
    assert restore_lsm_options(True, context(user="staff_u", role="staff_r", type="spc_t", level="s0-s0:c0.c1023")) == [
        "lsm-profile selinux:staff_u:staff_r:spc_t:s0-s0:c0.c1023",
        # role and type are the process's alone; user and level reach the mount label too
        "lsm-mount-context staff_u:object_r:container_file_t:s0-s0:c0.c1023",
    ]


def test_custom_type_with_level() -> None:
    assert restore_lsm_options(True, context(type="container_init_t", level="s0:c5")) == [
        "lsm-profile selinux:system_u:system_r:container_init_t:s0:c5",
        "lsm-mount-context system_u:object_r:container_file_t:s0:c5",
    ]


@pytest.mark.parametrize("security_context", [None, cri.LinuxContainerSecurityContext(), context()])
def test_empty_options_take_the_sandbox_label(security_context: cri.LinuxContainerSecurityContext | None) -> None:
    # containerd: no container options -> selinux.DupSecOpt(sandbox.ProcessLabel)
    assert restore_lsm_options(True, security_context, "system_u:system_r:container_t:s0:c7,c8") == [
        "lsm-profile selinux:system_u:system_r:container_t:s0:c7,c8",
        "lsm-mount-context system_u:object_r:container_file_t:s0:c7,c8",
    ]


def test_own_options_win_over_the_sandbox_label() -> None:
    lines = restore_lsm_options(True, context(level="s0:c1"), "system_u:system_r:container_t:s0:c7,c8")
    assert lines[0] == "lsm-profile selinux:system_u:system_r:container_t:s0:c1"


@pytest.mark.parametrize(("security_context", "sandbox"), [
    (None, None),  # containerd would pick a random level
    (context(type="spc_t"), "system_u:system_r:container_t:s0:c7,c8"),  # options given, no level: random too
    (context(user="system_u"), None),
])
def test_unknowable_level_is_refused_with_the_fix(security_context: cri.LinuxContainerSecurityContext | None,
                                                  sandbox: str | None) -> None:
    with pytest.raises(FailedPrecondition, match=r"seLinuxOptions\.level"):
        restore_lsm_options(True, security_context, sandbox)


def test_sandbox_label_without_level_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not an SELinux context"):
        restore_lsm_options(True, None, "system_u:system_r:container_t")


def test_process_label() -> None:
    assert process_label(context(level="s0")) == Label("system_u", "system_r", "container_t", "s0")
    assert parse_label("u:r:t:s0:c1,c2", "x") == Label("u", "r", "t", "s0:c1,c2")
    assert parse_label("u:r:t", "x") == Label("u", "r", "t", "")


# -- injection ----------------------------------------------------------------------


@pytest.mark.parametrize(("part", "value"), [
    ("level", "s0:c1\ntcp-close"),
    ("level", "s0 tcp-close"),
    ("level", "s0\ttcp-close"),
    ("level", "s0\r\naction-script /tmp/x"),
    ("level", "s0#"),
    ("level", "s0:c1,c2\x00"),
    ("level", 's0"'),
    ("level", "s0=x"),
    ("level", "c1"),  # not a level at all
    ("type", "container_t\naction-script /tmp/evil.sh"),
    ("type", "container_t action-script"),
    ("type", "container_t:s0"),  # a ':' would shift the parts
    ("type", "'container_t'"),
    ("user", "system_u #"),
    ("user", "--inherit-fd"),
    ("role", "system_r\\"),
    ("role", "ü_r"),
])
def test_injection_in_the_options_is_refused(part: str, value: str) -> None:
    options = {"level": "s0:c1,c2", part: value}
    with pytest.raises(InvalidArgument, match=f"not a valid SELinux {part}"):
        restore_lsm_options(True, context(**options))


@pytest.mark.parametrize("label", [
    "system_u:system_r:container_t:s0:c1\naction-script /tmp/x",
    "system_u:system_r:container t:s0",
    "system_u:system_r:container_t:s0 tcp-close",
    "system_u:system_r:container_t:s0#c1",
    "system_u::container_t:s0",
])
def test_injection_in_the_sandbox_label_is_refused(label: str) -> None:
    with pytest.raises(InvalidArgument):
        restore_lsm_options(True, None, label)


# -- from a created container's spec -----------------------------------------------------


def test_lines_from_the_spec() -> None:
    spec = {"process": {"selinuxLabel": "system_u:system_r:container_t:s0:c99,c100"},
            "linux": {"mountLabel": "system_u:object_r:container_file_t:s0:c99,c100"}}
    assert lsm_options_from_spec(True, spec) == [
        "lsm-profile selinux:system_u:system_r:container_t:s0:c99,c100",
        "lsm-mount-context system_u:object_r:container_file_t:s0:c99,c100",
    ]
    assert lsm_options_from_spec(False, spec) == []


@pytest.mark.parametrize("spec", [{}, {"process": {}, "linux": {}}, {"process": {"selinuxLabel": ""}},
                                  {"process": None, "linux": []}])
def test_spec_without_labels_gives_nothing(spec: dict[str, object]) -> None:
    assert lsm_options_from_spec(True, spec) == []


@pytest.mark.parametrize("spec", [
    {"process": {"selinuxLabel": "system_u:system_r:container_t:s0\ntcp-close"}},
    {"linux": {"mountLabel": "system_u:object_r:container_file_t:s0 x"}},
    {"linux": {"mountLabel": ["system_u"]}},
])
def test_spec_labels_are_checked(spec: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        lsm_options_from_spec(True, spec)
