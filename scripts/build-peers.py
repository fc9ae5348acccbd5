#!/usr/bin/env python3
"""Build criu-shim's real peers from the Go module proxy: Kubernetes, cri-tools, containerd 2.3/2.4, etcd.

    scripts/build-peers.py                 build every entry of scripts/peers.lock that is not built yet
    scripts/build-peers.py cri-tools ...   only these entries
    scripts/build-peers.py --force NAME    rebuild NAME even when its stamp says it is there

Versions come from scripts/peers.lock, install locations from scripts/paths.env. Each entry is built
in a small module of ours (generated here, under the cache) that requires the locked module; for a
module whose own go.mod replaces sibling modules with local directories (k8s.io/kubernetes and its
staging modules, etcd's server and its siblings), which the Go toolchain ignores in a dependency,
the generated go.mod pins each of them to the lock's local-replace version instead.

Cached and idempotent: the Go module and build caches live under CRIU_SHIM_GO_CACHE, and each entry
leaves a stamp (a hash of its lock row, its recipe and the Go version) next to its binaries; an entry
whose stamp matches and whose binaries are all there is not touched, so a second run builds nothing.
Binaries are built into a fresh directory and swapped in with a rename: a failed build leaves the
previous install as it was. Every binary is linked statically (CGO_ENABLED=0): none depends on the
host's libraries.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "peers.lock"
PATHS = HERE / "paths.env"
# Bump when the build logic below changes in a way that must rebuild existing installs.
LAYOUT_REV = 1


@dataclass(frozen=True)
class Binary:
    name: str
    package: str  # relative to the entry's module
    tags: tuple[str, ...] = ()
    test_binary: bool = False  # built with `go test -c` (critest is a Ginkgo suite)


@dataclass(frozen=True)
class Recipe:
    prefix_key: str  # the paths.env key naming the bin directory
    binaries: tuple[Binary, ...]
    ldflags: tuple[str, ...] = field(default=())  # str.format()ed with the lock row's fields


K8S_VERSION_PKGS = ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
CONTAINERD_PKG = "github.com/containerd/containerd/v2"

# What each lock entry builds; the version strings the binaries report are set the way the
# projects' own release builds set them (kubelet reports its version to the API server, which
# checks version skew; containerd's and crictl's show up in `version` output).
RECIPES: dict[str, Recipe] = {
    "kubernetes": Recipe(
        "KUBERNETES_BIN_DIR",
        (Binary("kubelet", "cmd/kubelet"), Binary("kube-apiserver", "cmd/kube-apiserver"),
         Binary("kubectl", "cmd/kubectl")),
        tuple(f"-X {pkg}.{key}={{{value}}}" for pkg in K8S_VERSION_PKGS for key, value in (
            ("gitVersion", "version"), ("gitMajor", "major"), ("gitMinor", "minor"),
            ("gitTreeState", "tree_state"), ("buildDate", "build_date"))),
    ),
    "cri-tools": Recipe(
        "CRI_TOOLS_BIN_DIR",
        (Binary("crictl", "cmd/crictl"), Binary("critest", "cmd/critest", test_binary=True)),
        ("-X sigs.k8s.io/cri-tools/pkg/version.Version={bare_version}",),
    ),
    **{name: Recipe(
        key,
        # The tags of containerd's Makefile; btrfs needs cgo and is off anyway with CGO_ENABLED=0.
        (Binary("containerd", "cmd/containerd", ("urfave_cli_no_docs", "no_btrfs")),
         Binary("ctr", "cmd/ctr", ("urfave_cli_no_docs",)),
         Binary("containerd-shim-runc-v2", "cmd/containerd-shim-runc-v2", ("urfave_cli_no_docs", "no_grpc"))),
        (f"-X {CONTAINERD_PKG}/version.Version={{version}}",
         f"-X {CONTAINERD_PKG}/version.Package={CONTAINERD_PKG}",
         f"-X {CONTAINERD_PKG}/version.Revision=go-module-{{version}}"),
    ) for name, key in (("containerd-2.3", "CONTAINERD_2_3"), ("containerd-2.4", "CONTAINERD_2_4"))},
    "etcd": Recipe("ETCD_BIN_DIR", (Binary("etcd", "."),)),
    # Test peers of the signatures: cosign verifies criu-shim's archive signatures (verify-blob),
    # checkpointctl 1.6 runs criu-shim's plugin (the Debian checkpointctl 1.3 has no plugins).
    "cosign": Recipe("COSIGN_BIN_DIR", (Binary("cosign", "cmd/cosign"),),
                     ("-X sigs.k8s.io/release-utils/version.gitVersion={version}",)),
    "checkpointctl": Recipe("CHECKPOINTCTL_PLUGINS_BIN_DIR", (Binary("checkpointctl", "."),)),
}


@dataclass(frozen=True)
class Entry:
    name: str
    module: str
    version: str
    local_replace: str | None

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.name]

    def format_fields(self) -> dict[str, str]:
        major, minor = self.version.removeprefix("v").split(".")[:2]
        return {"version": self.version, "bare_version": self.version.removeprefix("v"),
                "major": major, "minor": minor, "tree_state": "clean",
                # a fixed date keeps the build reproducible (and the Go build cache warm)
                "build_date": "1970-01-01T00:00:00Z"}


def read_lock() -> list[Entry]:
    entries = []
    for number, raw in enumerate(LOCK.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cols = line.split()
        if len(cols) != 4:
            sys.exit(f"{LOCK}:{number}: expected 4 columns (name module version local-replace), got {raw!r}")
        name, module, version, local = cols
        if name not in RECIPES:
            sys.exit(f"{LOCK}:{number}: no recipe for {name!r} (known: {', '.join(RECIPES)})")
        entries.append(Entry(name, module, version, None if local == "-" else local))
    return entries


def read_paths() -> dict[str, str]:
    values = {}
    for line in PATHS.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


class Go:
    """The Go toolchain with criu-shim's caches and no network surprises (GOTOOLCHAIN=local)."""

    def __init__(self, binary: str, cache: Path) -> None:
        self.binary = binary
        self.env = {**os.environ, "GOMODCACHE": str(cache / "mod"), "GOCACHE": str(cache / "build"),
                    "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false",
                    "GOWORK": "off"}

    def run(self, *args: str, cwd: Path) -> str:
        proc = subprocess.run([self.binary, *args], cwd=cwd, env=self.env, text=True,
                              capture_output=True)
        if proc.returncode != 0:
            sys.exit(f"`go {' '.join(args)}` in {cwd} failed ({proc.returncode}):\n{proc.stderr.strip()}")
        return proc.stdout

    def version(self) -> str:
        return self.run("env", "GOVERSION", cwd=Path("/")).strip()


