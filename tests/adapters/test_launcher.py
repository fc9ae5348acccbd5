"""node-config/containerd-shim-criu-v2, the launcher containerd runs as the "criu" shim, run for real.

Each test runs the script with a POSIX shell in a temporary bundle directory, the
way containerd does (cwd = bundle, shim flags then the action). The stock runc
shim and the Python interpreter are fakes: sh scripts, called by absolute path
through CRIU_SHIM_RUNC_SHIM / CRIU_SHIM_PYTHON, that record their argv and pid.
PATH is an empty directory and stderr must stay empty, so any external command
the launcher ran (grep, sed, cat, mv...) would fail the test. The relay socket is
a real AF_UNIX socket bound by the test, under a short /tmp directory (unix
socket paths are limited to 108 bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.node.render import shim_launcher

LAUNCHER = Path(__file__).resolve().parents[2] / "node-config" / "containerd-shim-criu-v2"
ANNOTATION = "restore.criu-shim.io/dir"
KEY = "r-7f3a9c"
RESTORE_DIR = f"/var/lib/criu-shim/restore/{KEY}"
RUNC_ADDRESS = "unix:///run/containerd/s/abc"
# containerd's own argument order; one flag value has spaces to check the args are passed as they came.
FLAGS = ["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
         "-publish-binary", "/usr/local/bin/containerd with space", "-id", "c0ffee"]
TIMEOUT = 10.0

SHELLS = [pytest.param("/bin/sh", id="sh")]
if Path("/bin/dash").exists():
    SHELLS.append(pytest.param("/bin/dash", id="dash"))

FAKE_RUNC = """#!/bin/sh
printf '%s\\n' "$$" > {log}/runc.pid
for a; do printf '%s\\n' "$a"; done > {log}/runc.argv
[ -n "$FAKE_RUNC_EXIT" ] && exit "$FAKE_RUNC_EXIT"
printf '%s\\n' "$FAKE_RUNC_OUT"
exit 0
"""
FAKE_PYTHON = """#!/bin/sh
printf '%s\\n' "$$" > {log}/python.pid
printf '%s\\n' "$CRIU_SHIM_RUNC_SHIM" > {log}/python.env
for a; do printf '%s\\n' "$a"; done > {log}/python.argv
printf 'python-out'
exit "${{FAKE_PYTHON_EXIT:-0}}"
"""


@dataclass
class Node:
    root: Path
    bundle: Path
    shims: Path
    log: Path
    runc: Path
    python: Path
    empty_path: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": str(self.empty_path), "CRIU_SHIM_RUNC_SHIM": str(self.runc),
                "CRIU_SHIM_PYTHON": str(self.python), "CRIU_SHIM_SHIMS_DIR": str(self.shims),
                "FAKE_RUNC_OUT": RUNC_ADDRESS, **extra}

    def run(self, shell: str, args: list[str], script: Path = LAUNCHER,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], int]:
        """The launcher's result and its pid (which an exec'd program keeps)."""
        proc = subprocess.Popen([shell, str(script), *args], cwd=self.bundle, env=self.env() if env is None else env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=TIMEOUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid

    def recorded(self, name: str) -> list[str] | None:
        path = self.log / name
        return path.read_text().splitlines() if path.exists() else None

    def write_spec(self, text: str) -> None:
        (self.bundle / "config.json").write_text(text)

    def listen(self, key: str = KEY) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.shims / f"{key}.sock"))
        sock.listen(1)
        return sock


@pytest.fixture
def node() -> Iterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))
    try:
        n = Node(root=root, bundle=root / "b", shims=root / "s", log=root / "l",
                 runc=root / "runc-shim", python=root / "python", empty_path=root / "nopath")
        for d in (n.bundle, n.shims, n.log, n.empty_path):
            d.mkdir()
        n.runc.write_text(FAKE_RUNC.format(log=n.log))
        n.python.write_text(FAKE_PYTHON.format(log=n.log))
        n.runc.chmod(0o755)
        n.python.chmod(0o755)
        yield n
    finally:
        shutil.rmtree(root)


def spec(annotations: dict[str, str], **dumps: object) -> str:
    """An OCI spec shaped like containerd's: annotations after process and mounts, linux after."""
    return json.dumps({
        "ociVersion": "1.1.0",
        "process": {"args": ["/pause"], "env": ["PATH=/usr/bin:/bin"], "cwd": "/"},
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "annotations": {"io.kubernetes.cri.container-type": "container", **annotations},
        "linux": {"namespaces": [{"type": "pid"}]},
    }, **dumps)  # type: ignore[arg-type]


