"""scripts/build-peers.py: the lock, the generated go.mod's replace lines, the stamps."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-peers.py"


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_peers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_peers"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_the_committed_lock_pins_every_recipe(peers: Any) -> None:
    entries = peers.read_lock()
    assert {e.name for e in entries} == set(peers.RECIPES)
    by_name = {e.name: e for e in entries}
    kubernetes = by_name["kubernetes"]
    # the staging modules are released as v0.<minor>.<patch> of the Kubernetes release
    assert kubernetes.local_replace == "v0" + kubernetes.version.removeprefix("v1")
    paths = peers.read_paths()
    assert all(e.recipe.prefix_key in paths for e in entries)


@pytest.mark.parametrize(("row", "error"), [
    ("kubernetes k8s.io/kubernetes v1.37.2", "expected 4 columns"),
    ("kubelet k8s.io/kubernetes v1.37.2 -", "no recipe for 'kubelet'"),
])
def test_a_bad_lock_row_names_its_line(peers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       row: str, error: str) -> None:
    lock = tmp_path / "peers.lock"
    lock.write_text(f"# comment\n\n{row}\n")
    monkeypatch.setattr(peers, "LOCK", lock)
    with pytest.raises(SystemExit, match=f"peers.lock:3: {error}"):
        peers.read_lock()


class FakeGo:
    """Answers `go mod download -json` and `go mod edit -json` with a canned upstream go.mod."""

    def __init__(self, gomod: dict[str, Any]) -> None:
        self.gomod = gomod

    def run(self, *args: str, cwd: Path) -> str:
        if args[:2] == ("mod", "download"):
            return json.dumps({"GoMod": "/cache/x.mod"})
        assert args[:3] == ("mod", "edit", "-json")
        return json.dumps(self.gomod)


STAGING_GOMOD = {
    "Require": [{"Path": "k8s.io/api", "Version": "v0.0.0"}, {"Path": "k8s.io/client-go", "Version": "v0.0.0"},
                {"Path": "github.com/x/y", "Version": "v1.2.3"}],
    "Replace": [{"Old": {"Path": "k8s.io/api"}, "New": {"Path": "./staging/src/k8s.io/api"}},
                {"Old": {"Path": "k8s.io/client-go"}, "New": {"Path": "./staging/src/k8s.io/client-go"}},
                # not required: etcd's FORBIDDEN_DEPENDENCY guard, never pinned
                {"Old": {"Path": "go.etcd.io/etcd"}, "New": {"Path": "./FORBIDDEN_DEPENDENCY"}},
                # a replace by another module version is the upstream's own business
                {"Old": {"Path": "github.com/x/y"}, "New": {"Path": "github.com/x/y", "Version": "v1.2.4"}}],
}


def test_local_replaces_pin_required_local_modules_to_the_lock_version(peers: Any, tmp_path: Path) -> None:
    entry = peers.Entry("kubernetes", "k8s.io/kubernetes", "v1.37.2", "v0.37.2")
    assert peers.local_replaces(FakeGo(STAGING_GOMOD), entry, tmp_path) == [
        "k8s.io/api=k8s.io/api@v0.37.2", "k8s.io/client-go=k8s.io/client-go@v0.37.2"]


def test_local_replaces_without_a_lock_version_is_a_clear_error(peers: Any, tmp_path: Path) -> None:
    entry = peers.Entry("kubernetes", "k8s.io/kubernetes", "v1.37.2", None)
    with pytest.raises(SystemExit, match="replaces k8s.io/api, k8s.io/client-go with local directories"):
        peers.local_replaces(FakeGo(STAGING_GOMOD), entry, tmp_path)


def test_stamp_changes_with_the_row_and_the_toolchain(peers: Any) -> None:
    entry = peers.Entry("etcd", "go.etcd.io/etcd/server/v3", "v3.7.3", "v3.7.3")
    bumped = peers.Entry("etcd", "go.etcd.io/etcd/server/v3", "v3.7.4", "v3.7.4")
    stamp = peers.stamp_of(entry, "go1.26.8")
    assert stamp == peers.stamp_of(entry, "go1.26.8")
    assert stamp != peers.stamp_of(bumped, "go1.26.8")
    assert stamp != peers.stamp_of(entry, "go1.26.9")


def test_current_needs_the_stamp_and_every_binary(peers: Any, tmp_path: Path) -> None:
    entry = peers.Entry("etcd", "go.etcd.io/etcd/server/v3", "v3.7.3", "v3.7.3")
    stamp_file, bin_dir = tmp_path / "peer-etcd", tmp_path / "bin"
    assert not peers.is_current(bin_dir, stamp_file, entry, "abc")
    stamp_file.write_text("abc\n")
    assert not peers.is_current(bin_dir, stamp_file, entry, "abc")  # binary missing
    bin_dir.mkdir()
    (bin_dir / "etcd").write_text("")
    (bin_dir / "etcd").chmod(0o755)
    assert peers.is_current(bin_dir, stamp_file, entry, "abc")
    assert not peers.is_current(bin_dir, stamp_file, entry, "def")
