"""Prometheus metrics of the proxy: what they are called, how they are recorded, and the /metrics endpoint.

Ground layer (like shim.config): the domain engines and the proxy record into
the metrics defined here through the small functions below, so every metric
name is spelt in this one module. Recording is a counter increment or a
histogram observation (a lock and an add): cheap enough for the relay's hot
path. The endpoint is prometheus_client's own WSGI server in a thread of its
own, so a scrape never runs on the event loop; it is opt-in (`[metrics] listen`).

Lazy fill is measured in the restore relay, a process of its own that outlives
the proxy, so it cannot reach this registry: the relay drops one small file
per finished fill into a spool directory the proxy created (shim.fillspool),
and each scrape folds those into
`criu_shim_restore_stage_duration_seconds{stage="lazy_fill"}` first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from shim import fillspool
from shim.errors import Code, ShimError

log = logging.getLogger(__name__)
PREFIX = "criu_shim"
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_*: the proxy's CPU, memory, open files
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = tuple(float(1 << n) for n in range(20, 38, 2))  # 1 MiB .. 64 GiB, by 4x

CHECKPOINT_STAGES = ("freeze", "dump", "archive")
RESTORE_STAGES = ("unpack", "create", "criu_restore", "lazy_fill")

checkpoint_duration = Histogram(
    f"{PREFIX}_checkpoint_duration_seconds", "CheckpointContainer answered by criu-shim, successful, end to end",
    buckets=DURATION_BUCKETS, registry=REGISTRY)
checkpoint_stage = Histogram(
    f"{PREFIX}_checkpoint_stage_duration_seconds",
    "Stages of successful checkpoints: freeze (containerd pause), dump (CRIU through runc), archive (writing the tar)",
    ["stage"], buckets=DURATION_BUCKETS, registry=REGISTRY)
checkpoint_frozen = Histogram(
    f"{PREFIX}_checkpoint_frozen_seconds", "How long each checkpointed container was frozen",
    buckets=DURATION_BUCKETS, registry=REGISTRY)
archive_size = Histogram(
    f"{PREFIX}_checkpoint_archive_size_bytes", "Size of each checkpoint archive written",
    buckets=SIZE_BUCKETS, registry=REGISTRY)
archive_bytes = Counter(
    f"{PREFIX}_checkpoint_archive_bytes", "Bytes of checkpoint archives written", registry=REGISTRY)
restore_duration = Histogram(
    f"{PREFIX}_restore_duration_seconds", "CreateContainer from a checkpoint, successful, end to end",
    buckets=DURATION_BUCKETS, registry=REGISTRY)
restore_stage = Histogram(
    f"{PREFIX}_restore_stage_duration_seconds",
    "Stages of restores: unpack (archive read), create (containerd CreateContainer), criu_restore "
    "(StartContainer: runc/CRIU restore), lazy_fill (page daemon start until all memory is in place)",
    ["stage"], buckets=DURATION_BUCKETS, registry=None)  # registered by _RestoreStages (below)
failures = Counter(
    f"{PREFIX}_failures", "Failed checkpoints and restores by gRPC status code and reason",
    ["operation", "code", "reason"], registry=REGISTRY)
gc_deleted = Counter(
    f"{PREFIX}_gc_deleted_archives", "Checkpoint archives deleted by retention, by the rule that chose them",
    ["reason"], registry=REGISTRY)
gc_deleted_bytes = Counter(
    f"{PREFIX}_gc_deleted_bytes", "Bytes of checkpoint archives deleted by retention", ["reason"], registry=REGISTRY)
cri_calls = Counter(
    f"{PREFIX}_cri_calls", "CRI calls received, by method; route=relayed went to containerd untouched, "
    "route=answered was handled by criu-shim", ["grpc_service", "grpc_method", "route"], registry=REGISTRY)

# Why a failure happened, by error class: a small fixed set (the message stays in the audit log).
_REASONS = {"Upstream": "containerd", "Unknown": "criu", "ResourceExhausted": "storage",
            "PermissionDenied": "policy", "InvalidArgument": "request", "NotFound": "not_found",
            "FailedPrecondition": "state", "DeadlineExceeded": "deadline", "Unavailable": "containerd",
            "AlreadyExists": "state", "Internal": "internal"}


def failure_labels(error: BaseException) -> tuple[str, str]:
    """(gRPC code name, reason) of a failed operation."""
    if isinstance(error, ShimError):
        return error.code.name, _REASONS.get(type(error).__name__, "other")
    if isinstance(error, TimeoutError):
        return Code.DEADLINE_EXCEEDED.name, "deadline"
    if isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
        return Code.CANCELLED.name, "cancelled"  # a deadline or the client went away
    return Code.INTERNAL.name, "internal"


def record_failure(operation: str, error: BaseException) -> None:
    code, reason = failure_labels(error)
    failures.labels(operation, code, reason).inc()


def record_checkpoint(total_s: float, stages: dict[str, float], frozen_s: float, size: int) -> None:
    checkpoint_duration.observe(total_s)
    for stage, seconds in stages.items():
        checkpoint_stage.labels(stage).observe(seconds)
    checkpoint_frozen.observe(frozen_s)
    archive_size.observe(size)
    archive_bytes.inc(size)


def record_restore(total_s: float) -> None:
    restore_duration.observe(total_s)


def record_restore_stage(stage: str, seconds: float) -> None:
    restore_stage.labels(stage).observe(seconds)


def record_gc_deletion(reason: str, size: int) -> None:
    gc_deleted.labels(reason).inc()
    gc_deleted_bytes.labels(reason).inc(size)


class CallCounter:
    """Counts CRI calls by method, one dict lookup and one increment per call.

    Method names come from clients: only the CRI methods named at start-up get a
    label of their own, anything else is counted as "other" (bounded cardinality).
    """

    def __init__(self, methods: Iterable[str], answered: Iterable[str]) -> None:
        known = set(methods) | set(answered)
        self._relayed = {m: cri_calls.labels(*_split(m), "relayed") for m in known}
        self._answered = {m: cri_calls.labels(*_split(m), "answered") for m in answered}
        self._other = cri_calls.labels("other", "other", "relayed")

    def __call__(self, method: str, answered: bool) -> None:
        if answered:
            self._answered[method].inc()
        else:
            self._relayed.get(method, self._other).inc()


def _split(method: str) -> tuple[str, str]:
    """"/runtime.v1.RuntimeService/ListPodSandbox" -> ("runtime.v1.RuntimeService", "ListPodSandbox")."""
    service, _, name = method.strip("/").partition("/")
    return service, name


class _RestoreStages(Collector):
    """restore_stage, with the relays' fill records folded in first at each scrape."""

    def __init__(self) -> None:
        self.spool: Path | None = None

    def describe(self) -> Iterable[Metric]:
        return restore_stage.describe()

    def collect(self) -> Iterable[Metric]:
        if self.spool is not None:
            for seconds in fillspool.drain(self.spool):
                record_restore_stage("lazy_fill", seconds)
        return restore_stage.collect()


_restore_stages = _RestoreStages()
REGISTRY.register(_restore_stages)


class Endpoint:
    """/metrics served by prometheus_client's WSGI server in a thread of its own; `close()` stops it."""

    def __init__(self, listen: tuple[str, int], spool: Path | None = None) -> None:
        """Bind and serve (OSError if the address cannot be bound); `spool`: the relays' fill records."""
        host, port = listen
        self._server, self._thread = start_http_server(port, addr=host or "0.0.0.0", registry=REGISTRY)
        self.port = int(self._server.server_port)
        if spool is not None:
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            _restore_stages.spool = spool
        log.info("serving Prometheus metrics on http://%s:%d/metrics", host or "0.0.0.0", self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        _restore_stages.spool = None
