"""The CreateContainerRequest containerd gets for a restore, and what goes beside it.

Built from the checkpoint and the new request: the new pod's mounts, devices,
resources, security context and log path win; command, environment and working
directory come from the checkpoint, and the container is marked (`RESTORE_DIR`,
the CRIU config) so that our runtime shim restores it at StartContainer. The
checks of what the checkpoint asks for (architecture, devices, declared mounts)
and the CRIU options written for the restore live here too: pure functions of
the checkpoint and the request, no containerd and no process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shim.annotations import LAZY_PAGES, boolean
from shim.api.cri.v1 import api_pb2 as cri
from shim.arch import go_arch
from shim.checkpoint import options
from shim.config import Config
from shim.errors import InvalidArgument
from shim.handoff import CRIU_CONFIG_ANNOTATION, RESTORE_DIR, criu_config
from shim.restore import lazy
from shim.restore.checkpoint_spec import check_declared_mounts, check_devices
from shim.restore.checkpoint_unpack import CheckpointArchive
from shim.restore.image import CheckpointImage
from shim.restore.network import ARCHIVE_MEMBER, TcpRestore
from shim.restore.selinux import restore_lsm_options, selinux_enforcing

LAZY_ANNOTATION = LAZY_PAGES


def check_architecture(work: Path) -> None:
    """A memory image only restores on the machine type it was dumped on."""
    facts = work / ARCHIVE_MEMBER
    if not facts.is_file():
        return  # other engines record no architecture
    try:
        arch = json.loads(facts.read_text()).get("architecture")
    except (ValueError, AttributeError) as exc:
        raise InvalidArgument(f"{ARCHIVE_MEMBER} in the checkpoint is malformed: {exc}") from None
    here = go_arch()
    if arch and arch != here:
        raise InvalidArgument(f"the checkpoint was made on {arch}; this node is {here}: it cannot be restored here")


def lazy_wanted(request: cri.CreateContainerRequest) -> bool:
    """The container's, else the pod's, `restore.criu-shim.io/lazy-pages` ("true" when absent); both checked."""
    wanted = True
    for source in (request.sandbox_config.annotations, request.config.annotations):
        value = source.get(LAZY_ANNOTATION)
        if value is None:
            continue
        wanted = boolean(LAZY_ANNOTATION, value)
    return wanted


def check_hostile_spec(spec: dict[str, Any], request: cri.CreateContainerRequest) -> None:
    check_devices(spec)
    check_declared_mounts(spec, {m.container_path for m in request.config.mounts})


def source_name(source: Path | CheckpointImage) -> str:
    return str(source) if isinstance(source, Path) else source.name


def restore_request(request: cri.CreateContainerRequest, archive: CheckpointArchive, image: str, work: Path,
                     source_name: str) -> cri.CreateContainerRequest:
    new = cri.CreateContainerRequest()
    new.CopyFrom(request)
    config = new.config
    process = archive.spec.get("process", {})
    config.image.image = image
    del config.command[:]
    del config.args[:]
    config.command.extend(str(a) for a in process.get("args", []))
    del config.envs[:]
    for entry in process.get("env", []):
        key, _, value = str(entry).partition("=")
        config.envs.add(key=key, value=value)
    config.working_dir = str(process.get("cwd", config.working_dir))
    config.annotations[RESTORE_DIR] = str(work)
    config.annotations[CRIU_CONFIG_ANNOTATION] = str(criu_config(work))
    config.annotations["restored"] = "true"
    config.annotations["checkpointedAt"] = str(archive.config.get("checkpointedTime", ""))
    config.annotations["checkpointImage"] = source_name
    return new


def write_criu_config(work: Path, config: Config, request: cri.CreateContainerRequest,
                       sandbox_label: str | None, tcp: TcpRestore | None, lazy_pages: bool = False) -> None:
    """CRIU options for the restore (runc passes none itself): the new pod's annotations and labels."""
    opts = options.resolve(config.checkpoint, request.sandbox_config.annotations, request.config.metadata.name)
    lines = [name for name, on in (("tcp-established", tcp is TcpRestore.ESTABLISHED),
                                   ("tcp-close", tcp is TcpRestore.CLOSE),
                                   ("file-locks", opts.file_locks), ("ext-unix-sk", opts.ext_unix_sockets),
                                   (lazy.CRIU_OPTION, lazy_pages)) if on]
    linux = request.config.linux
    context = linux.security_context if linux.HasField("security_context") else None
    lines += restore_lsm_options(selinux_enforcing(), context, sandbox_label)
    # Beside the work dir, not in it: it must outlive the unpacked images, since
    # runc reads it again when the restored container is checkpointed.
    path = criu_config(work)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))


def add_criu_option(work: Path, option: str) -> None:
    """One more line in the restore's CRIU config (a second part that restores lazily: shim.restore.second_part)."""
    fd = os.open(criu_config(work), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "a") as out:
        out.write(f"{option}\n")


def copy_log(log_file: Path | None, request: cri.CreateContainerRequest) -> None:
    """The checkpointed container's log first; the restored one appends to it."""
    directory, name = request.sandbox_config.log_directory, request.config.log_path
    if log_file is None or not directory or not name:
        return
    target = Path(directory) / name
    src = os.open(log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(src).st_size
            while size > 0:
                copied = os.copy_file_range(src, dst, size)
                if copied == 0:
                    break
                size -= copied
        finally:
            os.close(dst)
    finally:
        os.close(src)
