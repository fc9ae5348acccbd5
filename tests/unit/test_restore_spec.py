"""The checkpoint's spec.dump and config.dump: facts for the restore, and what it must not take from them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shim.checkpoint.metadata import ZERO_TIME, config_dump
from shim.errors import InvalidArgument
from shim.restore.checkpoint_spec import (
    check_declared_mounts,
    check_devices,
    checkpoint_facts,
    container_name,
    detect_producer,
    mounts_needing_declaration,
    strip_dangerous_annotations,
)

CONFIG: dict[str, Any] = json.loads(config_dump(
    "0123abcd", "counter", "docker.io/library/busybox:1.36", "docker.io/library/busybox@sha256:" + "a" * 64,
    "io.containerd.runc.v2", 1_700_000_000_000_000_000, 1_700_000_100_500_000_000))


def bind(destination: str, source: str = "/var/lib/kubelet/x", options: tuple[str, ...] = ("rbind", "rw"),
         kind: str = "bind") -> dict[str, Any]:
    return {"destination": destination, "type": kind, "source": source, "options": list(options)}


def containerd_spec(**extra: Any) -> dict[str, Any]:
    """Roughly what containerd's CRI plugin stores for a pod container."""
    return {
        "ociVersion": "1.1.0",
        "process": {"args": ["/bin/sh", "-c", "counter"], "env": ["PATH=/bin", "A=b=c"], "cwd": "/work"},
        "annotations": {"io.kubernetes.cri.container-type": "container",
                        "io.kubernetes.cri.container-name": "counter",
                        "io.kubernetes.cri.sandbox-name": "demo"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            bind("/etc/hosts"), bind("/dev/termination-log"), bind("/etc/hostname"),
            bind("/etc/resolv.conf"), bind("/dev/shm", "/run/containerd/x/shm"),
            bind("/run/secrets/kubernetes.io/serviceaccount"),
            bind("/var/run/secrets/kubernetes.io/serviceaccount", options=("rbind", "ro")),
            bind("/data", "/srv/data"),
            {"destination": "/cache/", "type": "none", "source": "/srv/cache", "options": ["bind"]},
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ],
        "linux": {"devices": [], "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
        **extra,
    }


def test_facts_of_a_containerd_checkpoint() -> None:
    facts = checkpoint_facts(containerd_spec(), CONFIG)
    assert facts.name == "counter"
    assert facts.image == facts.image_name == "docker.io/library/busybox:1.36"
    assert facts.image_ref == "docker.io/library/busybox@sha256:" + "a" * 64
    assert facts.args == ("/bin/sh", "-c", "counter")
    assert facts.env == ("PATH=/bin", "A=b=c")
    assert facts.cwd == "/work"
    assert facts.annotations["io.kubernetes.cri.sandbox-name"] == "demo"
    assert facts.arch is None
    assert facts.checkpointed_time == "2023-11-14T22:15:00.5Z"
    assert facts.producer == "containerd"


def test_facts_of_a_cri_o_checkpoint() -> None:
    spec = {"ociVersion": "1.0.2", "process": {"args": ["/pause"]},
            "annotations": {"io.container.manager": "cri-o",
                            "io.kubernetes.cri-o.Metadata": json.dumps({"name": "web", "attempt": 2})}}
    config = {"id": "c" * 64, "name": "k8s_web_pod_ns_uid_2", "rootfsImageRef": "d" * 64,
              "checkpointedTime": ZERO_TIME, "architecture": "arm64"}
    facts = checkpoint_facts(spec, config)
    assert (facts.name, facts.producer, facts.image_ref, facts.image) == ("web", "cri-o", "d" * 64, None)
    assert facts.env == () and facts.cwd == "/"
    assert facts.checkpointed_time is None
    assert facts.arch == "arm64"


def test_name_falls_back_to_config_dump() -> None:
    assert container_name({"annotations": {"io.container.manager": "libpod"}}, {"name": "pod-ctr"}) == "pod-ctr"
    assert container_name({"annotations": {"io.container.manager": "cri-o",
                                           "io.kubernetes.cri-o.Metadata": "{broken"}}, {"name": "x"}) == "x"
    assert container_name({}, {}) == ""


@pytest.mark.parametrize(("manager", "producer"), [
    ("libpod", "podman"), ("cri-o", "cri-o"), ("containerd", "containerd"), (None, "containerd"), (7, "containerd"),
])
def test_producer_as_checkpointctl_detects_it(manager: object, producer: str) -> None:
    spec = {"annotations": {} if manager is None else {"io.container.manager": manager}}
    assert detect_producer(spec) == producer
    assert detect_producer({"annotations": "not a map"}) == "containerd"


@pytest.mark.parametrize(("spec", "config", "text"), [
    ({"process": {"args": "/bin/sh"}}, {}, "spec.dump: process.args is not a list of strings"),
    ({"process": {"env": ["A=1", 2]}}, {}, "spec.dump: process.env is not a list of strings"),
    ({"process": {"cwd": 1}}, {}, "spec.dump: process: cwd is not a string"),
    ({"process": []}, {}, "spec.dump: process is not a JSON object"),
    ({"annotations": {"a": 1}}, {}, "spec.dump: annotations is not a map of strings"),
    ({}, {"rootfsImageRef": ["x"]}, "config.dump: rootfsImageRef is not a string"),
])
def test_hostile_types_refused(spec: dict[str, Any], config: dict[str, Any], text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        checkpoint_facts(spec, config)


def test_mounts_needing_declaration() -> None:
    needed = mounts_needing_declaration(containerd_spec())
    assert [mount["destination"] for mount in needed] == [
        "/var/run/secrets/kubernetes.io/serviceaccount", "/data", "/cache/"]
    assert needed[1] == bind("/data", "/srv/data")


def test_undeclared_bind_mounts_refused_in_cri_o_words() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_declared_mounts(containerd_spec(), {"/data", "/etc/hosts"})
    assert info.value.message == ('restoring "counter" expects following bind mounts defined '
                                  "(/var/run/secrets/kubernetes.io/serviceaccount,/cache)")
    with pytest.raises(InvalidArgument, match=r'^restoring "/ckpt/counter.tar" expects .* \(/data\)$'):
        check_declared_mounts({"mounts": [bind("/data")]}, set(), name="/ckpt/counter.tar")


def test_declared_bind_mounts_pass() -> None:
    check_declared_mounts(containerd_spec(),
                          {"/data/", "/cache", "//var/run/secrets/kubernetes.io/serviceaccount"})
    check_declared_mounts({"ociVersion": "1.0.2"}, set())


@pytest.mark.parametrize("mounts", ["/data", [7], [{"type": "bind"}], [{**bind("/x"), "options": "rbind"}]])
def test_malformed_mounts_refused(mounts: object) -> None:
    with pytest.raises(InvalidArgument, match="spec.dump: mounts"):
        mounts_needing_declaration({"mounts": mounts})


def test_devices_from_the_checkpoint_refused() -> None:
    check_devices(containerd_spec())
    check_devices({"ociVersion": "1.0.2"})
    runc_defaults = [{"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
                     {"path": "/dev/tty", "type": "c", "major": 5, "minor": 0}]
    check_devices({"linux": {"devices": runc_defaults}})
    smuggled = [*runc_defaults, {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                {"path": "/dev/null", "type": "b", "major": 8, "minor": 1}]
    with pytest.raises(InvalidArgument) as info:
        check_devices({"linux": {"devices": smuggled}})
    assert "(/dev/sda, /dev/null)" in info.value.message
    assert "the new CreateContainer request must declare them" in info.value.message
    with pytest.raises(InvalidArgument, match="linux.devices is not a list"):
        check_devices({"linux": {"devices": {"path": "/dev/sda"}}})


def test_dangerous_annotations_stripped() -> None:
    annotations = {
        "cdi.k8s.io/gpu": "nvidia.com/gpu=all",
        "cdi.k8s.io.vendor": "x",
        "nvidia.cdi.k8s.io/gpu": "nvidia.com/gpu=0",
        "io.kubernetes.cri-o.Devices": "/dev/sda:/dev/xvda:rwm",
        "example.com/Device-plugin": "x",
        "io.kubernetes.container.hash": "abc",
        "io.kubernetes.cri.container-name": "counter",
        "notcdi.k8s.io.example/x": "kept",
    }
    assert strip_dangerous_annotations(annotations) == {
        "io.kubernetes.container.hash": "abc",
        "io.kubernetes.cri.container-name": "counter",
        "notcdi.k8s.io.example/x": "kept",
    }
