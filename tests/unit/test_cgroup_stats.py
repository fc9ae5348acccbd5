"""A restored task's Stats read from a fake cgroupfs/procfs tree, v1 (legacy/hybrid) and v2 (unified)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.api.cgroups.cgroup1.stats import metrics_pb2 as v1
from shim.api.cgroups.cgroup2.stats import metrics_pb2 as v2
from shim.api.containerd.runtime.task.v2 import shim_pb2
from shim.errors import NotFound, Unknown
from shim.runtime.cgroup_stats import V1_TYPE_URL, V2_TYPE_URL, CgroupFs, stats_response

CTR = "0123abcd"
POD_PATH = f"/kubepods/besteffort/pod-uid/{CTR}"
PID = 4242


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc(tmp_path: Path, text: str) -> CgroupFs:
    write(tmp_path / "proc" / str(PID) / "cgroup", text)
    return CgroupFs(tmp_path / "cgroup", tmp_path / "proc", clock_ticks=100)


def hybrid(tmp_path: Path) -> CgroupFs:
    """Debian's hybrid layout: v1 controllers, cpu and cpuacct as their own names, v2 at unified/."""
    fs = proc(tmp_path, f"12:pids:{POD_PATH}\n4:memory:{POD_PATH}\n2:cpu,cpuacct:{POD_PATH}\n"
                        f"1:name=systemd:/x\n0::/\n")
    memory = fs.root / "memory" / POD_PATH.lstrip("/")
    write(memory / "memory.stat", "cache 4096\nrss 1000000\ninactive_file 96\npgpgin 7\npgfault 11\npgmajfault 2\n"
                                  "hierarchical_memsw_limit 9223372036854771712\ntotal_cache 8192\ntotal_rss 2000000\n"
                                  "total_inactive_file 4096\ntotal_pgfault 33\ntotal_pgmajfault 3\n")
    for name, value in (("usage_in_bytes", 2_500_000), ("max_usage_in_bytes", 3_000_000), ("failcnt", 0),
                        ("limit_in_bytes", 9223372036854771712)):
        write(memory / f"memory.{name}", f"{value}\n")
        write(memory / f"memory.kmem.{name}", "5\n")
        write(memory / f"memory.kmem.tcp.{name}", "0\n")  # no memsw: swap accounting off
    write(memory / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    for controller in ("cpu", "cpuacct"):
        group = fs.root / controller / POD_PATH.lstrip("/")
        write(group / "cpuacct.usage", "123456789\n")
        write(group / "cpuacct.usage_percpu", "100000000 23456789 \n")
        write(group / "cpuacct.stat", "user 7\nsystem 3\n")
        write(group / "cpu.stat", "nr_periods 10\nnr_throttled 2\nthrottled_time 500\n")
    write(fs.root / "pids" / POD_PATH.lstrip("/") / "pids.current", "3\n")
    write(fs.root / "pids" / POD_PATH.lstrip("/") / "pids.max", "max\n")
    return fs


def unified(tmp_path: Path) -> CgroupFs:
    fs = proc(tmp_path, f"0::{POD_PATH}\n")
    write(fs.root / "cgroup.controllers", "cpu memory pids\n")
    group = fs.root / POD_PATH.lstrip("/")
    write(group / "cpu.stat", "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 0\n"
                              "nr_throttled 0\nthrottled_usec 0\nnr_bursts 0\n")
    write(group / "memory.stat", "anon 1000000\nfile 8192\ninactive_file 4096\npgfault 40\npgmajfault 1\n"
                                 "a_key_of_a_newer_kernel 5\n")
    write(group / "memory.current", "1200000\n")
    write(group / "memory.max", "max\n")
    write(group / "memory.peak", "1300000\n")
    write(group / "pids.current", "2\n")
    write(group / "pids.max", "100\n")
    return fs


def decoded(payload: bytes) -> tuple[str, bytes]:
    response = shim_pb2.StatsResponse.FromString(payload)
    return response.stats.type_url, response.stats.value


def test_v1_metrics_are_what_containerd_s_runc_shim_reports(tmp_path: Path) -> None:
    url, value = decoded(stats_response(PID, CTR, hybrid(tmp_path)))
    assert url == V1_TYPE_URL == "io.containerd.cgroups.v1.Metrics"  # typeurl's bare full name
    m = v1.Metrics.FromString(value)
    assert (m.cpu.usage.total, list(m.cpu.usage.per_cpu)) == (123456789, [100000000, 23456789])
    assert (m.cpu.usage.user, m.cpu.usage.kernel) == (70_000_000, 30_000_000)  # USER_HZ ticks -> ns
    assert (m.cpu.throttling.periods, m.cpu.throttling.throttled_periods, m.cpu.throttling.throttled_time) == (10, 2, 500)
    assert (m.memory.usage.usage, m.memory.usage.max, m.memory.usage.limit) == (2_500_000, 3_000_000, 9223372036854771712)
    assert (m.memory.total_inactive_file, m.memory.total_rss, m.memory.total_pg_fault) == (4096, 2_000_000, 33)
    assert (m.memory.cache, m.memory.pg_pg_in, m.memory.pg_maj_fault) == (4096, 7, 2)
    assert m.memory.hierarchical_swap_limit == 9223372036854771712
    assert m.memory.kernel.usage == 5
    assert m.memory.HasField("swap") and m.memory.swap.usage == 0  # sent empty, as containerd: no memsw files
    assert m.memory_oom_control.oom_kill == 1
    assert (m.pids.current, m.pids.limit) == (3, 0)  # cgroup1's pids.go: "max" is 0
    # CRI's working set: usage - total_inactive_file
    assert m.memory.usage.usage - m.memory.total_inactive_file == 2_495_904


def test_v2_metrics_are_what_containerd_s_runc_shim_reports(tmp_path: Path) -> None:
    url, value = decoded(stats_response(PID, CTR, unified(tmp_path)))
    assert url == V2_TYPE_URL == "io.containerd.cgroups.v2.Metrics"
    m = v2.Metrics.FromString(value)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (5000, 3000, 2000)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.max_usage) == (1_200_000, 2**64 - 1, 1_300_000)
    assert (m.memory.anon, m.memory.inactive_file, m.memory.pgfault, m.memory.pgmajfault) == (1_000_000, 4096, 40, 1)
    assert m.memory.swap_usage == 0  # no memory.swap.current: zero, as containerd/cgroups
    assert (m.pids.current, m.pids.limit) == (2, 100)


