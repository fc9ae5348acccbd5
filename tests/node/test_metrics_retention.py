"""Metrics scraped during real checkpoints and restores, and retention deleting real archives (containerd 1.7)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shim.node import procs
from shim.restore import loopdev
from tests.node.conftest import Node, criu_shim
from tests.node.pods import Cri, wait_for

pytestmark = pytest.mark.node

COUNTER = ["/usr/local/bin/counter"]
RUNTIME = "runtime.v1.RuntimeService"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Proxy:
    """A second criu-shim proxy in front of the node's containerd, with metrics and retention configured."""

    def __init__(self, node: Node, directory: Path, extra: str) -> None:
        self.port = free_port()
        self.config = directory / "proxy.toml"
        self.config.write_text((node.dir / "criu-shim.toml").read_text().replace(
            'audit_log = "', f'audit_log = "{directory}/audit.log"\n# node: "', 1)
            + f'\n[metrics]\nlisten = "127.0.0.1:{self.port}"\n' + extra)
        self.audit_log = directory / "audit.log"
        listen = directory / "cri.sock"
        self.process = subprocess.Popen([sys.executable, "-m", "shim", "serve", "--listen", f"unix://{listen}",
                                         "--runtime-endpoint", node.containerd, "--config", str(self.config)])
        assert procs.wait_until(listen.exists, 20)
        self.cri = Cri(f"unix://{listen}", directory / "logs")

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, frozenset(labels.items())), 0.0)

    def audit(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]

    def stop(self) -> None:
        self.cri.close()
        self.process.terminate()
        assert self.process.wait(timeout=20) == 0


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    return directory


def kubelet_name(pod: str, container: str) -> str:
    """As the kubelet names the archives it asks for (RFC 3339 time, second resolution)."""
    return f"checkpoint-{pod}_tests-{container}-{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}.tar"


def test_checkpoints_are_measured_and_retention_keeps_the_newest(node: Node, tmp_path: Path,
                                                                 checkpoints: Path) -> None:
    proxy = Proxy(node, tmp_path, f'[retention]\ndirs = ["{checkpoints}"]\nmax_per_container = 1\n'
                                  'interval = "1h"\n')
    try:
        before = proxy.scrape()
        with proxy.cri.pod() as pod:
            ctr = proxy.cri.container(pod, COUNTER, {"MEM_MB": "16"}, name="app")
            wait_for(lambda: proxy.cri.count(ctr) >= 2)
            first = checkpoints / kubelet_name(pod.config.metadata.name, "app")
            proxy.cri.checkpoint(ctr, str(first))
            first_size = first.stat().st_size
            second = checkpoints / kubelet_name(pod.config.metadata.name, "app")
            proxy.cri.checkpoint(ctr, str(second))
            # Retention looks again after each checkpoint: the older archive of the container goes.
            wait_for(lambda: not first.exists(), timeout=20)
            assert second.exists() and proxy.cri.state(ctr) == "CONTAINER_RUNNING"
            with pytest.raises(grpc.RpcError):
                proxy.cri.checkpoint("no-such-container", str(checkpoints / "x.tar"))
        after = proxy.scrape()

        def delta(name: str, **labels: str) -> float:
            key = (name, frozenset(labels.items()))
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert delta("criu_shim_checkpoint_duration_seconds_count") == 2
        for stage in ("freeze", "dump", "archive"):
            assert delta("criu_shim_checkpoint_stage_duration_seconds_count", stage=stage) == 2
        assert delta("criu_shim_checkpoint_frozen_seconds_count") == 2
        assert 0 < delta("criu_shim_checkpoint_frozen_seconds_sum") < delta("criu_shim_checkpoint_duration_seconds_sum")
        assert delta("criu_shim_checkpoint_archive_bytes_total") == first_size + second.stat().st_size
        assert delta("criu_shim_checkpoint_archive_size_bytes_count") == 2
        assert delta("criu_shim_failures_total", operation="checkpoint", code="NOT_FOUND", reason="not_found") == 1
        assert delta("criu_shim_gc_deleted_archives_total", reason="max_per_container") == 1
        assert delta("criu_shim_gc_deleted_bytes_total", reason="max_per_container") == first_size
        assert delta("criu_shim_cri_calls_total", grpc_service=RUNTIME, grpc_method="CheckpointContainer",
                     route="answered") == 3
        assert delta("criu_shim_cri_calls_total", grpc_service=RUNTIME, grpc_method="RunPodSandbox",
                     route="relayed") == 1
        assert delta("criu_shim_cri_calls_total", grpc_service=RUNTIME, grpc_method="StopPodSandbox",
                     route="relayed") == 1
        [gc] = [line for line in proxy.audit() if line["action"] == "gc"]
        assert gc["location"] == str(first) and gc["container"] == "app" and gc["size"] == first_size
        assert str(gc["result"]).startswith("deleted: max_per_container: 2 archives of tests/")
    finally:
        proxy.stop()


