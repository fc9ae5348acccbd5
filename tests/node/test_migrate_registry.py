"""`criu-shim migrate --mode registry` between two fabric hosts: the checkpoint travels as an OCI image.

The fabric's registry (docker-registry in the router's namespace, HTTPS with a certificate of the
fabric's CA, shim.node.fabric_registry) is reached by both hosts only through routes. The source
pushes the checkpoint image with criu-shim's registry client; the target's containerd pulls it
(CRI PullImage through the target's proxy, its hosts.toml trusting the fabric's CA) and the
container is created with that image. Node B runs containerd 1.7, then 2.4.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.api.cri.v1 import api_pb2_grpc
from shim.image_reference import Reference
from shim.node import fabric, fabric_registry
from tests.node.fabric_pods import (
    FABRIC,
    REPO,
    STOP_AFTER,
    TCP,
    Host,
    client_on_router,
    fabric_hosts,
    kept_checkpoint,
    largest_gap,
    pod_ip,
    remove_pod,
    router_routes,
    run_pod,
    seqs,
)
from tests.node.pods import wait_for

pytestmark = pytest.mark.node

FAB = fabric.Fabric(FABRIC)
REPOSITORY = f"{fabric.REGISTRY_HOST}/migrations"


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fabric-registry") / "registry"


@pytest.fixture(scope="module", params=["1.7", "2.4"], ids=["1.7-to-1.7", "1.7-to-2.4"])
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
          registry_dir: Path) -> Iterator[tuple[Host, Host]]:
    # the registry stops before the hosts go down (and their leak check runs)
    with fabric_hosts(tmp_path_factory, ["1.7", request.param]) as (a, b), fabric_registry.running(FAB, registry_dir):
        yield a, b


@pytest.fixture
def registry_repositories(registry_dir: Path, hosts: tuple[Host, Host]) -> Path:
    """Where the fabric's registry stores its repositories (distribution's filesystem layout)."""
    return registry_dir / "storage" / "docker" / "registry" / "v2" / "repositories"


def _migrate(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    """`criu-shim migrate` on `host`, trusting the fabric's registry (REQUESTS_CA_BUNDLE)."""
    return subprocess.run(host.migrate_argv(*args), capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **fabric_registry.client_env(FAB)})


def _images(host: Host) -> set[str]:
    listed = api_pb2_grpc.ImageServiceStub(host.cri.channel).ListImages(cri.ListImagesRequest(), timeout=30).images
    return {tag for image in listed for tag in (*image.repo_tags, *image.repo_digests)}


def test_tcp_server_moves_through_the_registry_with_its_connection(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = hosts
    log = tmp_path / "client.log"
    with a.cri.pod(TCP) as pod_a, b.cri.pod(TCP) as pod_b:
        ip = pod_ip(a, pod_a)
        server = a.cri.container(pod_a, ["/usr/local/bin/tcpserver"], {"PORT": "7000", "BIND_ADDR": ip,
                                                                          "MEM_MB": "32"}, name="server")
        with client_on_router(ip, log) as client:
            wait_for(lambda: len(seqs(log.read_text())) >= 10)
            done = _migrate(a, server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", pod_b.id, "--mode", "registry",
                            "--image", f"{REPOSITORY}/server")
            assert done.returncode == 0, done.stderr
            assert a.cri.state(server) == "CONTAINER_EXITED"  # stop-after, at once
            pinned = re.search(r"^image (\S+@sha256:[0-9a-f]{64}); push", done.stdout, re.M)
            assert pinned, done.stdout
            assert f"pod IPs {ip} now routed" in done.stdout and f"{ip} via {b.env['HOST_IP']}" in router_routes()
            before = seqs(log.read_text())[-1][1]
            wait_for(lambda: seqs(log.read_text())[-1][1] >= before + 10, timeout=60)
            text = log.read_text()
            assert text.count("connected ") == 1 and "error" not in text and client.poll() is None, text[-2000:]
        counts = [int(c) for c in re.findall(r"reply=conn=(\d+)", text)]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)  # one server state throughout
        moved = b.container_in(pod_b)
        assert b.cri.state(moved) == "CONTAINER_RUNNING"
        # The target pulled the image the kubelet's way: containerd knows it by the pinned digest.
        ref = Reference.parse(pinned.group(1))
        assert f"{ref.registry}/{ref.repository}@{ref.digest}" in _images(b)
        assert re.match(rf"{re.escape(REPOSITORY)}/server:migrate-{server[:12]}-\d{{8}}T\d{{6}}@", pinned.group(1))
        assert not list(Path(a.env["CHECKPOINTS_DIR"]).glob("migrate-*")), "the source's archive is deleted"
        assert not list(Path(b.env["CHECKPOINTS_DIR"]).glob("migrate-*")), "no archive was sent to the target"
        print(f"registry mode: largest client gap {largest_gap(text):.2f} s; {done.stdout.strip()}")