def test_a_pid_that_is_not_the_container_s_gives_nothing(tmp_path: Path) -> None:
    fs = hybrid(tmp_path)
    write(fs.proc / str(PID) / "cgroup", "4:memory:/system.slice/other\n0::/\n")  # the pid was reused
    with pytest.raises(NotFound, match="not in it"):
        stats_response(PID, CTR, fs)


def test_a_process_gone_is_not_found(tmp_path: Path) -> None:
    fs = hybrid(tmp_path)
    with pytest.raises(NotFound, match="gone"):
        stats_response(PID + 1, CTR, fs)


def test_a_cgroup_removed_meanwhile_is_not_found(tmp_path: Path) -> None:
    fs = unified(tmp_path)
    (fs.root / POD_PATH.lstrip("/") / "memory.stat").unlink()
    for child in (fs.root / POD_PATH.lstrip("/")).iterdir():
        child.unlink()
    (fs.root / POD_PATH.lstrip("/")).rmdir()
    with pytest.raises(NotFound, match="cgroup does not exist"):
        stats_response(PID, CTR, fs)


def test_garbage_in_a_cgroup_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    fs = hybrid(tmp_path)
    write(fs.root / "cpuacct" / POD_PATH.lstrip("/") / "cpuacct.usage", "lots\n")
    with pytest.raises(Unknown, match=r"cpuacct\.usage holds 'lots', not a number"):
        stats_response(PID, CTR, fs)