def test_gc_keeps_an_archive_a_loop_device_reads(node: Node, tmp_path: Path, checkpoints: Path) -> None:
    """What a lazy restore does to its archive (a read-only loop device over a member), seen by `criu-shim gc`."""
    cri = Cri(node.cri, tmp_path / "logs")
    with cri.pod() as pod:
        ctr = cri.container(pod, COUNTER, name="app")
        wait_for(lambda: cri.count(ctr) >= 1)
        archive = checkpoints / kubelet_name(pod.config.metadata.name, "app")
        cri.checkpoint(ctr, str(archive))
    cri.close()
    config = tmp_path / "gc.toml"
    config.write_text(f'[checkpoint]\naudit_log = "{tmp_path}/audit.log"\n'
                      f'[retention]\ndirs = ["{checkpoints}"]\nttl = 1\n')
    wait_for(lambda: archive.stat().st_mtime < time.time() - 1.5, timeout=5)  # older than the ttl
    device = loopdev.attach_read_only(archive, 0, 4096, "test-retention")
    try:
        held = criu_shim("gc", "--config", str(config))
        assert held.stdout.startswith(f"kept: in use by a restore\t{archive}\tttl: ")
        assert archive.exists()
    finally:
        loopdev.detach(device)
    wait_for(lambda: loopdev.tag_of(device) is None)
    dry = criu_shim("gc", "--config", str(config), "--dry-run")
    assert dry.stdout.startswith(f"would delete\t{archive}\tttl: ") and archive.exists()
    done = criu_shim("gc", "--config", str(config))
    assert done.stdout.startswith(f"deleted\t{archive}\tttl: ") and not archive.exists()
    [line] = [json.loads(raw) for raw in (tmp_path / "audit.log").read_text().splitlines() if '"gc"' in raw]
    assert line["location"] == str(archive) and str(line["result"]).startswith("deleted: ttl: ")


@pytest.fixture
def restoring_proxy(node: Node, tmp_path: Path) -> Iterator[Proxy]:
    proxy = Proxy(node, tmp_path, "")
    yield proxy
    proxy.stop()


def test_a_lazy_restore_is_measured_stage_by_stage(node: Node, restoring_proxy: Proxy) -> None:
    from shim.api.cri.v1 import api_pb2 as cri

    proxy = restoring_proxy
    archive = node.dir / "checkpoints" / f"metrics-{free_port()}.tar"
    gc_config = proxy.config.parent / "gc.toml"
    gc_config.write_text(f'[checkpoint]\naudit_log = "{proxy.audit_log}"\n'
                         f'[retention]\ndirs = ["{archive.parent}"]\nttl = 1\n')

    def gc_dry_run() -> str:
        """What retention would do now (archives of other tests in that directory are only listed)."""
        return criu_shim("gc", "--config", str(gc_config), "--dry-run").stdout

    before = proxy.scrape()
    try:
        with proxy.cri.pod() as pod_a:
            ctr = proxy.cri.container(pod_a, COUNTER, {"INTERVAL_MS": "50", "MEM_MB": "48"})
            wait_for(lambda: proxy.cri.count(ctr) >= 3)
            proxy.cri.checkpoint(ctr, str(archive))
        wait_for(lambda: archive.stat().st_mtime < time.time() - 1.5, timeout=5)  # older than the ttl
        with proxy.cri.pod() as pod_b:
            config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="restored"),
                                         image=cri.ImageSpec(image=str(archive)), log_path="restored.log")
            restored = proxy.cri.runtime.CreateContainer(cri.CreateContainerRequest(
                pod_sandbox_id=pod_b.id, config=config, sandbox_config=pod_b.config), timeout=120).container_id
            # Created, not started: the lazy restore holds the archive (its relay, for the page daemon), retention keeps it.
            assert f"kept: in use by a restore\t{archive}\tttl: " in gc_dry_run()
            proxy.cri.runtime.StartContainer(cri.StartContainerRequest(container_id=restored), timeout=120)
            wait_for(lambda: proxy.cri.count(restored) >= 4)

            def count(stage: str) -> float:
                key = ("criu_shim_restore_stage_duration_seconds_count", frozenset({("stage", stage)}))
                return proxy.scrape().get(key, 0.0) - before.get(key, 0.0)

            # The relay reports the fill when the page daemon is done; each scrape folds it in.
            wait_for(lambda: count("lazy_fill") == 1, timeout=60, interval=0.5)
            assert [count(s) for s in ("unpack", "create", "criu_restore")] == [1, 1, 1]
            total: tuple[str, frozenset[tuple[str, str]]] = ("criu_shim_restore_duration_seconds_count", frozenset())
            assert proxy.scrape()[total] - before.get(total, 0.0) == 1
            # Memory complete: the relay lets go of the archive, retention may take it.
            wait_for(lambda: f"would delete\t{archive}\tttl: " in gc_dry_run(), timeout=30, interval=0.5)
    finally:
        archive.unlink(missing_ok=True)
