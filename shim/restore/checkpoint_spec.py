"""What a checkpoint's spec.dump and config.dump say, and what a restore must not take from them (pure).

Both files come from the archive, so from whoever made it. The facts a restore
reuses (image, command, environment...) are type-checked here; what would let
an archive reach the host (bind mounts of host paths, devices, CDI
annotations) must instead be declared by the new CreateContainer request, as
CRI-O requires (mandatory-mounts check, PR #8814) and as containerd learnt
(CDI annotation smuggling, GHSA-33vj-92qq-66hc).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from shim import oci
from shim.archive_layout import CONFIG_DUMP, STATUS_DUMP
from shim.errors import InvalidArgument

# The container engine whose checkpoint this is (not our checkpoint or restore engines).
Producer = Literal["containerd", "cri-o", "podman"]

# Go's zero time.Time: "never" in config.dump.
_ZERO_TIME = "0001-01-01T00:00:00Z"
# Mounts every CRI container gets from its runtime or kubelet: the new container gets its own.
# CRI-O's ignore list (server/container_restore.go) plus what containerd and the kubelet add.
STANDARD_DESTINATIONS = frozenset({
    "/proc", "/dev", "/dev/pts", "/dev/mqueue", "/dev/shm", "/sys", "/sys/fs/cgroup",
    "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log",
    "/etc/passwd", "/etc/group", "/run/.containerenv", "/run/secrets",
})
_STANDARD_PREFIXES = ("/run/secrets/",)
# runc creates these in every container whatever the spec says; listing them grants nothing.
_DEFAULT_DEVICES = frozenset({
    ("/dev/null", "c", 1, 3), ("/dev/zero", "c", 1, 5), ("/dev/full", "c", 1, 7),
    ("/dev/random", "c", 1, 8), ("/dev/urandom", "c", 1, 9), ("/dev/tty", "c", 5, 0),
    ("/dev/console", "c", 5, 1), ("/dev/ptmx", "c", 5, 2),
})
_CDI_DOMAIN = "cdi.k8s.io"
_CRIO_METADATA = oci.CRIO_METADATA
_CONTAINERD_NAME = oci.CRI_CONTAINER_NAME


@dataclass(frozen=True, slots=True)
class CheckpointFacts:
    """The checkpointed container as its archive describes it; absent values are None."""

    name: str
    image: str | None  # rootfsImage: the image as the user asked for it
    image_name: str | None  # rootfsImageName
    image_ref: str | None  # rootfsImageRef: digest (containerd) or storage ID (CRI-O)
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    annotations: dict[str, str]
    arch: str | None
    checkpointed_time: str | None  # RFC 3339, as Go wrote it
    producer: Producer


def checkpoint_facts(spec: Mapping[str, object], config: Mapping[str, object],
                     status: Mapping[str, object] | None = None) -> CheckpointFacts:
    """Read and type-check the facts; InvalidArgument names the offending field."""
    process = _object(spec.get("process", {}), "spec.dump: process")
    annotations = spec_annotations(spec)
    checkpointed = _optional_str(config, "checkpointedTime", CONFIG_DUMP)
    return CheckpointFacts(
        name=container_name(spec, config),
        image=_optional_str(config, "rootfsImage", CONFIG_DUMP),
        image_name=_optional_str(config, "rootfsImageName", CONFIG_DUMP),
        image_ref=_optional_str(config, "rootfsImageRef", CONFIG_DUMP),
        args=_strings(process.get("args", []), "spec.dump: process.args"),
        env=_strings(process.get("env", []), "spec.dump: process.env"),
        cwd=_optional_str(process, "cwd", "spec.dump: process") or "/",
        annotations=annotations,
        # No engine records the architecture today; a config or status that does is believed.
        arch=(_optional_str(config, "architecture", CONFIG_DUMP)
              or (_optional_str(status, "architecture", STATUS_DUMP) if status is not None else None)),
        checkpointed_time=None if checkpointed == _ZERO_TIME else checkpointed,
        producer=detect_producer(spec),
    )


def detect_producer(spec: Mapping[str, object]) -> Producer:
    """As checkpointctl does: annotation `io.container.manager`, containerd when it says nothing known."""
    annotations = spec.get("annotations")
    manager = annotations.get("io.container.manager") if isinstance(annotations, dict) else None
    if manager == "libpod":
        return "podman"
    if manager == "cri-o":
        return "cri-o"
    return "containerd"


def spec_annotations(spec: Mapping[str, object]) -> dict[str, str]:
    return _string_map(spec.get("annotations", {}), "spec.dump: annotations")


def container_name(spec: Mapping[str, object], config: Mapping[str, object]) -> str:
    """The CRI container name: from the annotation each engine keeps it in, else config.dump's name."""
    annotations = spec_annotations(spec)
    name: object = None
    if detect_producer(spec) == "cri-o" and _CRIO_METADATA in annotations:
        try:
            metadata = json.loads(annotations[_CRIO_METADATA])
        except ValueError:
            metadata = None
        name = metadata.get("name") if isinstance(metadata, dict) else None
    elif _CONTAINERD_NAME in annotations:
        name = annotations[_CONTAINERD_NAME]
    if not isinstance(name, str) or not name:
        name = _optional_str(config, "name", CONFIG_DUMP)
    return name or ""


