"""Which CRIU options a checkpoint uses: node defaults, then pod-wide, then per-container annotations."""

from __future__ import annotations

import pytest

from shim.checkpoint import options
from shim.checkpoint.options import CheckpointOptions, annotation, resolve
from shim.config import CheckpointDefaults
from shim.errors import InvalidArgument

OFF = CheckpointDefaults()
ALL_ON = CheckpointDefaults(tcp_established=True, file_locks=True, ext_unix_sockets=True)


def test_annotation_keys() -> None:
    assert annotation("tcp-established") == "checkpoint.criu-shim.io/tcp-established"
    assert annotation("file-locks", "web") == "web.checkpoint.criu-shim.io/file-locks"
    assert annotation("ext-unix-sockets", None) == "checkpoint.criu-shim.io/ext-unix-sockets"
    assert options.PREFIX == "checkpoint.criu-shim.io/"


def test_no_annotations_gives_node_defaults() -> None:
    assert resolve(OFF, {}, "web") == CheckpointOptions()
    assert resolve(ALL_ON, {}, "web") == CheckpointOptions(True, True, True)
    mixed = CheckpointDefaults(tcp_established=False, file_locks=True, ext_unix_sockets=False)
    assert resolve(mixed, {}, "web") == CheckpointOptions(file_locks=True)


@pytest.mark.parametrize(("option", "attr"), [
    ("tcp-established", "tcp_established"),
    ("file-locks", "file_locks"),
    ("ext-unix-sockets", "ext_unix_sockets"),
])
def test_pod_wide_annotation_overrides_default(option: str, attr: str) -> None:
    on = resolve(OFF, {f"checkpoint.criu-shim.io/{option}": "true"}, "web")
    assert getattr(on, attr) is True
    assert sum(map(bool, (on.tcp_established, on.file_locks, on.ext_unix_sockets))) == 1
    off = resolve(ALL_ON, {f"checkpoint.criu-shim.io/{option}": "false"}, "web")
    assert getattr(off, attr) is False
    assert sum(map(bool, (off.tcp_established, off.file_locks, off.ext_unix_sockets))) == 2


@pytest.mark.parametrize("value", ["true", "TRUE", "True", " true "])
def test_values_are_case_and_space_insensitive(value: str) -> None:
    assert resolve(OFF, {"checkpoint.criu-shim.io/tcp-established": value}, "web").tcp_established


def test_per_container_annotation_wins_over_pod_wide() -> None:
    annotations = {
        "checkpoint.criu-shim.io/tcp-established": "true",
        "web.checkpoint.criu-shim.io/tcp-established": "false",
        "checkpoint.criu-shim.io/file-locks": "false",
        "web.checkpoint.criu-shim.io/file-locks": "true",
    }
    # The insertion order must not matter: try the reverse too.
    for mapping in (annotations, dict(reversed(list(annotations.items())))):
        web = resolve(OFF, mapping, "web")
        assert web == CheckpointOptions(tcp_established=False, file_locks=True)


def test_per_container_annotation_applies_to_that_container_only() -> None:
    annotations = {"sidecar.checkpoint.criu-shim.io/tcp-established": "true"}
    assert resolve(OFF, annotations, "sidecar").tcp_established
    assert not resolve(OFF, annotations, "web").tcp_established
    # A container whose name is a prefix of another's does not pick up its key.
    assert not resolve(OFF, annotations, "car").tcp_established


def test_unrelated_annotations_are_ignored() -> None:
    annotations = {
        "io.kubernetes.cri.sandbox-id": "abc",
        "kubernetes.io/config.seen": "2024-01-01T00:00:00Z",
        "checkpoint.example.com/tcp-established": "yes",  # another prefix: not ours, not validated
        "other.checkpoint.criu-shim.io/tcp-established": "not-a-bool",  # another container's key
        "tcp-established": "true",
    }
    assert resolve(OFF, annotations, "web") == CheckpointOptions()


@pytest.mark.parametrize(("key", "value"), [
    ("checkpoint.criu-shim.io/tcp-established", "yes"),
    ("checkpoint.criu-shim.io/file-locks", "1"),
    ("checkpoint.criu-shim.io/ext-unix-sockets", ""),
    ("web.checkpoint.criu-shim.io/tcp-established", "on"),
])
def test_bad_value_is_invalid_argument_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve(OFF, {key: value}, "web")
    assert key in caught.value.message
    assert repr(value) in caught.value.message
    assert '"true" or "false"' in caught.value.message


def test_bad_pod_wide_value_is_refused_even_when_container_key_overrides_it() -> None:
    # A typo in the pod-wide key is reported rather than silently shadowed.
    with pytest.raises(InvalidArgument, match="checkpoint.criu-shim.io/tcp-established"):
        resolve(OFF, {"checkpoint.criu-shim.io/tcp-established": "maybe",
                      "web.checkpoint.criu-shim.io/tcp-established": "true"}, "web")


def test_from_defaults_copies_every_field() -> None:
    assert CheckpointOptions.from_defaults(ALL_ON) == CheckpointOptions(True, True, True)
    assert CheckpointOptions.from_defaults(OFF) == CheckpointOptions(False, False, False)


def test_fsync_is_a_node_setting_not_a_pod_option() -> None:
    # Durability is the node operator's call: no annotation reaches it, and no value is validated.
    resolved = resolve(CheckpointDefaults(fsync=True), {"checkpoint.criu-shim.io/fsync": "maybe"}, "web")
    assert resolved == CheckpointOptions()