def test_a_failed_pull_keeps_the_checkpoint_and_the_image_and_a_retry_completes(hosts: tuple[Host, Host]) -> None:
    """The target's containerd cannot pull (its hosts.toml gone: the fabric's CA unknown to it): the source
    stays stopped with its archive and pushed image named, the target keeps nothing; a retry completes."""
    a, b = hosts
    hosts_toml = b.layout.dir / fabric.HOSTS_DIR / fabric.REGISTRY_HOST / "hosts.toml"
    images_before = _images(b)
    with a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as target_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "16"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 10)
        saved = hosts_toml.read_text()
        hosts_toml.unlink()
        try:
            failed = _migrate(a, ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode",
                              "registry", "--image", f"{REPOSITORY}/counter:try-1")
        finally:
            hosts_toml.write_text(saved)
        assert failed.returncode == 1, failed.stdout
        assert "the target node could not restore it" in failed.stderr, failed.stderr
        assert f"the source container {ctr} is stopped, its checkpoint image is {REPOSITORY}/counter:try-1@sha256:" \
            in failed.stderr
        kept = kept_checkpoint(failed.stderr)
        assert a.cri.state(ctr) == "CONTAINER_EXITED"
        assert not b.cri.runtime.ListContainers(cri.ListContainersRequest(), timeout=30).containers
        assert _images(b) == images_before, "the target keeps no image of a failed migration"
        done = _migrate(a, ctr, "--checkpoint", str(kept), "--to", b.env["MIGRATE_ADDRESS"], "--to-pod",
                        target_pod.id, "--mode", "registry", "--image", f"{REPOSITORY}/counter:try-1")
        assert done.returncode == 0, done.stderr
        assert not kept.exists()
        moved = b.container_in(target_pod)
        first = b.cri.count(moved)
        assert first >= 10, "the count restarted instead of resuming"
        wait_for(lambda: b.cri.count(moved) > first)