def local_replaces(go: Go, entry: Entry, workdir: Path) -> list[str]:
    """`M=M@V` for every module the entry's go.mod requires and replaces with a local directory."""
    info = json.loads(go.run("mod", "download", "-json", f"{entry.module}@{entry.version}", cwd=workdir))
    gomod = json.loads(go.run("mod", "edit", "-json", info["GoMod"], cwd=workdir))
    required = {req["Path"] for req in gomod.get("Require") or ()}
    local = sorted(rep["Old"]["Path"] for rep in gomod.get("Replace") or ()
                   if rep["New"]["Path"].startswith(".") and rep["Old"]["Path"] in required)
    if local and entry.local_replace is None:
        sys.exit(f"{entry.name}: {entry.module} replaces {', '.join(local)} with local directories; "
                 f"give their version in the local-replace column of {LOCK}")
    return [f"{path}={path}@{entry.local_replace}" for path in local]


def write_module(go: Go, entry: Entry, workdir: Path) -> None:
    """Our small go.mod that requires the locked module (regenerated on every build)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("go.mod", "go.sum"):
        (workdir / name).unlink(missing_ok=True)
    go.run("mod", "init", f"criu-shim.local/peers/{entry.name}", cwd=workdir)
    edits = [f"-require={entry.module}@{entry.version}"]
    edits += [f"-replace={rep}" for rep in local_replaces(go, entry, workdir)]
    go.run("mod", "edit", *edits, cwd=workdir)


def build_binary(go: Go, entry: Entry, binary: Binary, out: Path, workdir: Path) -> None:
    package = entry.module if binary.package == "." else f"{entry.module}/{binary.package}"
    ldflags = " ".join(["-s", "-w", *(flag.format(**entry.format_fields()) for flag in entry.recipe.ldflags)])
    args = ["test", "-c"] if binary.test_binary else ["build"]
    args += ["-trimpath", "-o", str(out), f"-ldflags={ldflags}"]
    if binary.tags:
        args.append("-tags=" + ",".join(binary.tags))
    go.run(*args, package, cwd=workdir)


def stamp_of(entry: Entry, go_version: str) -> str:
    blob = json.dumps({"entry": asdict(entry), "recipe": asdict(entry.recipe), "go": go_version,
                       "layout": LAYOUT_REV}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_current(bin_dir: Path, stamp_file: Path, entry: Entry, stamp: str) -> bool:
    if not stamp_file.is_file() or stamp_file.read_text().strip() != stamp:
        return False
    return all(os.access(bin_dir / b.name, os.X_OK) for b in entry.recipe.binaries)


def install(staging: Path, bin_dir: Path) -> None:
    """Swap the freshly built directory in with renames, so no reader sees a half-built set."""
    old = bin_dir.with_name(bin_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if bin_dir.exists():
        bin_dir.rename(old)
    staging.rename(bin_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_entry(go: Go, entry: Entry, bin_dir: Path, cache: Path, stamp_file: Path, stamp: str) -> float:
    start = time.monotonic()
    workdir = cache / "work" / entry.name
    write_module(go, entry, workdir)
    staging = bin_dir.with_name(bin_dir.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for binary in entry.recipe.binaries:
        t0 = time.monotonic()
        build_binary(go, entry, binary, staging / binary.name, workdir)
        print(f"  {binary.name:<24} {time.monotonic() - t0:7.1f} s", flush=True)
    install(staging, bin_dir)
    stamp_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp_file.with_suffix(".tmp")
    tmp.write_text(stamp + "\n")
    tmp.rename(stamp_file)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="lock entries to build (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    args = parser.parse_args()

    paths = read_paths()
    entries = read_lock()
    unknown = set(args.names) - {e.name for e in entries}
    if unknown:
        sys.exit(f"not in {LOCK}: {', '.join(sorted(unknown))}")
    selected = [e for e in entries if not args.names or e.name in args.names]

    cache = Path(paths["CRIU_SHIM_GO_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    if not os.access(paths["GO_BIN"], os.X_OK):
        sys.exit(f"the Go toolchain is not at {paths['GO_BIN']} (GO_BIN in {PATHS}): install Go >= 1.26 there")
    go = Go(paths["GO_BIN"], cache)
    go_version = go.version()
    stamps = Path(paths["CRIU_SHIM_PREFIX"]) / ".stamps"
    # one build at a time per machine: two `make` runs would otherwise race on the swaps
    with open(cache / ".build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        for entry in selected:
            bin_dir = Path(paths[entry.recipe.prefix_key])
            stamp_file = stamps / f"peer-{entry.name}"
            stamp = stamp_of(entry, go_version)
            label = f"{entry.name} {entry.version}"
            if not args.force and is_current(bin_dir, stamp_file, entry, stamp):
                print(f"{label:<28} ok ({bin_dir})", flush=True)
                continue
            print(f"{label:<28} building with {go_version} ...", flush=True)
            took = build_entry(go, entry, bin_dir, cache, stamp_file, stamp)
            print(f"{label:<28} built in {took:.1f} s ({bin_dir})", flush=True)


if __name__ == "__main__":
    main()
