"""A task's cgroup figures, read from cgroupfs, in the message containerd's runc shim answers task `Stats` with.

Why the relay reads them itself: the runc shim of containerd 2.x loads a
container's cgroup only when the init already has a pid at Create
(cmd/containerd-shim-runc-v2/runc/container.go, NewContainer); a task created
from a checkpoint gets its pid at Start, and nothing loads it later, so the
shim's `Stats` says NOT_FOUND "cgroup does not exist" for the task's whole life.

The answer is what the shim would have sent: `StatsResponse{stats: Any}` with
`io.containerd.cgroups.v1.Metrics` on a legacy/hybrid host and
`io.containerd.cgroups.v2.Metrics` on a unified one (the type URL is the bare
full name: typeurl.MarshalAny of a proto message). The cgroup is the init's,
found the way the shim finds it (containerd/cgroups' `PidPath`/`PidGroupPath`:
/proc/<pid>/cgroup); the files are read as containerd/cgroups v3 reads them.
Filled: pids, CPU (usage total/user/kernel, per CPU on v1, throttling) and
memory (usage, limits, memory.stat, swap/kernel on v1, OOM control on v1):
what CRI's ContainerStats and the kubelet read (CPU usage, memory usage,
working set = usage - inactive file, RSS, page faults). Not filled: block I/O,
hugetlb, RDMA, network and PSI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import any_pb2

from shim.api.cgroups.cgroup1.stats import metrics_pb2 as v1
from shim.api.cgroups.cgroup2.stats import metrics_pb2 as v2
from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import NotFound, Unknown

# typeurl.MarshalAny names a proto message by its full name, without the type.googleapis.com/ prefix.
V1_TYPE_URL = v1.Metrics.DESCRIPTOR.full_name  # io.containerd.cgroups.v1.Metrics
V2_TYPE_URL = v2.Metrics.DESCRIPTOR.full_name  # io.containerd.cgroups.v2.Metrics
_MAX = 2**64 - 1  # a "max" limit (cgroup2's getStatFileContentUint64)
_NANOS = 1_000_000_000
# memory.stat keys of cgroup v1 -> MemoryStat fields (containerd/cgroups cgroup1/memory.go parseStats)
_V1_MEMORY_COUNTERS = {
    "cache": "cache", "rss": "rss", "rss_huge": "rss_huge", "mapped_file": "mapped_file", "dirty": "dirty",
    "writeback": "writeback", "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault", "inactive_anon": "inactive_anon", "active_anon": "active_anon",
    "inactive_file": "inactive_file", "active_file": "active_file", "unevictable": "unevictable",
}
_V1_MEMORY_STAT = _V1_MEMORY_COUNTERS | {f"total_{key}": f"total_{field}" for key, field in _V1_MEMORY_COUNTERS.items()}
_V1_MEMORY_STAT |= {"hierarchical_memory_limit": "hierarchical_memory_limit",
                    "hierarchical_memsw_limit": "hierarchical_swap_limit"}
# memory.stat keys of cgroup v2 are its MemoryStat's field names (cgroup2/manager.go readMemoryStats)
_V2_MEMORY_FILES = {"usage": "memory.current", "usage_limit": "memory.max", "max_usage": "memory.peak",
                    "swap_usage": "memory.swap.current", "swap_limit": "memory.swap.max",
                    "swap_max_usage": "memory.swap.peak"}


@dataclass(frozen=True, slots=True)
class CgroupFs:
    """Where cgroupfs and procfs are (tests use a fake tree)."""

    root: Path = Path("/sys/fs/cgroup")
    proc: Path = Path("/proc")
    clock_ticks: int = os.sysconf("SC_CLK_TCK")  # cpuacct.stat counts USER_HZ ticks

    @property
    def unified(self) -> bool:
        """cgroup v2 only (containerd/cgroups' Mode() == Unified): the root is the v2 hierarchy."""
        return (self.root / "cgroup.controllers").is_file()


def stats_response(pid: int, container_id: str, fs: CgroupFs | None = None) -> bytes:
    """The serialized `StatsResponse` for the process `pid`, the init of `container_id`.

    NotFound (the shim's own code) when the process is gone or is not in that
    container's cgroup (a pid reused by another process must not lend it its figures).
    """
    fs = fs or CgroupFs()
    paths = _cgroup_paths(pid, fs)
    if not any(container_id in path for path in paths.values()):
        raise NotFound(f"cgroup of {container_id} does not exist (process {pid} is not in it)")
    if fs.unified:
        metrics: v1.Metrics | v2.Metrics = _v2_metrics(fs.root / paths[""].lstrip("/"))
        url = V2_TYPE_URL
    else:
        metrics, url = _v1_metrics(fs, paths), V1_TYPE_URL
    stats = any_pb2.Any(type_url=url, value=metrics.SerializeToString())
    return bytes(shim_pb2.StatsResponse(stats=stats).SerializeToString())


def _cgroup_paths(pid: int, fs: CgroupFs) -> dict[str, str]:
    """controller -> path from /proc/<pid>/cgroup; the v2 hierarchy's controller is ""."""
    try:
        text = (fs.proc / str(pid) / "cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise NotFound(f"cgroup does not exist: process {pid} is gone") from None
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _v1_metrics(fs: CgroupFs, paths: dict[str, str]) -> v1.Metrics:
    def group(controller: str) -> Path | None:
        path = paths.get(controller)
        directory = fs.root / controller / path.lstrip("/") if path is not None else None
        return directory if directory is not None and directory.is_dir() else None  # IgnoreNotExist

    metrics = v1.Metrics()
    if (pids := group("pids")) is not None:
        metrics.pids.current = _uint(pids / "pids.current")
        metrics.pids.limit = _uint(pids / "pids.max", maximum=0)  # cgroup1/pids.go: "max" is 0
    if (cpuacct := group("cpuacct")) is not None:
        usage = metrics.cpu.usage
        usage.total = _uint(cpuacct / "cpuacct.usage")
        usage.per_cpu.extend(int(v) for v in _text(cpuacct / "cpuacct.usage_percpu").split())
        ticks = _kv(cpuacct / "cpuacct.stat")
        usage.user = ticks.get("user", 0) * _NANOS // fs.clock_ticks
        usage.kernel = ticks.get("system", 0) * _NANOS // fs.clock_ticks
    if (cpu := group("cpu")) is not None and (cpu / "cpu.stat").is_file():
        stat = _kv(cpu / "cpu.stat")
        throttling = metrics.cpu.throttling
        throttling.periods, throttling.throttled_periods, throttling.throttled_time = (
            stat.get("nr_periods", 0), stat.get("nr_throttled", 0), stat.get("throttled_time", 0))
    if (memory := group("memory")) is not None:
        _v1_memory(memory, metrics)
    return metrics


def _v1_memory(memory: Path, metrics: v1.Metrics) -> None:
    stat = _kv(memory / "memory.stat")
    for key, field in _V1_MEMORY_STAT.items():
        setattr(metrics.memory, field, stat.get(key, 0))
    for module, entry in (("", metrics.memory.usage), ("memsw.", metrics.memory.swap),
                          ("kmem.", metrics.memory.kernel), ("kmem.tcp.", metrics.memory.kernel_tcp)):
        entry.SetInParent()  # containerd/cgroups sends all four, empty where the kernel has no such files
        if not (memory / f"memory.{module}usage_in_bytes").is_file():
            continue  # no swap accounting (swapaccount=0), or a kernel without kmem
        entry.usage = _uint(memory / f"memory.{module}usage_in_bytes")
        entry.max = _uint(memory / f"memory.{module}max_usage_in_bytes")
        entry.failcnt = _uint(memory / f"memory.{module}failcnt")
        entry.limit = _uint(memory / f"memory.{module}limit_in_bytes")
    oom = _kv(memory / "memory.oom_control")
    control = metrics.memory_oom_control
    control.oom_kill_disable, control.under_oom, control.oom_kill = (
        oom.get("oom_kill_disable", 0), oom.get("under_oom", 0), oom.get("oom_kill", 0))


def _v2_metrics(group: Path) -> v2.Metrics:
    if not group.is_dir():
        raise NotFound(f"cgroup does not exist: {group}")
    metrics = v2.Metrics()
    metrics.pids.current = _uint(group / "pids.current", missing=0)
    metrics.pids.limit = _uint(group / "pids.max", missing=0)
    cpu = _kv(group / "cpu.stat", missing_ok=True)
    for field in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec"):
        setattr(metrics.cpu, field, cpu.get(field, 0))
    memory = _kv(group / "memory.stat", missing_ok=True)
    for field in v2.MemoryStat.DESCRIPTOR.fields_by_name:
        if field in memory:
            setattr(metrics.memory, field, memory[field])
    for field, name in _V2_MEMORY_FILES.items():
        setattr(metrics.memory, field, _uint(group / name, missing=0))
    return metrics


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise NotFound(f"cgroup does not exist: {path} is gone") from None  # the task ended meanwhile


def _uint(path: Path, *, maximum: int = _MAX, missing: int | None = None) -> int:
    """One number; "max" reads as `maximum`; a file absent reads as `missing` (if given)."""
    if missing is not None and not path.is_file():
        return missing
    value = _text(path).strip()
    return maximum if value == "max" else _parse(value, path)


def _kv(path: Path, *, missing_ok: bool = False) -> dict[str, int]:
    """A flat-keyed file ("key value" per line), as containerd/cgroups' parseKV reads it."""
    if missing_ok and not path.is_file():
        return {}
    pairs: dict[str, int] = {}
    for line in _text(path).splitlines():
        key, _, value = line.partition(" ")
        if key:
            pairs[key] = _parse(value.strip(), path)
    return pairs


def _parse(value: str, path: Path) -> int:
    try:
        number = int(value)
    except ValueError:
        raise Unknown(f"cgroup file {path} holds {value!r}, not a number") from None
    return min(max(number, 0), _MAX)  # a negative kernel figure (rare) as containerd: clamped into uint64
