"""Metrics: names, labels, the call counter, the lazy fill spool, and the /metrics endpoint itself."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path

import pytest

from shim import fillspool, metrics
from shim.app import cri_methods
from shim.errors import Code, InvalidArgument, ResourceExhausted, Upstream
from shim.metrics import REGISTRY
from shim.proxy.dispatch import Dispatcher

LIST = "/runtime.v1.RuntimeService/ListPodSandbox"
CHECKPOINT = "/runtime.v1.RuntimeService/CheckpointContainer"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_cri_method_is_known_and_names_follow_the_conventions() -> None:
    methods = cri_methods()
    assert LIST in methods and "/runtime.v1.ImageService/PullImage" in methods and len(methods) > 30
    names = {m.name for m in REGISTRY.collect()}
    assert all(n.startswith("criu_shim_") or n.startswith("process_") for n in names)
    for metric in REGISTRY.collect():
        if metric.type == "histogram" and "size" not in metric.name:
            assert metric.name.endswith("_seconds")
        if metric.type == "counter":  # prometheus_client appends _total to the samples
            assert all(s.name.endswith(("_total", "_created")) for s in metric.samples)


def test_call_counter_counts_by_method_and_bounds_the_labels() -> None:
    counter = metrics.CallCounter(cri_methods(), [CHECKPOINT])
    dispatcher = Dispatcher({CHECKPOINT: lambda call: None}, counter)  # type: ignore[arg-type, dict-item, return-value]
    labels = {"grpc_service": "runtime.v1.RuntimeService", "grpc_method": "ListPodSandbox", "route": "relayed"}
    before = value("criu_shim_cri_calls_total", **labels)
    other = value("criu_shim_cri_calls_total", grpc_service="other", grpc_method="other", route="relayed")
    answered = value("criu_shim_cri_calls_total", grpc_service="runtime.v1.RuntimeService",
                     grpc_method="CheckpointContainer", route="answered")
    assert not dispatcher.intercepts(LIST) and not dispatcher.intercepts(LIST)
    assert not dispatcher.intercepts("/made.up.Service/" + "x" * 1000)
    assert dispatcher.intercepts(CHECKPOINT)
    assert value("criu_shim_cri_calls_total", **labels) == before + 2
    assert value("criu_shim_cri_calls_total", grpc_service="other", grpc_method="other",
                 route="relayed") == other + 1
    assert value("criu_shim_cri_calls_total", grpc_service="runtime.v1.RuntimeService",
                 grpc_method="CheckpointContainer", route="answered") == answered + 1


@pytest.mark.parametrize(("error", "labels"), [
    (ResourceExhausted("disk full"), ("RESOURCE_EXHAUSTED", "storage")),
    (InvalidArgument("bad"), ("INVALID_ARGUMENT", "request")),
    (Upstream(Code.NOT_FOUND, "no such container"), ("NOT_FOUND", "containerd")),
    (TimeoutError(), ("DEADLINE_EXCEEDED", "deadline")),
    (asyncio.CancelledError(), ("CANCELLED", "cancelled")),
    (RuntimeError("bug"), ("INTERNAL", "internal")),
])
def test_failure_labels(error: BaseException, labels: tuple[str, str]) -> None:
    assert metrics.failure_labels(error) == labels


def test_fill_records_are_written_only_where_the_proxy_asked(tmp_path: Path) -> None:
    spool = tmp_path / fillspool.SPOOL
    fillspool.write(spool, "abc", 1.5)
    assert not spool.exists()
    spool.mkdir()
    fillspool.write(spool, "abc", 1.5)
    assert json.loads((spool / "abc.json").read_text()) == {"seconds": 1.5}
    (spool / "garbage.json").write_text("{not json")
    (spool / "negative.json").write_text('{"seconds": -1}')
    (spool / "huge.json").write_text('{"seconds": 1e300}')
    (tmp_path / "target.json").write_text('{"seconds": 2}')
    (spool / "link.json").symlink_to(tmp_path / "target.json")
    assert list(fillspool.drain(spool)) == [1.5]
    assert [p.name for p in spool.iterdir()] == ["link.json"]  # never followed, left alone
    assert (tmp_path / "target.json").exists()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_endpoint_serves_and_folds_in_the_relays_fill_records(tmp_path: Path) -> None:
    spool = tmp_path / "work" / fillspool.SPOOL
    endpoint = metrics.Endpoint(("127.0.0.1", 0), spool)
    try:
        assert spool.is_dir()
        before = value("criu_shim_restore_stage_duration_seconds_count", stage="lazy_fill")
        fillspool.write(spool, "r1", 0.7)
        text = scrape(endpoint.port)
        assert "# TYPE criu_shim_checkpoint_duration_seconds histogram" in text
        assert "process_resident_memory_bytes " in text
        assert 'criu_shim_restore_stage_duration_seconds_count{stage="lazy_fill"} ' \
               f"{before + 1}" in text
        assert list(spool.iterdir()) == []
    finally:
        endpoint.close()
    with pytest.raises(OSError):
        scrape(endpoint.port)


def test_an_address_in_use_is_an_os_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            metrics.Endpoint(("127.0.0.1", taken.getsockname()[1]))
