"""The TOML configuration: defaults, strict validation, and errors that name the file and key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shim.config import DEFAULT_AUDIT_LOG, CheckpointDefaults, Config, load, parse
from shim.errors import InvalidArgument

WHICH_CRIU = Path("/opt/test/bin/criu")


@pytest.fixture(autouse=True)
def criu_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the $PATH lookup deterministic, whatever the host has installed."""
    monkeypatch.setattr(shutil, "which", lambda name: str(WHICH_CRIU) if name == "criu" else None)


def refused(raw: dict[str, object], origin: str = "/etc/criu-shim.toml") -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse(raw, origin)
    assert caught.value.message.startswith(f"{origin}: ")
    return caught.value.message


def test_no_file_gives_defaults_and_criu_from_path() -> None:
    assert load(None) == Config(CheckpointDefaults(False, False, False, False), WHICH_CRIU, DEFAULT_AUDIT_LOG)


def test_no_criu_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert load(None).criu is None
    assert parse({}).criu is None


def test_empty_document_gives_defaults() -> None:
    assert parse({}) == Config(CheckpointDefaults(), WHICH_CRIU, DEFAULT_AUDIT_LOG)
    assert parse({"checkpoint": {}}) == parse({})


def test_every_key() -> None:
    parsed = parse({"checkpoint": {"tcp_established": True, "file_locks": True, "ext_unix_sockets": False,
                                   "fsync": True, "criu": "/usr/local/sbin/criu",
                                   "audit_log": "/var/log/cs/a.log"}})
    assert parsed == Config(CheckpointDefaults(tcp_established=True, file_locks=True, ext_unix_sockets=False,
                                               fsync=True),
                            Path("/usr/local/sbin/criu"), Path("/var/log/cs/a.log"))


@pytest.mark.parametrize("key", ["tcp_established", "file_locks", "ext_unix_sockets", "fsync"])
@pytest.mark.parametrize("value", ["true", 1, 0, None, [True]])
def test_booleans_must_be_booleans(key: str, value: object) -> None:
    assert f"checkpoint.{key} must be true or false" in refused({"checkpoint": {key: value}})


def test_unknown_keys_are_refused_by_name() -> None:
    message = refused({"checkpoint": {"tcp_established": True, "tcp-established": True, "zzz": 1}})
    assert "unknown keys in [checkpoint]: tcp-established, zzz" in message


def test_unknown_tables_are_refused_by_name() -> None:
    # A misspelt table must not silently leave the defaults in force.
    message = refused({"checkpiont": {"tcp_established": True}, "restor": {}})
    assert "unknown keys: checkpiont, restor" in message


def test_checkpoint_must_be_a_table() -> None:
    assert "[checkpoint] must be a table" in refused({"checkpoint": True})
    assert "[checkpoint] must be a table" in refused({"checkpoint": [1, 2]})


@pytest.mark.parametrize("section", [{"criu": 5}, {"criu": ["/usr/sbin/criu"]}, {"audit_log": 1},
                                     {"audit_log": {"path": "/x"}}])
def test_paths_must_be_strings(section: dict[str, object]) -> None:
    assert "checkpoint.criu and checkpoint.audit_log must be paths" in refused({"checkpoint": section})


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "criu-shim.toml"
    path.write_text('[checkpoint]\ntcp_established = true\ncriu = "/usr/sbin/criu"\n'
                    f'audit_log = "{tmp_path}/audit.log"\n')
    assert load(path) == Config(CheckpointDefaults(tcp_established=True), Path("/usr/sbin/criu"),
                                tmp_path / "audit.log")


def test_load_prefixes_validation_errors_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "criu-shim.toml"
    path.write_text("[checkpoint]\nfile_locks = \"yes\"\n")
    with pytest.raises(InvalidArgument, match=f"^{path}: checkpoint.file_locks must be true or false$"):
        load(path)


