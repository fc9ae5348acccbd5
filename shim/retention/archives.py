"""Finding checkpoint archives in a directory, and what each one is (hostile input: read, never trusted).

A file is a checkpoint archive only if it is a regular file directly in a
configured directory (symlinks are never followed, neither to the file nor
through it), its name is the kubelet's (`checkpoint-<pod>_<namespace>-<container>-<RFC 3339 time>.tar`) or
its tar carries criu-shim's own member, and its tar content is a checkpoint
(`spec.dump` or `config.dump`, and `checkpoint/inventory.img`). Anything else in
those directories is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shim import archive_layout, oci

log = logging.getLogger(__name__)
# pkg/kubelet/kubelet.go: fmt.Sprintf("checkpoint-%s-%s-%s.tar", podFullName, containerName,
# time.Now().Format(time.RFC3339)), podFullName being "<pod>_<namespace>".
KUBELET_NAME = re.compile(r"^checkpoint-(?P<pod>[^_/]+)_(?P<rest>[^/]+)-"
                          r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d))\.tar$")
# Where containerd (and CRI-O) record the container's identity in the OCI spec.
_NAMES = ((oci.CRI_SANDBOX_NAMESPACE, oci.CRI_SANDBOX_NAME, oci.CRI_CONTAINER_NAME),
          ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name", "io.kubernetes.container.name"))
MAX_MEMBERS = 100_000  # a checkpoint has a few hundred; more is not one of ours to judge
MAX_SPEC = 4 << 20


@dataclass(frozen=True)
class Archive:
    path: Path
    size: int
    mtime: float
    device: int
    inode: int
    namespace: str | None = None  # None: not known (the archive does not say)
    pod: str | None = None
    container: str | None = None

    @property
    def pod_key(self) -> tuple[str, str] | None:
        return (self.namespace, self.pod) if self.namespace is not None and self.pod is not None else None

    @property
    def container_key(self) -> tuple[str, str, str] | None:
        pod = self.pod_key
        return (*pod, self.container) if pod is not None and self.container is not None else None


def scan(directory: Path) -> list[Archive]:
    """The checkpoint archives directly in `directory` (missing directory: none)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:  # ELOOP: the configured directory is itself a symlink
        log.warning("retention: not scanning %s: %s", directory, exc.strerror)
        return []
    try:
        return [archive for name in _tar_names(fd) if (archive := _inspect(directory, fd, name)) is not None]
    finally:
        os.close(fd)


def still_same(archive: Archive, dir_fd: int) -> bool:
    """The name still holds the file that was judged (not replaced since)."""
    try:
        st = os.stat(archive.path.name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino, st.st_mtime) == \
        (archive.device, archive.inode, archive.mtime)


def _tar_names(dir_fd: int) -> Iterator[str]:
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.name.endswith(".tar") and entry.is_file(follow_symlinks=False):
                yield entry.name


def _inspect(directory: Path, dir_fd: int, name: str) -> Archive | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as source:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        content = _content(source)
    if content is None:
        return None
    names, ours = content
    match = KUBELET_NAME.match(name)
    if match is None and not ours:
        return None  # someone's tar that happens to hold a checkpoint: not ours to delete
    if names is None and match is not None:
        names = _names_from_file_name(match)
    namespace, pod, container = names or (None, None, None)
    return Archive(directory / name, st.st_size, st.st_mtime, st.st_dev, st.st_ino, namespace, pod, container)


def _content(source: IO[bytes]) -> tuple[tuple[str, str, str] | None, bool] | None:
    """(namespace, pod, container) from the spec, and whether criu-shim wrote it; None: not a checkpoint."""
    seen: set[str] = set()
    spec: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=source, mode="r:") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    return None
                name = member.name.removeprefix("./")
                seen.add(name)
                if name == archive_layout.SPEC_DUMP and member.isfile() and member.size <= MAX_SPEC:
                    spec = _json(tar.extractfile(member))
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return None
    if not ({archive_layout.SPEC_DUMP, archive_layout.CONFIG_DUMP} & seen) or archive_layout.INVENTORY not in seen:
        return None
    return _names_from_spec(spec), archive_layout.FACTS in seen


def _json(member: IO[bytes] | None) -> dict[str, Any]:
    if member is None:
        return {}
    with contextlib.suppress(ValueError):
        value = json.loads(member.read(MAX_SPEC))
        if isinstance(value, dict):
            return value
    return {}


def _names_from_spec(spec: dict[str, Any]) -> tuple[str, str, str] | None:
    notes = spec.get("annotations")
    if not isinstance(notes, dict):
        return None
    for keys in _NAMES:
        values = [notes.get(k) for k in keys]
        if all(isinstance(v, str) and v for v in values):
            return str(values[0]), str(values[1]), str(values[2])
    return None


def _names_from_file_name(match: re.Match[str]) -> tuple[str, str, str] | None:
    """The kubelet's name, when the archive does not say: "<namespace>-<container>" is split at the first
    dash (a namespace with a dash in it is misread; the spec, when present, always wins)."""
    namespace, sep, container = match["rest"].partition("-")
    return (namespace, match["pod"], container) if sep and namespace and container else None