MARKED = {ANNOTATION: RESTORE_DIR, "restore.criu-shim.io/image": "localhost/ckpt:1"}
# Every way the spec may be laid out: containerd's compact line (no final newline), ", "/": "
# spacing on one line, and pretty-printed over many lines.
LAYOUTS = [
    pytest.param({"separators": (",", ":")}, id="compact"),
    pytest.param({}, id="spaced-one-line"),
    pytest.param({"indent": 2}, id="pretty"),
    pytest.param({"indent": "\t", "separators": (",", ": ")}, id="pretty-tabs"),
]


def assert_clean(result: subprocess.CompletedProcess[bytes]) -> None:
    """No external command ran: with PATH empty, any would print "not found" on stderr."""
    assert result.stderr == b"", result.stderr


# --- the relay path: start + annotation + socket ---------------------------------------------


@pytest.mark.parametrize("dumps", LAYOUTS)
@pytest.mark.parametrize("shell", SHELLS)
def test_restore_with_relay_runs_runc_shim_and_hands_out_the_relay(node: Node, shell: str,
                                                                   dumps: dict[str, object]) -> None:
    node.write_spec(spec(MARKED, **dumps) + ("\n" if dumps.get("indent") else ""))
    with node.listen():
        result, pid = node.run(shell, [*FLAGS, "start"])
    assert_clean(result)
    assert result.returncode == 0
    assert result.stdout == f"unix://{node.shims}/{KEY}.sock".encode()  # no trailing newline
    assert (node.shims / f"{KEY}.upstream").read_text() == "/run/containerd/s/abc\n"
    # Where a restarted containerd 1.6/1.7 looks for the task's shim: the relay, not runc's.
    assert (node.bundle / "address").read_text() == f"unix://{node.shims}/{KEY}.sock"
    assert node.recorded("runc.argv") == [*FLAGS, "start"]
    runc_pid = node.recorded("runc.pid")
    assert runc_pid is not None and int(runc_pid[0]) != pid  # a child, not an exec: we answer after it
    assert node.recorded("python.argv") is None


@pytest.mark.parametrize("shell", SHELLS)
def test_restore_with_relay_keeps_an_address_without_unix_prefix(node: Node, shell: str) -> None:
    node.write_spec(spec(MARKED, separators=(",", ":")))
    with node.listen():
        result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_RUNC_OUT="/run/containerd/s/def"))
    assert_clean(result)
    assert result.returncode == 0
    assert result.stdout == f"unix://{node.shims}/{KEY}.sock".encode()
    assert (node.shims / f"{KEY}.upstream").read_text() == "/run/containerd/s/def\n"


def bootstrap_result(address: str, version: int = 3, protocol: str = "ttrpc") -> bytes:
    """containerd's BootstrapResult as the stock shim of 2.3+ writes it (proto.Marshal, fields in order)."""
    def field(number: int, data: bytes) -> bytes:
        return bytes([number << 3 | 2, len(data)]) + data
    return bytes([1 << 3, version]) + field(2, address.encode()) + field(3, protocol.encode())


