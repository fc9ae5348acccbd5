"""The proxy's configuration file (TOML); `load()` is the only I/O.

    state_dir = "/var/lib/criu-shim"   # criu-shim's own state: journal of in-flight operations, kept logs

    [checkpoint]
    tcp_established = false     # node-wide defaults; pod annotations override
    file_locks = false
    ext_unix_sockets = false
    fsync = false               # fsync archives before answering (durable, slower)
    criu = "/usr/sbin/criu"     # the CRIU runc will run (for the version check)
    audit_log = "/var/log/criu-shim/audit.log"

    [restore]
    enabled = false             # restore at CreateContainer is opt-in per node
    allowed_dirs = ["/var/lib/kubelet/checkpoints"]   # archives are taken only from here
    allowed_registries = []     # checkpoint images are taken only from these registries
    work_dir = "/var/lib/criu-shim/restore"           # where archives are unpacked (private)
    lazy_pages = true           # memory filled in after the process runs (userfaultfd), when CRIU can

    [admission]                 # shim.policy: who may restore, who may be checkpointed
    restore_namespaces = ["*"]            # pods that may receive a restore, by namespace (shell patterns)
    restore_runtime_handlers = ["*"]      # ... by RuntimeClass handler ("" = no RuntimeClass)
    checkpoint_excluded_namespaces = []   # pods here are never checkpointed
"""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.errors import InvalidArgument
from shim.policy import AdmissionSettings, parse_section

DEFAULT_AUDIT_LOG = Path("/var/log/criu-shim/audit.log")
DEFAULT_STATE_DIR = Path("/var/lib/criu-shim")
DEFAULT_RESTORE_DIR = Path("/var/lib/criu-shim/restore")
DEFAULT_ALLOWED_DIRS = (Path("/var/lib/kubelet/checkpoints"),)


@dataclass(frozen=True)
class CheckpointDefaults:
    tcp_established: bool = False
    file_locks: bool = False
    ext_unix_sockets: bool = False
    # fsync archives before answering: durable across a node crash, but a full
    # write-back of the memory image (about 1-2 s per GiB on these disks).
    fsync: bool = False


@dataclass(frozen=True)
class RestoreSettings:
    enabled: bool = False
    allowed_dirs: tuple[Path, ...] = DEFAULT_ALLOWED_DIRS
    allowed_registries: tuple[str, ...] = ()
    work_dir: Path = DEFAULT_RESTORE_DIR
    # Lazy restore (shim.restore.lazy): the process runs before its memory is all
    # in place; CRIU's page daemon fills it in. Used where CRIU supports uffd.
    lazy_pages: bool = True


@dataclass(frozen=True)
class Config:
    checkpoint: CheckpointDefaults = field(default_factory=CheckpointDefaults)
    criu: Path | None = None
    audit_log: Path = DEFAULT_AUDIT_LOG
    restore: RestoreSettings = field(default_factory=RestoreSettings)
    # Private (0700): the journal of in-flight operations and CRIU logs kept for the operator.
    state_dir: Path = DEFAULT_STATE_DIR
    # Who may restore and who may be checkpointed (shim.policy).
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)


def load(path: Path | None) -> Config:
    if path is None:
        return Config(criu=_which_criu())
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # a binary file is not UTF-8
        raise InvalidArgument(f"config {path}: {exc}") from None
    return parse(raw, str(path))


def parse(raw: dict[str, Any], origin: str = "config") -> Config:
    # A misspelt table ("[checkpiont]") would otherwise silently leave the defaults in force.
    unknown_tables = set(raw) - {"checkpoint", "restore", "state_dir", "admission"}
    if unknown_tables:
        raise InvalidArgument(f"{origin}: unknown keys: {', '.join(sorted(unknown_tables))}")
    section = raw.get("checkpoint", {})
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [checkpoint] must be a table")
    unknown = set(section) - {"tcp_established", "file_locks", "ext_unix_sockets", "fsync", "criu", "audit_log"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [checkpoint]: {', '.join(sorted(unknown))}")
    flags = {k: section.get(k, False) for k in ("tcp_established", "file_locks", "ext_unix_sockets", "fsync")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise InvalidArgument(f"{origin}: checkpoint.{key} must be true or false")
    criu = section.get("criu")
    audit = section.get("audit_log", str(DEFAULT_AUDIT_LOG))
    if (criu is not None and not isinstance(criu, str)) or not isinstance(audit, str):
        raise InvalidArgument(f"{origin}: checkpoint.criu and checkpoint.audit_log must be paths")
    for key, value in (("criu", criu), ("audit_log", audit)):
        # A daemon's working directory is nobody's choice: relative paths are a trap.
        if value and not Path(value).is_absolute():
            raise InvalidArgument(f"{origin}: checkpoint.{key} must be an absolute path, got {value!r}")
    state = raw.get("state_dir", str(DEFAULT_STATE_DIR))
    if not isinstance(state, str) or not Path(state).is_absolute():
        raise InvalidArgument(f"{origin}: state_dir must be an absolute path")
    return Config(CheckpointDefaults(**flags), Path(criu) if criu else _which_criu(), Path(audit),
                  _restore(raw.get("restore", {}), origin), Path(state),
                  admission=parse_section(raw.get("admission", {}), origin))


def _restore(section: Any, origin: str) -> RestoreSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [restore] must be a table")
    unknown = set(section) - {"enabled", "allowed_dirs", "allowed_registries", "work_dir", "lazy_pages"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [restore]: {', '.join(sorted(unknown))}")
    enabled, lazy = section.get("enabled", False), section.get("lazy_pages", True)
    for key, value in (("enabled", enabled), ("lazy_pages", lazy)):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{origin}: restore.{key} must be true or false")
    dirs = section.get("allowed_dirs", [str(d) for d in DEFAULT_ALLOWED_DIRS])
    work = section.get("work_dir", str(DEFAULT_RESTORE_DIR))
    if not isinstance(dirs, list) or not all(isinstance(d, str) and Path(d).is_absolute() for d in dirs):
        raise InvalidArgument(f"{origin}: restore.allowed_dirs must be a list of absolute paths")
    if not isinstance(work, str) or not Path(work).is_absolute():
        raise InvalidArgument(f"{origin}: restore.work_dir must be an absolute path")
    registries = section.get("allowed_registries", [])
    if not isinstance(registries, list) or not all(isinstance(r, str) and r and "/" not in r for r in registries):
        raise InvalidArgument(f"{origin}: restore.allowed_registries must be a list of registry hosts")
    return RestoreSettings(enabled, tuple(Path(d) for d in dirs), tuple(registries), Path(work), lazy)


def _which_criu() -> Path | None:
    found = shutil.which("criu")
    return Path(found) if found else None
