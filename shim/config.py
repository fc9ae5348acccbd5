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
    page_daemon = "criu-shim"   # who fills it in: "criu-shim" (our own, faster fill) or "criu" (criu lazy-pages)
    network_lock = "nftables"   # CRIU's lock of restored connections: "nftables" where CRIU can, or "dump" (the dump's)

    [retention]                 # off unless a limit is set (see README: deleting is irreversible)
    dirs = ["/var/lib/kubelet/checkpoints"]   # where checkpoint archives are collected
    ttl = "7d"                  # archives older than this go ("90s", "30m", "12h", "7d", or seconds)
    max_per_container = 3       # keep the newest N of each container (0: no limit)
    max_per_pod = 10            # keep the newest N of each pod (0: no limit)
    node_quota_bytes = "50GiB"  # the oldest go until all archives together fit (bytes, or "50GiB")
    interval = "10m"            # how often the proxy collects (also after each checkpoint)

    [metrics]
    listen = "127.0.0.1:9464"   # Prometheus /metrics; off unless set

    [signing]                   # shim.signing: signed archives (cosign's blob format)
    key_file = "/etc/criu-shim/signing.key"   # sign every archive written (PEM EC P-256, 0600, root's)
    trusted_keys = ["/etc/criu-shim/trusted/node-a.pub"]   # restore verifies against these (PEM)
    require_signature = false   # refuse restores of unsigned checkpoints (needs trusted_keys)

    [export]                    # shim.export: each kubelet checkpoint pushed as a checkpoint image
    registry = "registry.example:5000"        # off unless set (for `kubectl checkpoint restore/migrate`)
    repository = "criu-shim/checkpoints"      # REGISTRY/REPOSITORY/<pod>_<ns>-<ctr>:<time>

    [encryption]                # shim.sealed: archives encrypted at rest (README "Encryption at rest")
    enabled = false             # seal new checkpoints (AES-256-GCM, chunked, authenticated)
    key_id = "node-key-1"       # names the key; written in each archive's header
    key_file = "/etc/criu-shim/keys/node-key-1"   # 32 bytes as hex/base64/raw, mode 0600
    key_command = ["/usr/local/bin/kms-key"]      # or: run with the key id appended, prints the key
    keys = { "node-key-0" = "/etc/criu-shim/keys/node-key-0" }   # more keys, to open older archives
    opt_out_namespaces = []     # pods here may say checkpoint.criu-shim.io/encrypt: "false"

    [admission]                 # shim.policy: who may restore, who may be checkpointed
    restore_namespaces = ["*"]            # pods that may receive a restore, by namespace (shell patterns)
    restore_runtime_handlers = ["*"]      # ... by RuntimeClass handler ("" = no RuntimeClass)
    checkpoint_excluded_namespaces = []   # pods here are never checkpointed
    restore_from_other_namespaces = false # a checkpoint goes back into the namespace it was taken in
