"""shim.restore.pod_shim: a pod's bootstrap.json says version 2 only while a restored task is created."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from shim.errors import FailedPrecondition
from shim.restore.pod_shim import PodShims, pod_bootstrap

# As containerd 2.4 writes it (encoding/json of the BootstrapResult, extensions kept).
ORIGINAL = b'{"version":3,"address":"unix:///run/containerd/s/ab","protocol":"ttrpc","extensions":[{"name":"x"}]}'


def _bootstrap(tmp_path: Path, data: bytes = ORIGINAL, mode: int = 0o600) -> Path:
    path = pod_bootstrap(tmp_path, "k8s.io", "sandbox1")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_the_pods_bootstrap_is_in_containerds_task_state(tmp_path: Path) -> None:
    assert pod_bootstrap(Path("/run/containerd"), "k8s.io", "abc") == Path(
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/bootstrap.json")


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b"])
def test_a_sandbox_id_that_is_no_file_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a sandbox id"):
        pod_bootstrap(Path("/run/containerd"), "k8s.io", bad)


def test_version_2_inside_then_the_same_bytes_and_mode(tmp_path: Path) -> None:
    path = _bootstrap(tmp_path, mode=0o640)

    async def run() -> dict[str, object]:
        async with PodShims().through_handler(path, lambda: False):
            inside: dict[str, object] = json.loads(path.read_bytes())
        return inside

    inside = asyncio.run(run())
    assert inside == {**json.loads(ORIGINAL), "version": 2}  # everything else as containerd wrote it
    assert path.read_bytes() == ORIGINAL
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["bootstrap.json"]  # no temporary left


def test_put_back_as_soon_as_the_launcher_handed_the_task_over(tmp_path: Path) -> None:
    path = _bootstrap(tmp_path)
    handed = asyncio.Event()

    async def run() -> bytes:
        async with PodShims().through_handler(path, handed.is_set):
            handed.set()
            while path.read_bytes() != ORIGINAL:  # the watcher puts it back while StartContainer goes on
                await asyncio.sleep(0.001)
            return path.read_bytes()

    assert asyncio.run(asyncio.wait_for(run(), 5)) == ORIGINAL


def test_put_back_when_start_container_fails(tmp_path: Path) -> None:
    path = _bootstrap(tmp_path)

    async def run() -> None:
        async with PodShims().through_handler(path, lambda: False):
            raise FailedPrecondition("containerd said no")

    with pytest.raises(FailedPrecondition, match="containerd said no"):
        asyncio.run(run())
    assert path.read_bytes() == ORIGINAL


@pytest.mark.parametrize("data", [b'{"version":2,"address":"unix:///s"}', b"unix:///run/containerd/s/ab",
                                  b'{"version":"3"}', b"[3]", b"\xff\x00garbage"])
def test_left_alone_when_containerd_runs_the_handler_anyway_or_it_is_not_a_bootstrap(tmp_path: Path,
                                                                                      data: bytes) -> None:
    path = _bootstrap(tmp_path, data)

    async def run() -> bytes:
        async with PodShims().through_handler(path, lambda: False):
            return path.read_bytes()

    assert asyncio.run(run()) == data
    assert path.read_bytes() == data


def test_no_bootstrap_file_containerd_1x(tmp_path: Path) -> None:
    async def run() -> None:
        async with PodShims().through_handler(tmp_path / "missing" / "bootstrap.json", lambda: False):
            pass

    asyncio.run(run())
    assert not (tmp_path / "missing").exists()


def test_containerd_writing_it_meanwhile_wins(tmp_path: Path) -> None:
    path = _bootstrap(tmp_path)
    theirs = b'{"version":3,"address":"unix:///run/containerd/s/new","protocol":"ttrpc"}'

    async def run() -> None:
        async with PodShims().through_handler(path, lambda: False):
            path.write_bytes(theirs)

    asyncio.run(run())
    assert path.read_bytes() == theirs


def test_an_unreadable_bootstrap_is_a_clear_error_and_the_pod_is_not_held(tmp_path: Path) -> None:
    path = _bootstrap(tmp_path)
    path.unlink()
    path.mkdir()  # reading it fails with EISDIR
    shims = PodShims()

    async def run() -> None:
        async with shims.through_handler(path, lambda: False):
            pass

    with pytest.raises(FailedPrecondition, match="criu-shim's runtime handler"):
        asyncio.run(run())
    assert not shims._locks  # the next restore into the pod is not blocked


def test_two_restores_into_one_pod_take_turns(tmp_path: Path) -> None:
    path = _bootstrap(tmp_path)
    shims = PodShims()
    seen: list[tuple[str, int]] = []

    async def restore(name: str, first_in: asyncio.Event | None) -> None:
        async with shims.through_handler(path, lambda: False):
            seen.append((name, json.loads(path.read_bytes())["version"]))
            if first_in is not None:
                first_in.set()
                await asyncio.sleep(0.05)  # the other one waits for the pod meanwhile
            seen.append((name, 0))

    async def run() -> None:
        first_in = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(restore("a", first_in))
            await first_in.wait()
            tasks.create_task(restore("b", None))

    asyncio.run(run())
    assert seen == [("a", 2), ("a", 0), ("b", 2), ("b", 0)]
    assert path.read_bytes() == ORIGINAL
    assert not shims._locks
