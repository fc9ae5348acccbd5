"""Which restores a node admits: registry of a checkpoint image, restore config."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.config import load, parse
from shim.errors import InvalidArgument
from shim.policy import registry_of


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



def test_lazy_pages_is_on_by_default_and_can_be_turned_off() -> None:
    assert parse({}).restore.lazy_pages is True
    assert parse({"restore": {"enabled": True}}).restore.lazy_pages is True
    assert parse({"restore": {"lazy_pages": True}}).restore.lazy_pages is True
    off = parse({"restore": {"enabled": True, "lazy_pages": False}}).restore
    assert off.lazy_pages is False and off.enabled


def test_lazy_pages_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "criu-shim.toml"
    path.write_text("[restore]\nenabled = true\nlazy_pages = false\n")
    assert load(path).restore.lazy_pages is False
    path.write_text('[restore]\nlazy_pages = "no"\n')
    with pytest.raises(InvalidArgument, match=f"^{path}: restore.lazy_pages must be true or false$"):
        load(path)


@pytest.mark.parametrize("section, text", [
    ({"enabled": "yes"}, "restore.enabled must be true or false"),
    ({"lazy_pages": "false"}, "restore.lazy_pages must be true or false"),
    ({"lazy_pages": 0}, "restore.lazy_pages must be true or false"),
    ({"lazy_pages": None}, "restore.lazy_pages must be true or false"),
    ({"enabled": True, "lazy_pages": [False]}, "restore.lazy_pages must be true or false"),
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


def test_page_daemon_is_ours_by_default_criu_on_request_and_nothing_else() -> None:
    assert parse({}).restore.page_daemon == "criu-shim"
    assert parse({"restore": {"page_daemon": "criu"}}).restore.page_daemon == "criu"
    for bad in ("CRIU", "", 1, ["criu"]):
        with pytest.raises(InvalidArgument, match=r"restore.page_daemon must be one of \['criu-shim', 'criu'\]"):
            parse({"restore": {"page_daemon": bad}})
