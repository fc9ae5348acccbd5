"""Retention: what counts as a checkpoint archive, which archives the rules pick, and what a pass deletes."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from shim.checkpoint.checkpointer import FACTS_MEMBER
from shim.config import RetentionSettings
from shim.retention import archives, inuse, policy
from shim.retention.archives import Archive
from shim.retention.collector import collect_once
from shim.retention.command import run as gc_command

NOW = 1_800_000_000.0
DAY = 86400.0


def checkpoint_tar(path: Path, pod: str = "web", namespace: str = "default", container: str = "app",
                   ours: bool = False, inventory: bool = True, mtime: float | None = None, size: int = 1000) -> Path:
    spec = {"annotations": {"io.kubernetes.cri.sandbox-name": pod, "io.kubernetes.cri.sandbox-namespace": namespace,
                            "io.kubernetes.cri.container-name": container}}
    members = {"spec.dump": json.dumps(spec).encode(), "config.dump": b"{}", "checkpoint/pages-1.img": bytes(size)}
    if inventory:
        members["checkpoint/inventory.img"] = b"inv"
    if ours:
        members[FACTS_MEMBER] = b"{}"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def kubelet_name(pod: str, namespace: str, container: str, stamp: str = "2026-12-04T21:00:00Z") -> str:
    return f"checkpoint-{pod}_{namespace}-{container}-{stamp}.tar"


def test_scan_recognises_the_kubelets_archives_and_ours(tmp_path: Path) -> None:
    kubelet = checkpoint_tar(tmp_path / kubelet_name("web", "default", "app"))
    ours = checkpoint_tar(tmp_path / "migration.tar", pod="db", namespace="prod", container="pg", ours=True)
    found = {a.path: a for a in archives.scan(tmp_path)}
    assert set(found) == {kubelet, ours}
    assert (found[kubelet].namespace, found[kubelet].pod, found[kubelet].container) == ("default", "web", "app")
    assert found[ours].container_key == ("prod", "db", "pg")
    assert found[kubelet].size == kubelet.stat().st_size


def test_scan_never_takes_what_is_not_a_checkpoint_archive(tmp_path: Path) -> None:
    target = checkpoint_tar(tmp_path.parent / f"{tmp_path.name}-elsewhere.tar", ours=True)
    (tmp_path / kubelet_name("a", "b", "c")).write_bytes(b"not a tar at all")
    checkpoint_tar(tmp_path / kubelet_name("a", "b", "d"), inventory=False)  # a tar, but no CRIU images
    checkpoint_tar(tmp_path / "someones-backup.tar")  # a checkpoint, but neither the kubelet's nor ours
    (tmp_path / kubelet_name("a", "b", "link")).symlink_to(target)
    (tmp_path / kubelet_name("a", "b", "dir")).mkdir()
    os.mkfifo(tmp_path / kubelet_name("a", "b", "fifo"))
    checkpoint_tar(tmp_path / "sub.tar.gz", ours=True)
    nested = tmp_path / "nested"
    nested.mkdir()
    checkpoint_tar(nested / kubelet_name("a", "b", "e"))  # not directly in the directory
    assert archives.scan(tmp_path) == []
    target.unlink()


def test_scan_does_not_follow_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    checkpoint_tar(real / kubelet_name("web", "default", "app"))
    (tmp_path / "link").symlink_to(real)
    assert archives.scan(tmp_path / "link") == []
    assert archives.scan(tmp_path / "missing") == []
    assert len(archives.scan(real)) == 1


def test_identity_from_the_kubelets_name_when_the_spec_does_not_say(tmp_path: Path) -> None:
    path = tmp_path / kubelet_name("web-0", "prod", "sidecar-x", "2026-12-04T21:00:00+01:00")
    with tarfile.open(path, "w") as tar:
        for name in ("config.dump", "checkpoint/inventory.img"):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    [found] = archives.scan(tmp_path)
    assert found.container_key == ("prod", "web-0", "sidecar-x")


def archive(name: str, age_days: float, size: int = 100, pod: str | None = "p", container: str | None = "c",
            namespace: str = "ns") -> Archive:
    return Archive(Path("/ckpt") / name, size, NOW - age_days * DAY, 1, hash(name), namespace if pod else None,
                   pod, container)


def picked(found: list[Archive], in_use: set[str] = frozenset(), **limits: object) -> dict[str, str]:  # type: ignore[assignment]
    settings = RetentionSettings(**limits)  # type: ignore[arg-type]
    return {d.archive.path.name: d.reason
            for d in policy.select(found, settings, NOW, lambda a: a.path.name in in_use)}


def test_nothing_is_picked_without_limits() -> None:
    assert not RetentionSettings().enabled
    assert picked([archive("a", 100), archive("b", 1)]) == {}


def test_ttl() -> None:
    assert picked([archive("old", 8), archive("new", 6)], ttl_s=7 * DAY) == {"old": "ttl"}


def test_max_per_container_keeps_the_newest() -> None:
    found = [archive("c1", 3), archive("c2", 2), archive("c3", 1), archive("other", 5, container="d")]
    assert picked(found, max_per_container=2) == {"c1": "max_per_container"}


def test_max_per_pod_counts_every_container_of_the_pod() -> None:
    found = [archive("a", 3, container="x"), archive("b", 2, container="y"), archive("c", 1, container="z"),
             archive("elsewhere", 9, pod="q")]
    assert picked(found, max_per_pod=2) == {"a": "max_per_pod"}
    # An archive that does not say whose it is is subject to ttl and quota only.
    assert picked([archive("anon1", 3, pod=None), archive("anon2", 2, pod=None)], max_per_pod=1) == {}


def test_node_quota_deletes_the_oldest_until_all_fit() -> None:
    found = [archive("a", 4, 300), archive("b", 3, 300), archive("c", 2, 300), archive("d", 1, 300)]
    assert picked(found, node_quota_bytes=700) == {"a": "node_quota", "b": "node_quota"}
    assert picked(found, node_quota_bytes=1200) == {}


def test_an_archive_in_use_is_never_picked_but_still_takes_its_space() -> None:
    found = [archive("a", 4, 300), archive("b", 3, 300), archive("c", 2, 300)]
    assert picked(found, in_use={"a"}, node_quota_bytes=600) == {"b": "node_quota"}
    assert picked(found, in_use={"a"}, ttl_s=DAY) == {"b": "ttl", "c": "ttl"}


def test_the_first_rule_names_the_reason() -> None:
    found = [archive("a", 10), archive("b", 1)]
    assert picked(found, ttl_s=7 * DAY, max_per_container=1) == {"a": "ttl"}


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints"
    path.mkdir()
    return path


def test_a_pass_deletes_with_an_audit_line_each_and_a_dry_run_deletes_nothing(directory: Path, tmp_path: Path) -> None:
    old = checkpoint_tar(directory / kubelet_name("web", "default", "app", "2026-01-01T00:00:00Z"),
                         mtime=NOW - 10 * DAY)
    new = checkpoint_tar(directory / kubelet_name("web", "default", "app", "2026-12-01T00:00:00Z"), mtime=NOW)
    audit_log = tmp_path / "audit.log"
    settings = RetentionSettings(dirs=(directory,), ttl_s=7 * DAY)
    [dry] = collect_once(settings, audit_log, dry_run=True, now=NOW)
    assert (dry.done, dry.decision.archive.path, dry.decision.reason) == ("would delete", old, "ttl")
    assert old.exists() and not audit_log.exists()
    old_sig, new_sig = old.with_name(old.name + ".sig"), new.with_name(new.name + ".sig")
    old_sig.write_bytes(b"sig")
    new_sig.write_bytes(b"sig")
    [done] = collect_once(settings, audit_log, now=NOW)
    assert done.done == "deleted" and not old.exists() and new.exists()
    assert not old_sig.exists() and new_sig.exists()  # a signature goes with its archive
    [line] = [json.loads(raw) for raw in audit_log.read_text().splitlines()]
    assert (line["action"], line["location"], line["pod"], line["container"]) == ("gc", str(old), "web", "app")
    assert line["result"].startswith("deleted: ttl: ")
    assert collect_once(settings, audit_log, now=NOW) == []


def test_an_archive_held_open_or_by_the_restorer_is_kept(directory: Path, tmp_path: Path) -> None:
    held_open = checkpoint_tar(directory / kubelet_name("a", "ns", "c", "2026-01-01T00:00:00Z"), mtime=NOW - 9 * DAY)
    admitted = checkpoint_tar(directory / kubelet_name("b", "ns", "c", "2026-01-01T00:00:00Z"), mtime=NOW - 9 * DAY)
    settings = RetentionSettings(dirs=(directory,), ttl_s=DAY)
    with held_open.open("rb"):  # an unpack in progress
        assert held_open in inuse.open_files({held_open})
        actions = collect_once(settings, tmp_path / "audit.log", held=frozenset({admitted}), now=NOW)
    assert sorted(a.done for a in actions) == ["kept: in use by a restore"] * 2
    assert held_open.exists() and admitted.exists()


def test_an_archive_replaced_after_it_was_judged_is_left(directory: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint_tar(directory / kubelet_name("a", "ns", "c"), mtime=NOW - 9 * DAY)
    real_scan = archives.scan

    def scan_then_replace(where: Path) -> list[Archive]:
        found = real_scan(where)
        path.unlink()
        path.write_bytes(b"someone else's file now")
        return found

    monkeypatch.setattr(archives, "scan", scan_then_replace)
    [action] = collect_once(RetentionSettings(dirs=(directory,), ttl_s=DAY), tmp_path / "audit.log", now=NOW)
    assert action.done.startswith("skipped") and path.read_bytes() == b"someone else's file now"


def test_loop_backing_files(tmp_path: Path) -> None:
    for n, backing in ((0, "/ckpt/a.tar\n"), (1, "/ckpt/b.tar (deleted)\n"), (2, "")):
        (tmp_path / f"loop{n}" / "loop").mkdir(parents=True)
        (tmp_path / f"loop{n}" / "loop" / "backing_file").write_text(backing)
    (tmp_path / "loop3").mkdir()  # a free device has no loop/ directory
    assert inuse.loop_backing_files(tmp_path) == {Path("/ckpt/a.tar")}


def test_gc_command(directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = checkpoint_tar(directory / kubelet_name("web", "default", "app"), mtime=time.time() - 3 * DAY)
    config = tmp_path / "config.toml"
    config.write_text(f'[checkpoint]\naudit_log = "{tmp_path}/audit.log"\n'
                      f'[retention]\ndirs = ["{directory}"]\nttl = "2d"\n')
    assert gc_command(config, dry_run=True) == 0
    assert capsys.readouterr().out.startswith(f"would delete\t{old}\tttl: 3.0d old, ttl 2.0d")
    assert old.exists()
    assert gc_command(config, dry_run=False) == 0
    assert capsys.readouterr().out.startswith(f"deleted\t{old}\tttl: ")
    assert not old.exists()
    config.write_text("[retention]\n")
    assert gc_command(config, dry_run=False) == 0
    assert "no limits configured" in capsys.readouterr().out


def test_the_proxys_collector_passes_at_start_and_after_a_poke(directory: Path, tmp_path: Path) -> None:
    import asyncio

    from shim.retention.collector import ArchiveCollector

    old = checkpoint_tar(directory / kubelet_name("a", "ns", "c", "2026-01-01T00:00:00Z"), mtime=time.time() - 9 * DAY)
    held = checkpoint_tar(directory / kubelet_name("b", "ns", "c", "2026-01-01T00:00:00Z"), mtime=time.time() - 9 * DAY)
    reading = {held.resolve()}
    collector = ArchiveCollector(RetentionSettings(dirs=(directory,), ttl_s=DAY, interval_s=3600),
                                 tmp_path / "audit.log", lambda: reading)

    async def scenario() -> None:
        task = asyncio.create_task(collector.run_forever())
        try:
            async with asyncio.timeout(20):
                while old.exists():  # the first pass, without waiting for the interval
                    await asyncio.sleep(0.05)
                assert held.exists()  # the Restorer still reads it
                reading.clear()
                collector.poke()
                while held.exists():
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize(("config_text", "error"), [
    ('[retention]\nttl = "soon"\n', "retention.ttl must be a positive number of seconds"),
    ('[retention]\nttl = "1d"\nmax_per_pod = -3\n', "retention.max_per_pod must be a whole number >= 0"),
    ("[retention\n", "config "),
])
def test_gc_with_a_bad_config_says_why_and_deletes_nothing(directory: Path, tmp_path: Path, config_text: str,
                                                          error: str, capsys: pytest.CaptureFixture[str]) -> None:
    from shim.cli import main

    old = checkpoint_tar(directory / kubelet_name("web", "default", "app"), mtime=time.time() - 30 * DAY)
    config = tmp_path / "config.toml"
    config.write_text(f'[checkpoint]\naudit_log = "{tmp_path}/audit.log"\n{config_text}'
                      .replace("[retention]\n", f'[retention]\ndirs = ["{directory}"]\n'))
    assert main(["gc", "--config", str(config)]) == 1
    assert error in capsys.readouterr().err
    assert old.exists() and not (tmp_path / "audit.log").exists()