@pytest.mark.parametrize("shell", SHELLS)
def test_restore_with_relay_answers_a_protobuf_bootstrap_in_kind(node: Node, shell: str) -> None:
    """containerd 2.3+: the stock shim writes a BootstrapResult; ours is the same with the relay's address."""
    node.write_spec(spec(MARKED, separators=(",", ":")))
    answer = bootstrap_result(RUNC_ADDRESS)
    with node.listen():
        result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_RUNC_OUT=os.fsdecode(answer)))
    assert_clean(result)
    assert result.returncode == 0
    assert result.stdout == bootstrap_result(f"unix://{node.shims}/{KEY}.sock")
    assert (node.shims / f"{KEY}.upstream").read_text() == "/run/containerd/s/abc\n"
    assert (node.bundle / "address").read_text() == f"unix://{node.shims}/{KEY}.sock"


@pytest.mark.parametrize("shell", SHELLS)
def test_restore_with_relay_answers_a_json_bootstrap_in_kind(node: Node, shell: str) -> None:
    """containerd 2.0-2.2's shims answer JSON: the same JSON comes back, the address the relay's."""
    node.write_spec(spec(MARKED, separators=(",", ":")))
    answer = {"version": 3, "address": RUNC_ADDRESS, "protocol": "ttrpc"}
    with node.listen():
        result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_RUNC_OUT=json.dumps(answer)))
    assert_clean(result)
    assert result.returncode == 0
    assert json.loads(result.stdout) == {**answer, "address": f"unix://{node.shims}/{KEY}.sock"}
    assert (node.shims / f"{KEY}.upstream").read_text() == "/run/containerd/s/abc\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_restore_with_relay_refuses_a_protobuf_address_it_cannot_re_encode(node: Node, shell: str) -> None:
    """An address of 128 bytes or more has a two-byte length: refused before anything is written."""
    node.write_spec(spec(MARKED, separators=(",", ":")))
    answer = bytes([1 << 3, 3, 2 << 3 | 2, 0x82, 0x01]) + b"unix:///" + b"x" * 122 + b"\x1a\x05ttrpc"
    with node.listen():
        result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_RUNC_OUT=os.fsdecode(answer)))
    assert result.returncode == 1
    assert b"cannot hand over the runc shim's address" in result.stderr
    assert result.stdout == b""
    assert not (node.shims / f"{KEY}.upstream").exists()
    assert not (node.bundle / "address").exists()


@pytest.mark.parametrize("status", [1, 3])
@pytest.mark.parametrize("shell", SHELLS)
def test_restore_with_relay_propagates_runc_shim_failure(node: Node, shell: str, status: int) -> None:
    node.write_spec(spec(MARKED, separators=(",", ":")))
    with node.listen():
        result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_RUNC_EXIT=str(status)))
    assert_clean(result)
    assert result.returncode == status
    assert result.stdout == b""
    assert not (node.shims / f"{KEY}.upstream").exists()
    assert node.recorded("runc.argv") == [*FLAGS, "start"]
    assert node.recorded("python.argv") is None


@pytest.mark.parametrize("shell", SHELLS)
def test_relay_socket_is_looked_up_by_the_last_component_of_the_annotation(node: Node, shell: str) -> None:
    # A socket for another restore does not count; this one's key is "other".
    node.write_spec(spec({ANNOTATION: "/var/lib/criu-shim/restore/other"}, separators=(",", ":")))
    with node.listen("other"), node.listen(KEY):
        result, _ = node.run(shell, [*FLAGS, "start"])
    assert_clean(result)
    assert result.stdout == f"unix://{node.shims}/other.sock".encode()
    assert (node.shims / "other.upstream").exists()
    assert not (node.shims / f"{KEY}.upstream").exists()


# --- the Python path: start + annotation, no relay socket ------------------------------------