def test_bad_input_and_an_unreachable_registry_are_refused_before_anything_stops(
        hosts: tuple[Host, Host], registry_repositories: Path) -> None:
    a, b = hosts
    sources_before, targets_before = a.archives(), b.archives()
    with a.cri.pod(TCP) as source_pod, b.cri.pod(TCP) as target_pod:
        ip = pod_ip(a, source_pod)
        server = a.cri.container(source_pod, ["/usr/local/bin/tcpserver"], {"PORT": "7000"}, name="server")
        to = [server, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target_pod.id, "--mode", "registry"]
        down = f"{fabric.REGISTRY_IP}:5001"
        cases = [
            ([*to], "--mode registry needs --image REGISTRY[:PORT]/REPOSITORY[:TAG]"),
            ([*to, "--image", "server:1"], "image reference 'server:1' must name its registry: "
                                           "HOST[:PORT]/REPOSITORY[:TAG]"),
            ([*to, "--image", f"{REPOSITORY}/UPPER"], "invalid repository name 'migrations/UPPER'"),
            ([*to, "--image", f"{REPOSITORY}/s:bad tag"], "invalid tag 'bad tag'"),
            ([*to, "--image", f"{REPOSITORY}/s@sha256:{'0' * 64}"], "push to a tag, not a digest"),
            ([*to, "--image", "\x01/\xff"], "must name its registry"),
            ([*to[:-2], "--image", f"{REPOSITORY}/s"], "--image is for --mode registry"),
            ([*to, "--image", f"{down}/migrations/s"], f"registry {down} is not reachable"),
        ]
        for args, expected in cases:
            proc = _migrate(a, *args)
            assert proc.returncode == 1 and expected in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
            assert a.cri.state(server) == "CONTAINER_RUNNING"
        assert "nothing was stopped" in proc.stderr  # the registry's refusal says so
        assert not b.cri.runtime.ListContainers(cri.ListContainersRequest(), timeout=30).containers
        assert a.archives() == sources_before and b.archives() == targets_before
        assert ip not in router_routes()
        assert not (registry_repositories / "migrations" / "s").exists(), "nothing was pushed"


def test_the_target_pod_deleted_during_the_push_restores_nothing_and_keeps_the_checkpoint(
        hosts: tuple[Host, Host]) -> None:
    """The push is slowed (node A's uplink throttled) so that the target pod goes while it runs: the
    target refuses the restore by name, creates and pulls nothing; the source says it is stopped, with
    its archive and the pushed image; a retry into another pod completes it."""
    a, b = hosts
    images_before = _images(b)
    shape = ["nsenter", f"--net=/run/netns/{a.env['NODE_NETNS']}", "tc", "qdisc"]
    with a.cri.pod(STOP_AFTER) as source_pod, b.cri.pod() as retry_pod:
        ctr = a.cri.container(source_pod, ["/usr/local/bin/counter"], {"INTERVAL_MS": "50", "MEM_MB": "32"},
                              name="counter")
        wait_for(lambda: a.cri.count(ctr) >= 10)
        target = run_pod(b)
        try:
            subprocess.run([*shape, "add", "dev", fabric.NODE_LINK, "root", "tbf", "rate", "40mbit", "burst", "64kb",
                            "latency", "500ms"], check=True, capture_output=True)
            try:
                proc = subprocess.Popen(a.migrate_argv(ctr, "--to", b.env["MIGRATE_ADDRESS"], "--to-pod", target.id,
                                                       "--mode", "registry", "--image", f"{REPOSITORY}/counter:gone"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                        env={**os.environ, **fabric_registry.client_env(FAB)})
                wait_for(lambda: a.cri.state(ctr) == "CONTAINER_EXITED", timeout=120)  # now the push runs
                remove_pod(b, target)
                _, stderr = proc.communicate(timeout=240)
            finally:
                subprocess.run([*shape, "del", "dev", fabric.NODE_LINK, "root"], capture_output=True)
        finally:
            with contextlib.suppress(Exception):
                remove_pod(b, target)
        assert proc.returncode == 1, stderr
        assert f"target pod tests/{target.config.metadata.name} was deleted during the migration; nothing was " \
            "restored" in stderr, stderr
        assert f"its checkpoint image is {REPOSITORY}/counter:gone@sha256:" in stderr
        kept = kept_checkpoint(stderr)
        assert not b.cri.runtime.ListContainers(cri.ListContainersRequest(), timeout=30).containers
        assert _images(b) == images_before, "nothing was pulled for a pod that is gone"
        done = _migrate(a, ctr, "--checkpoint", str(kept), "--to", b.env["MIGRATE_ADDRESS"], "--to-pod",
                        retry_pod.id, "--mode", "registry", "--image", f"{REPOSITORY}/counter:gone")
        assert done.returncode == 0, done.stderr
        assert b.cri.count(b.container_in(retry_pod)) >= 10