def mounts_needing_declaration(spec: Mapping[str, object]) -> list[dict[str, object]]:
    """The spec's bind mounts of host paths, except those every CRI container gets anyway."""
    needed = []
    for index, mount in enumerate(_mounts(spec)):
        destination = _destination(mount, index)
        options = _strings(mount.get("options", []), f"spec.dump: mounts[{index}].options")
        kind = mount.get("type")
        if kind != "bind" and "bind" not in options and "rbind" not in options:
            continue
        if destination in STANDARD_DESTINATIONS or destination.startswith(_STANDARD_PREFIXES):
            continue
        needed.append(dict(mount))
    return needed


def check_declared_mounts(spec: Mapping[str, object], requested_destinations: set[str],
                          name: str | None = None) -> None:
    """Refuse a restore whose request does not declare every bind mount the checkpoint had.

    Otherwise an archive could mount any host path into the container without
    the pod saying so. `name` is what the message calls the checkpoint (CRI-O
    uses the image or archive path); by default the container's name.
    """
    requested = {_normalise(path) for path in requested_destinations if path}
    missing: list[str] = []
    for index, mount in enumerate(mounts_needing_declaration(spec)):
        destination = _destination(mount, index)
        if destination not in requested and destination not in missing:
            missing.append(destination)
    if missing:
        label = name if name is not None else container_name(spec, {})
        # CRI-O's wording, so that tooling matching it works for us too.
        raise InvalidArgument(f"restoring {json.dumps(label, ensure_ascii=False)} expects following "
                              f"bind mounts defined ({','.join(missing)})")


def check_devices(spec: Mapping[str, object]) -> None:
    """Refuse a checkpoint whose spec gives the container devices: those come from the new request."""
    linux = _object(spec.get("linux", {}), "spec.dump: linux")
    devices = linux.get("devices") or []
    if not isinstance(devices, list):
        raise InvalidArgument("spec.dump: linux.devices is not a list")
    granted = []
    for index, device in enumerate(devices):
        entry = _object(device, f"spec.dump: linux.devices[{index}]")
        key = (entry.get("path"), entry.get("type"), entry.get("major"), entry.get("minor"))
        if key not in _DEFAULT_DEVICES:
            granted.append(str(entry.get("path", "?")))
    if granted:
        raise InvalidArgument(f"the checkpoint's spec gives the container devices ({', '.join(granted)}); "
                              "devices are not restored from a checkpoint, the new CreateContainer "
                              "request must declare them")


def strip_dangerous_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """Drop CDI device requests (`cdi.k8s.io/...`, `<vendor>.cdi.k8s.io/...`) and any device key.

    Annotations are the one part of a checkpoint that reaches the runtime
    unfiltered; a runtime that honours CDI annotations would hand the restored
    container whatever devices the archive names. Anything mentioning devices
    goes too: dropping an innocent annotation costs less than granting a device.
    """
    return {key: value for key, value in annotations.items() if not _is_dangerous(key)}


def _is_dangerous(key: str) -> bool:
    domain = key.partition("/")[0].lower()
    return (domain == _CDI_DOMAIN or domain.endswith("." + _CDI_DOMAIN) or key.startswith(_CDI_DOMAIN)
            or "device" in key.lower())


def _mounts(spec: Mapping[str, object]) -> list[dict[str, object]]:
    mounts = spec.get("mounts") or []
    if not isinstance(mounts, list):
        raise InvalidArgument("spec.dump: mounts is not a list")
    return [_object(mount, f"spec.dump: mounts[{index}]") for index, mount in enumerate(mounts)]


def _destination(mount: Mapping[str, object], index: int) -> str:
    destination = mount.get("destination")
    if not isinstance(destination, str) or not destination:
        raise InvalidArgument(f"spec.dump: mounts[{index}] has no destination")
    return _normalise(destination)


def _normalise(path: str) -> str:
    # "//x" is "/x" to the kernel, though POSIX lets normpath keep the double slash.
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return value


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{what} is not a list of strings")
    return tuple(value)


def _string_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(f"{what} is not a map of strings")
    return {str(key): str(item) for key, item in value.items()}


def _optional_str(mapping: Mapping[str, object], key: str, where: str) -> str | None:
    value = mapping.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: {key} is not a string")
    return value