"""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.errors import InvalidArgument
from shim.image_reference import is_registry_host, is_repository
from shim.policy import AdmissionSettings, parse_section

DEFAULT_AUDIT_LOG = Path("/var/log/criu-shim/audit.log")
DEFAULT_STATE_DIR = Path("/var/lib/criu-shim")
DEFAULT_RESTORE_DIR = Path("/var/lib/criu-shim/restore")
DEFAULT_ALLOWED_DIRS = (Path("/var/lib/kubelet/checkpoints"),)
KUBELET_CHECKPOINTS = Path("/var/lib/kubelet/checkpoints")
DEFAULT_GC_INTERVAL = 600.0
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


COMPRESSION_NONE, COMPRESSION_ZSTD = "none", "zstd"
COMPRESSIONS = (COMPRESSION_NONE, COMPRESSION_ZSTD)
ZSTD_LEVELS = range(1, 20)  # zstd's normal levels (20-22 "ultra" need a huge window to decompress)


@dataclass(frozen=True)
class CheckpointDefaults:
    tcp_established: bool = False
    file_locks: bool = False
    ext_unix_sockets: bool = False
    # fsync archives before answering: durable across a node crash, but a full
    # write-back of the memory image (about 1-2 s per GiB on these disks).
    fsync: bool = False
    # Archives written as a zstd stream (shim.checkpoint.compression); a pod may choose per annotation.
    compression: str = COMPRESSION_NONE
    compression_level: int = 3  # zstd's own default


PAGE_DAEMON_OURS, PAGE_DAEMON_CRIU = "criu-shim", "criu"
PAGE_DAEMONS = (PAGE_DAEMON_OURS, PAGE_DAEMON_CRIU)
NETWORK_LOCK_NFTABLES, NETWORK_LOCK_DUMP = "nftables", "dump"
NETWORK_LOCKS = (NETWORK_LOCK_NFTABLES, NETWORK_LOCK_DUMP)


@dataclass(frozen=True)
class RestoreSettings:
    enabled: bool = False
    allowed_dirs: tuple[Path, ...] = DEFAULT_ALLOWED_DIRS
    allowed_registries: tuple[str, ...] = ()
    work_dir: Path = DEFAULT_RESTORE_DIR
    # Lazy restore (shim.restore.lazy): the process runs before its memory is all
    # in place; a page daemon fills it in. Used where CRIU supports uffd.
    lazy_pages: bool = True
    # Which page daemon: criu-shim's own (shim.runtime.page_daemon) or CRIU's `criu lazy-pages`.
    page_daemon: str = PAGE_DAEMON_OURS
    # CRIU's lock of the connections it restores (shim.restore.network_lock): nftables in CRIU's
    # own process where its CRIU has it, or "dump": the method the dump recorded (iptables runs).
    network_lock: str = NETWORK_LOCK_NFTABLES


@dataclass(frozen=True)
class RetentionSettings:
    """Limits on the checkpoint archives kept on the node; 0/None means no such limit."""

    dirs: tuple[Path, ...] = (KUBELET_CHECKPOINTS,)
    ttl_s: float | None = None
    max_per_container: int = 0
    max_per_pod: int = 0
    node_quota_bytes: int | None = None
    interval_s: float = DEFAULT_GC_INTERVAL

    @property
    def enabled(self) -> bool:
        return bool(self.ttl_s is not None or self.max_per_container or self.max_per_pod
                    or self.node_quota_bytes is not None)


@dataclass(frozen=True)
class MetricsSettings:
    listen: tuple[str, int] | None = None  # host, port of the Prometheus endpoint; None: not served


@dataclass(frozen=True)
class SigningSettings:
    key_file: Path | None = None  # sign each archive written with this key
    trusted_keys: tuple[Path, ...] = ()  # a restore verifies signatures against these
    require_signature: bool = False  # refuse a restore of a checkpoint that is not signed


@dataclass(frozen=True)
class ExportSettings:
    """Publish each kubelet checkpoint as a checkpoint image (shim.export), for `kubectl checkpoint`."""

    registry: str | None = None  # HOST[:PORT]; None: nothing is published
    repository: str = "criu-shim/checkpoints"  # images go to REGISTRY/REPOSITORY/<pod>_<ns>-<ctr>:<time>


@dataclass(frozen=True)
class EncryptionSettings:
    """Archives sealed at rest (shim.sealed); the same keyring opens sealed archives at restore."""

    enabled: bool = False  # seal new checkpoints (a pod may opt in, or out where opt_out_namespaces allow)
    key_id: str = ""  # the key new archives are sealed with, named in their header
    key_file: Path | None = None  # the key of key_id
    key_command: tuple[str, ...] = ()  # key provider: run with a key id appended, prints that key
    keys: tuple[tuple[str, Path], ...] = ()  # more key files by id, for archives sealed with older keys
    opt_out_namespaces: tuple[str, ...] = ()  # shell patterns: pods here may turn encryption off

    @property
    def key_files(self) -> dict[str, Path]:
        files = dict(self.keys)
        if self.key_file is not None:
            files[self.key_id] = self.key_file
        return files


@dataclass(frozen=True)
class Config:
    checkpoint: CheckpointDefaults = field(default_factory=CheckpointDefaults)
    criu: Path | None = None
    audit_log: Path = DEFAULT_AUDIT_LOG
    restore: RestoreSettings = field(default_factory=RestoreSettings)
    # Private (0700): the journal of in-flight operations and CRIU logs kept for the operator.
    state_dir: Path = DEFAULT_STATE_DIR
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    # Who may restore and who may be checkpointed (shim.policy).
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    export: ExportSettings = field(default_factory=ExportSettings)


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
    unknown_tables = set(raw) - {"encryption"} - {"checkpoint", "restore", "state_dir", "retention", "metrics", "admission",
                                 "signing", "export"}
    if unknown_tables:
        raise InvalidArgument(f"{origin}: unknown keys: {', '.join(sorted(unknown_tables))}")
    section = raw.get("checkpoint", {})
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [checkpoint] must be a table")
    unknown = set(section) - {"tcp_established", "file_locks", "ext_unix_sockets", "fsync", "criu", "audit_log",
                              "compression", "compression_level"}
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
    defaults = CheckpointDefaults(**flags, **_compression(section, origin))
    return Config(defaults, Path(criu) if criu else _which_criu(), Path(audit),
                  _restore(raw.get("restore", {}), origin), Path(state),
                  _retention(raw.get("retention", {}), origin), _metrics(raw.get("metrics", {}), origin),
                  admission=parse_section(raw.get("admission", {}), origin),
                  encryption=_encryption(raw.get("encryption", {}), origin),
                  signing=_signing(raw.get("signing", {}), origin),
                  export=_export(raw.get("export", {}), origin))


def _compression(section: dict[str, Any], origin: str) -> dict[str, Any]:
    kind, level = section.get("compression", COMPRESSION_NONE), section.get("compression_level", 3)
    if kind not in COMPRESSIONS:
        raise InvalidArgument(f"{origin}: checkpoint.compression must be one of {list(COMPRESSIONS)}, got {kind!r}")
    if not isinstance(level, int) or isinstance(level, bool) or level not in ZSTD_LEVELS:
        raise InvalidArgument(f"{origin}: checkpoint.compression_level must be a zstd level "
                              f"{ZSTD_LEVELS.start}..{ZSTD_LEVELS.stop - 1}, got {level!r}")
    return {"compression": kind, "compression_level": level}


def _export(section: Any, origin: str) -> ExportSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [export] must be a table")
    unknown = set(section) - {"registry", "repository"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [export]: {', '.join(sorted(unknown))}")
    registry, repository = section.get("registry"), section.get("repository", ExportSettings.repository)
    if registry is not None and (not isinstance(registry, str) or not is_registry_host(registry)):
        raise InvalidArgument(f"{origin}: export.registry must be a registry host (HOST[:PORT], with a dot or a "
                              f"port, or localhost), got {registry!r}")
    if not isinstance(repository, str) or not is_repository(repository):
        raise InvalidArgument(f"{origin}: export.repository must be a repository path (lowercase, a/b/c)")
    return ExportSettings(registry, repository)


def _encryption(section: Any, origin: str) -> EncryptionSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [encryption] must be a table")
    unknown = set(section) - {"enabled", "key_id", "key_file", "key_command", "keys", "opt_out_namespaces"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [encryption]: {', '.join(sorted(unknown))}")
    enabled, key_id = section.get("enabled", False), section.get("key_id", "")
    if not isinstance(enabled, bool):
        raise InvalidArgument(f"{origin}: encryption.enabled must be true or false")
    key_file, command = section.get("key_file"), section.get("key_command", [])
    keys, opt_out = section.get("keys", {}), section.get("opt_out_namespaces", [])
    if not isinstance(key_id, str) or (key_id and (not key_id.isprintable() or key_id != key_id.strip())):
        raise InvalidArgument(f"{origin}: encryption.key_id must be printable text without surrounding blanks")
    paths = [key_file] if key_file is not None else []
    if not isinstance(keys, dict) or not all(isinstance(k, str) and k for k in keys):
        raise InvalidArgument(f"{origin}: encryption.keys must be a table of key id = key file")
    if not all(isinstance(p, str) and Path(p).is_absolute() for p in [*paths, *keys.values()]):
        raise InvalidArgument(f"{origin}: encryption key files must be absolute paths")
    if not isinstance(command, list) or not all(isinstance(a, str) and a for a in command) or \
            (command and not Path(command[0]).is_absolute()):
        raise InvalidArgument(f"{origin}: encryption.key_command must be a list: an absolute program path, "
                              "then its arguments (the key id is appended)")
    if not isinstance(opt_out, list) or not all(isinstance(p, str) and p for p in opt_out):
        raise InvalidArgument(f"{origin}: encryption.opt_out_namespaces must be a list of namespace patterns")
    if (enabled or key_file or command) and not key_id:
        raise InvalidArgument(f"{origin}: encryption.key_id must name the key archives are sealed with")
    if enabled and key_file is None and not command:
        raise InvalidArgument(f"{origin}: encryption.enabled needs encryption.key_file or encryption.key_command")
    return EncryptionSettings(enabled, key_id, Path(key_file) if key_file else None, tuple(command),
                              tuple((k, Path(v)) for k, v in sorted(keys.items())), tuple(opt_out))


def _restore(section: Any, origin: str) -> RestoreSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [restore] must be a table")
    unknown = set(section) - {"enabled", "allowed_dirs", "allowed_registries", "work_dir", "lazy_pages",
                              "page_daemon", "network_lock"}
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
    daemon = section.get("page_daemon", PAGE_DAEMON_OURS)
    if daemon not in PAGE_DAEMONS:
        raise InvalidArgument(f"{origin}: restore.page_daemon must be one of {list(PAGE_DAEMONS)}, got {daemon!r:.40}")
    lock = section.get("network_lock", NETWORK_LOCK_NFTABLES)
    if lock not in NETWORK_LOCKS:
        raise InvalidArgument(f"{origin}: restore.network_lock must be one of {list(NETWORK_LOCKS)}, got {lock!r:.40}")
    return RestoreSettings(enabled, tuple(Path(d) for d in dirs), tuple(registries), Path(work), lazy, daemon, lock)


def _signing(section: Any, origin: str) -> SigningSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [signing] must be a table")
    unknown = set(section) - {"key_file", "trusted_keys", "require_signature"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [signing]: {', '.join(sorted(unknown))}")
    key, trusted = section.get("key_file"), section.get("trusted_keys", [])
    required = section.get("require_signature", False)
    if key is not None and not (isinstance(key, str) and Path(key).is_absolute()):
        raise InvalidArgument(f"{origin}: signing.key_file must be an absolute path")
    if not isinstance(trusted, list) or not all(isinstance(t, str) and Path(t).is_absolute() for t in trusted):
        raise InvalidArgument(f"{origin}: signing.trusted_keys must be a list of absolute paths")
    if not isinstance(required, bool):
        raise InvalidArgument(f"{origin}: signing.require_signature must be true or false")
    if required and not trusted:
        # Nothing could ever verify: every restore would be refused.
        raise InvalidArgument(f"{origin}: signing.require_signature = true needs signing.trusted_keys")
    return SigningSettings(Path(key) if key else None, tuple(Path(t) for t in trusted), required)


def _retention(section: Any, origin: str) -> RetentionSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [retention] must be a table")
    keys = {"dirs", "ttl", "max_per_container", "max_per_pod", "node_quota_bytes", "interval"}
    unknown = set(section) - keys
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [retention]: {', '.join(sorted(unknown))}")
    dirs = section.get("dirs", [str(KUBELET_CHECKPOINTS)])
    if not isinstance(dirs, list) or not dirs or \
            not all(isinstance(d, str) and Path(d).is_absolute() and Path(d) != Path("/") for d in dirs):
        raise InvalidArgument(f"{origin}: retention.dirs must be a non-empty list of absolute paths (not /)")
    counts = {}
    for key in ("max_per_container", "max_per_pod"):
        value = section.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{origin}: retention.{key} must be a whole number >= 0 (0: no limit), "
                                  f"got {value!r}")
        counts[key] = value
    ttl = _duration(section["ttl"], f"{origin}: retention.ttl") if "ttl" in section else None
    interval = _duration(section.get("interval", DEFAULT_GC_INTERVAL), f"{origin}: retention.interval")
    if interval < 1:
        raise InvalidArgument(f"{origin}: retention.interval must be at least 1 s")
    quota = _size(section["node_quota_bytes"], origin) if "node_quota_bytes" in section else None
    return RetentionSettings(tuple(Path(d) for d in dirs), ttl, counts["max_per_container"], counts["max_per_pod"],
                             quota, interval)


def _duration(value: Any, what: str) -> float:
    """Seconds from a positive number or "90s", "30m", "12h", "7d"."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and len(value) > 1 and value[-1] in _SECONDS and value[:-1].isdigit():
        seconds = float(int(value[:-1]) * _SECONDS[value[-1]])
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise InvalidArgument(f'{what} must be a positive number of seconds or like "90s", "30m", "12h", "7d", '
                              f"got {value!r}")
    return seconds