@pytest.mark.parametrize("dumps", LAYOUTS)
@pytest.mark.parametrize("shell", SHELLS)
def test_restore_without_relay_execs_the_python_shim(node: Node, shell: str, dumps: dict[str, object]) -> None:
    node.write_spec(spec(MARKED, **dumps))
    result, pid = node.run(shell, [*FLAGS, "start"])
    assert_clean(result)
    assert result.returncode == 0
    assert result.stdout == b"python-out"
    assert node.recorded("python.argv") == ["-m", "shim.runtime", *FLAGS, "start"]
    assert node.recorded("python.pid") == [str(pid)]  # exec'd, not a child
    assert node.recorded("python.env") == [str(node.runc)]  # the stock shim's path is exported to it
    assert node.recorded("runc.argv") is None
    assert list(node.shims.iterdir()) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_restore_without_relay_propagates_python_status(node: Node, shell: str) -> None:
    node.write_spec(spec(MARKED, separators=(",", ":")))
    result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_PYTHON_EXIT="5"))
    assert result.returncode == 5


@pytest.mark.parametrize("shell", SHELLS)
def test_a_regular_file_in_place_of_the_socket_is_no_relay(node: Node, shell: str) -> None:
    node.write_spec(spec(MARKED, separators=(",", ":")))
    (node.shims / f"{KEY}.sock").write_text("")
    result, _ = node.run(shell, [*FLAGS, "start"])
    assert_clean(result)
    assert node.recorded("python.argv") == ["-m", "shim.runtime", *FLAGS, "start"]
    assert node.recorded("runc.argv") is None
    assert not (node.shims / f"{KEY}.upstream").exists()


# --- the plain path: everything else becomes the stock runc shim ------------------------------


def assert_became_runc(node: Node, result: subprocess.CompletedProcess[bytes], pid: int, args: list[str]) -> None:
    assert_clean(result)
    assert result.returncode == 0
    assert result.stdout == f"{RUNC_ADDRESS}\n".encode()  # its output untouched
    assert node.recorded("runc.argv") == args
    assert node.recorded("runc.pid") == [str(pid)]  # exec'd
    assert node.recorded("python.argv") is None
    assert list(node.shims.glob("*.upstream")) == []


@pytest.mark.parametrize("dumps", LAYOUTS)
@pytest.mark.parametrize("shell", SHELLS)
def test_start_without_the_annotation_execs_runc_shim(node: Node, shell: str, dumps: dict[str, object]) -> None:
    # Another restore annotation, and a relay socket, are not enough.
    node.write_spec(spec({"restore.criu-shim.io/image": "localhost/ckpt:1"}, **dumps))
    with node.listen():
        result, pid = node.run(shell, [*FLAGS, "start"])
    assert_became_runc(node, result, pid, [*FLAGS, "start"])


@pytest.mark.parametrize("shell", SHELLS)
def test_start_without_config_json_execs_runc_shim(node: Node, shell: str) -> None:
    with node.listen():
        result, pid = node.run(shell, [*FLAGS, "start"])
    assert_became_runc(node, result, pid, [*FLAGS, "start"])


@pytest.mark.parametrize("action", [["delete"], ["-bundle", "/b", "delete"], []])
@pytest.mark.parametrize("shell", SHELLS)
def test_other_actions_exec_runc_shim_even_for_a_restore(node: Node, shell: str, action: list[str]) -> None:
    node.write_spec(spec(MARKED, separators=(",", ":")))
    with node.listen():
        result, pid = node.run(shell, [*FLAGS, *action])
    assert_became_runc(node, result, pid, [*FLAGS, *action])


@pytest.mark.parametrize("shell", SHELLS)
def test_plain_path_propagates_runc_shim_status(node: Node, shell: str) -> None:
    result, _ = node.run(shell, [*FLAGS, "start"], env=node.env(FAKE_RUNC_EXIT="3"))
    assert result.returncode == 3
    assert node.recorded("runc.argv") == [*FLAGS, "start"]