@pytest.mark.parametrize("content", [
    b"[checkpoint\ntcp_established = true\n",    # unterminated table header
    b"tcp_established = \n",                     # no value
    b"[checkpoint]\na = 1\na = 2\n",             # duplicate key
    b"\xff\xfe\x00\x01binary garbage",            # not UTF-8 at all
])
def test_garbage_file_is_invalid_argument_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "criu-shim.toml"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument) as caught:
        load(path)
    assert caught.value.message.startswith(f"config {path}: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(InvalidArgument, match=f"^config {path}: .*No such file"):
        load(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=f"^config {tmp_path}: "):
        load(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway; "
                    "test_missing_file and test_directory_instead_of_file cover the OSError path")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "criu-shim.toml"
    path.write_text("[checkpoint]\n")
    path.chmod(0)
    with pytest.raises(InvalidArgument, match=f"^config {path}: .*Permission denied"):
        load(path)


def test_retention_is_off_by_default_and_collects_the_kubelets_directory() -> None:
    from shim.config import KUBELET_CHECKPOINTS, RetentionSettings

    assert parse({}).retention == RetentionSettings() and not parse({}).retention.enabled
    assert parse({"retention": {}}).retention.dirs == (KUBELET_CHECKPOINTS,)


def test_retention_every_key() -> None:
    from shim.config import RetentionSettings

    parsed = parse({"retention": {"dirs": ["/a", "/b"], "ttl": "7d", "max_per_container": 3, "max_per_pod": 10,
                                  "node_quota_bytes": "50GiB", "interval": "10m"}}).retention
    assert parsed == RetentionSettings((Path("/a"), Path("/b")), 7 * 86400.0, 3, 10, 50 << 30, 600.0)
    assert parsed.enabled
    assert parse({"retention": {"ttl": 90, "node_quota_bytes": 1000}}).retention.node_quota_bytes == 1000
    assert parse({"retention": {"ttl": "90s"}}).retention.ttl_s == 90.0


@pytest.mark.parametrize(("raw", "error"), [
    ({"retention": []}, "[retention] must be a table"),
    ({"retention": {"max_per_pods": 1}}, "unknown keys in [retention]: max_per_pods"),
    ({"retention": {"dirs": "/var/lib/kubelet/checkpoints"}}, "retention.dirs must be a non-empty list"),
    ({"retention": {"dirs": []}}, "retention.dirs must be a non-empty list"),
    ({"retention": {"dirs": ["relative/dir"]}}, "retention.dirs must be a non-empty list of absolute paths"),
    ({"retention": {"dirs": ["/"]}}, "(not /)"),
    ({"retention": {"ttl": "7 days"}}, "retention.ttl must be a positive number of seconds"),
    ({"retention": {"ttl": 0}}, "retention.ttl must be a positive"),
    ({"retention": {"ttl": -5}}, "retention.ttl must be a positive"),
    ({"retention": {"ttl": True}}, "retention.ttl must be a positive"),
    ({"retention": {"ttl": "d"}}, "retention.ttl must be a positive"),
    ({"retention": {"ttl": float("nan")}}, "retention.ttl must be a positive"),
    ({"retention": {"ttl": float("inf")}}, "retention.ttl must be a positive"),
    ({"retention": {"max_per_container": -1}}, "retention.max_per_container must be a whole number >= 0"),
    ({"retention": {"max_per_pod": 2.5}}, "retention.max_per_pod must be a whole number >= 0"),
    ({"retention": {"max_per_pod": True}}, "retention.max_per_pod must be a whole number >= 0"),
    ({"retention": {"node_quota_bytes": "50 GB"}}, "retention.node_quota_bytes must be a positive number"),
    ({"retention": {"node_quota_bytes": "GiB"}}, "retention.node_quota_bytes must be a positive number"),
    ({"retention": {"node_quota_bytes": 0}}, "retention.node_quota_bytes must be a positive number"),
    ({"retention": {"node_quota_bytes": "10XiB"}}, "retention.node_quota_bytes must be a positive number"),
    ({"retention": {"interval": "0s"}}, "retention.interval must be a positive"),
    ({"retention": {"interval": 0.5}}, "retention.interval must be at least 1 s"),
])
def test_bad_retention_values_are_refused(raw: dict[str, object], error: str) -> None:
    assert error in refused(raw)


def test_metrics_are_off_by_default_and_take_host_and_port() -> None:
    assert parse({}).metrics.listen is None
    assert parse({"metrics": {}}).metrics.listen is None
    assert parse({"metrics": {"listen": "127.0.0.1:9464"}}).metrics.listen == ("127.0.0.1", 9464)
    assert parse({"metrics": {"listen": "[::1]:9464"}}).metrics.listen == ("::1", 9464)
    assert parse({"metrics": {"listen": ":9464"}}).metrics.listen == ("", 9464)
    assert parse({"metrics": {"listen": "node-1.example:80"}}).metrics.listen == ("node-1.example", 80)


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http",
                                    "bad host:9464", "http://127.0.0.1:9464", 9464, "", ["127.0.0.1:9464"]])
def test_bad_metrics_addresses_are_refused(listen: object) -> None:
    assert 'metrics.listen must be "host:port"' in refused({"metrics": {"listen": listen}})


def test_unknown_metrics_keys_are_refused() -> None:
    assert "unknown keys in [metrics]: path" in refused({"metrics": {"path": "/m"}})
    assert "[metrics] must be a table" in refused({"metrics": "127.0.0.1:9464"})