def _size(value: Any, origin: str) -> int:
    """Bytes from a positive whole number or "500MiB", "50GiB", "1TB"."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        digits = value.rstrip("KMGTiB")
        unit = value[len(digits):]
        if digits.isdigit() and unit in _BYTES:
            number = int(digits) * _BYTES[unit]
    if number is None or number <= 0:
        raise InvalidArgument(f'{origin}: retention.node_quota_bytes must be a positive number of bytes or like '
                              f'"500MiB", "50GiB", got {value!r}')
    return number


def _metrics(section: Any, origin: str) -> MetricsSettings:
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [metrics] must be a table")
    unknown = set(section) - {"listen"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [metrics]: {', '.join(sorted(unknown))}")
    listen = section.get("listen")
    if listen is None:
        return MetricsSettings()
    return MetricsSettings(_address(listen, f"{origin}: metrics.listen"))


def _address(value: Any, what: str) -> tuple[str, int]:
    """host:port ("127.0.0.1:9464", "[::1]:9464", ":9464" for every address)."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and port.isdigit() and 0 < int(port) < 65536 and (not host or _is_host(host)):
            return host, int(port)
    raise InvalidArgument(f'{what} must be "host:port" (e.g. "127.0.0.1:9464", "[::1]:9464", ":9464"), '
                          f"got {value!r}")


def _is_host(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.split(".")
        return all(label and len(label) < 64 and label.replace("-", "").isalnum() and label.isascii()
                   for label in labels)


def _which_criu() -> Path | None:
    found = shutil.which("criu")
    return Path(found) if found else None