@pytest.mark.parametrize("shell", SHELLS)
def test_the_annotation_name_quoted_inside_another_string_is_not_the_annotation(node: Node, shell: str) -> None:
    # In JSON a quote inside a string is escaped: \"restore.criu-shim.io/dir\" is not the key.
    text = spec({}, separators=(",", ":")).replace('"/pause"', json.dumps(f'echo "{ANNOTATION}" /x/{KEY}'))
    assert f'\\"{ANNOTATION}\\"' in text
    node.write_spec(text)
    with node.listen():
        result, pid = node.run(shell, [*FLAGS, "start"])
    assert_became_runc(node, result, pid, [*FLAGS, "start"])


@pytest.mark.parametrize("shell", SHELLS)
def test_a_key_that_ends_in_the_annotation_name_after_an_escaped_quote_is_not_the_annotation(
        node: Node, shell: str) -> None:
    # "x\"restore.criu-shim.io/dir": the quote before the name is inside the key, not the key's own.
    text = spec({f'x"{ANNOTATION}': RESTORE_DIR}, separators=(",", ":"))
    assert f'\\"{ANNOTATION}":' in text
    node.write_spec(text)
    with node.listen():
        result, pid = node.run(shell, [*FLAGS, "start"])
    assert_became_runc(node, result, pid, [*FLAGS, "start"])


@pytest.mark.parametrize("shell", SHELLS)
def test_the_annotation_is_found_in_a_large_spec(node: Node, shell: str) -> None:
    # 200 KB of environment before the annotations (a long env, a seccomp profile): the lookup is
    # linear in the spec (${line#*pattern} over the whole line took minutes at this size).
    big = json.loads(spec(MARKED))
    big["process"]["env"] = [f"VAR_{i}={'v' * 90}" for i in range(2000)]
    node.write_spec(json.dumps(big, separators=(",", ":")))
    with node.listen():
        result, _ = node.run(shell, [*FLAGS, "start"])
    assert_clean(result)
    assert result.stdout == f"unix://{node.shims}/{KEY}.sock".encode()
    assert node.recorded("runc.argv") == [*FLAGS, "start"]


# --- the harness itself, and the rendered launcher -------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_an_external_command_would_be_caught(node: Node, shell: str) -> None:
    """The empty PATH has teeth: a launcher that used cat would leave stderr non-empty."""
    script = node.root / "with-cat"
    script.write_text(LAUNCHER.read_text().replace("for last; do :; done", "for last; do :; done\ncat config.json"))
    node.write_spec(spec(MARKED, separators=(",", ":")))
    result, _ = node.run(shell, [*FLAGS, "start"], script=script)
    assert result.stderr != b""


@pytest.mark.parametrize("shell", SHELLS)
def test_rendered_launcher_uses_its_baked_in_paths(node: Node, shell: str) -> None:
    rendered = node.root / "rendered"
    rendered.write_text(shim_launcher(LAUNCHER.read_text(), str(node.python), node.runc))
    node.write_spec(spec(MARKED, separators=(",", ":")))
    env = {k: v for k, v in node.env().items() if k not in ("CRIU_SHIM_PYTHON", "CRIU_SHIM_RUNC_SHIM")}
    result, _ = node.run(shell, [*FLAGS, "start"], script=rendered, env=env)
    assert_clean(result)
    assert node.recorded("python.argv") == ["-m", "shim.runtime", *FLAGS, "start"]
    assert node.recorded("python.env") == [str(node.runc)]


@pytest.mark.parametrize("shell", SHELLS)
def test_env_overrides_the_rendered_paths(node: Node, shell: str) -> None:
    node.write_spec(spec(MARKED, separators=(",", ":")))
    bogus = node.root / "bogus"
    bogus.write_text(shim_launcher(LAUNCHER.read_text(), "/nonexistent/python", "/nonexistent/runc"))
    result, pid = node.run(shell, [*FLAGS, "delete"], script=bogus)
    assert_became_runc(node, result, pid, [*FLAGS, "delete"])
    result, pid = node.run(shell, [*FLAGS, "start"], script=bogus)
    assert_clean(result)
    assert node.recorded("python.pid") == [str(pid)]
