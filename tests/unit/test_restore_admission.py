"""Which restores a node admits: registry of a checkpoint image, restore config."""

from __future__ import annotations

import pytest

from shim.config import parse
from shim.errors import InvalidArgument
from shim.restore.engine import registry_of


@pytest.mark.parametrize("ref, registry", [
    ("localhost/criu-shim/x:1", "localhost"),
    ("127.0.0.1:5000/criu-shim/x:1", "127.0.0.1:5000"),
    ("quay.io/org/app@sha256:" + "a" * 64, "quay.io"),
    ("library/busybox:1", "docker.io"),
    ("busybox", "docker.io"),
    ("myorg/app:ckpt", "docker.io"),
])
def test_registry_of(ref: str, registry: str) -> None:
    assert registry_of(ref) == registry


def test_restore_is_off_by_default_and_lists_are_parsed() -> None:
    default = parse({}).restore
    assert not default.enabled and default.allowed_registries == ()
    config = parse({"restore": {"enabled": True, "allowed_registries": ["localhost", "quay.io"],
                                "allowed_dirs": ["/srv/ckpt"], "work_dir": "/var/lib/x"}}).restore
    assert config.enabled and config.allowed_registries == ("localhost", "quay.io")
    assert [str(d) for d in config.allowed_dirs] == ["/srv/ckpt"]


@pytest.mark.parametrize("section, text", [
    ({"enabled": "yes"}, "restore.enabled must be true or false"),
    ({"allowed_registries": ["quay.io/org"]}, "restore.allowed_registries must be a list of registry hosts"),
    ({"allowed_registries": "quay.io"}, "restore.allowed_registries must be a list of registry hosts"),
    ({"allowed_dirs": ["relative"]}, "restore.allowed_dirs must be a list of absolute paths"),
    ({"work_dir": "x"}, "restore.work_dir must be an absolute path"),
    ({"wat": 1}, "unknown keys in [restore]: wat"),
])
def test_bad_restore_config_is_refused(section: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse({"restore": section})
    assert text in caught.value.message
