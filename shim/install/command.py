"""The `criu-shim install` and `criu-shim uninstall` commands: find the node, diff, write, check."""

from __future__ import annotations

import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from shim.config import DEFAULT_STATE_DIR
from shim.errors import InvalidArgument
from shim.install import files, state


def state_dir(root: Path) -> Path:
    return root / DEFAULT_STATE_DIR.relative_to("/") / "install"


def node_from_args(root: Path, containerd_config: Path | None, containerd_bin: str | None, criu_shim: str | None,
                   keep_default_runtime: bool, kubelet: bool, python: str | None = None) -> files.Node:
    config = containerd_config or root / files.CONTAINERD_CONFIG
    if config.is_symlink():  # the file behind the link changes (and comes back); the link stays a link
        config = config.resolve()
    binary = _containerd_binary(containerd_bin)
    runc_shim = _runc_shim(binary)
    return files.Node(root=root, containerd_config=config.absolute(),
                      containerd_version=containerd_version(binary) if binary else None,
                      criu_shim=criu_shim or shutil.which("criu-shim") or str(Path(sys.argv[0]).absolute()),
                      python=python or sys.executable, runc_shim=runc_shim, keep_default_runtime=keep_default_runtime,
                      kubelet=kubelet)


def _containerd_binary(given: str | None) -> Path | None:
    if given:
        path = Path(given)
        path = path / "containerd" if path.is_dir() else path
        if not path.is_file():
            raise InvalidArgument(f"--containerd-bin {given}: no containerd binary there")
        return path
    found = shutil.which("containerd")
    return Path(found) if found else None


def containerd_version(binary: Path) -> str:
    """"1.7.24" from `containerd --version` ("containerd github.com/containerd/containerd 1.7.24~ds1 ...")."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"\sv?(\d+\.\d+\.\d+)", out)
    if match is None:
        raise InvalidArgument(f"{binary} --version said {out.strip()!r}: not a containerd version")
    return match.group(1)


def _runc_shim(containerd: Path | None) -> str:
    """The stock runc shim's full path: next to containerd (where containerd looks too), else on PATH."""
    if containerd is not None and (containerd.parent / "containerd-shim-runc-v2").is_file():
        return str(containerd.parent / "containerd-shim-runc-v2")
    return shutil.which("containerd-shim-runc-v2") or "/usr/bin/containerd-shim-runc-v2"


def unified_diffs(changes: list[files.Change]) -> str:
    out: list[str] = []
    for change in changes:
        if not change.changes_anything:
            continue
        before = (change.before or b"").decode(errors="replace").splitlines(keepends=True)
        after = change.after.decode(errors="replace").splitlines(keepends=True)
        old = str(change.path) if change.before is not None else "/dev/null"
        out.extend(difflib.unified_diff(before, after, old, str(change.path)))
        if out and not out[-1].endswith("\n"):
            out.append("\n\\ No newline at end of file\n")
    return "".join(out)


def install(node: files.Node, dry_run: bool, check: bool, containerd_bin: str | None = None) -> int:
    planned = files.changes(node)  # every refusal (unparseable config...) happens here, before any write
    if dry_run:
        diff = unified_diffs(planned)
        print(diff if diff else "criu-shim install: nothing to change", end="" if diff else "\n")
        return 0
    written = state.install(planned, state_dir(node.root))
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("criu-shim install: already installed, nothing to change")
    print(f"originals kept in {state_dir(node.root)}; `criu-shim uninstall` puts them back")
    if written and node.root == Path("/"):
        print("next: systemctl daemon-reload && systemctl enable --now criu-shim && "
              "systemctl restart containerd" + (" kubelet" if node.kubelet else ""))
    if not check:
        return 0
    from shim import preflight

    return preflight.run(None, None, containerd_bin or shutil.which("containerd"))


def uninstall(root: Path, force: bool) -> int:
    for line in state.uninstall(state_dir(root), force):
        print(line)
    return 0
