"""The restore hand-off is spelled once (shim.handoff); the sh launcher and the node config, which
cannot import it, and the Python modules not yet reading it, are checked against it here."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from shim import handoff
from shim.handoff import RESTORE_ANNOTATIONS, RESTORE_DIR, SHIM_DIR, SHIM_DIR_ENV, RelayFiles

NODE_CONFIG = Path(__file__).resolve().parents[2] / "node-config"
LAUNCHER = (NODE_CONFIG / "containerd-shim-criu-v2").read_text()


def test_launcher_looks_for_the_annotation_as_a_json_key() -> None:
    # containerd writes the spec as JSON: the launcher finds a line with the quoted key, then the key
    # as a whole field of the line split at its quotes.
    assert LAUNCHER.count(f"'\"{RESTORE_DIR}\"'") == 1
    assert f'"$2" = {RESTORE_DIR} ]' in LAUNCHER


def test_launcher_meets_the_relay_in_the_rendezvous_directory() -> None:
    assert f'SHIMS="${{{SHIM_DIR_ENV}:-{SHIM_DIR}}}"' in LAUNCHER
    # In the launcher the directory is $SHIMS and the key $key: the files it tests and writes.
    files = RelayFiles("$key", Path("$SHIMS"))
    assert f'-S "{files.socket}"' in LAUNCHER
    assert f'> "{files.upstream_file}"' in LAUNCHER
    assert f'relay="unix://{files.socket}"' in LAUNCHER


def test_containerd_copies_the_hand_off_annotations_into_the_spec() -> None:
    config = tomllib.loads((NODE_CONFIG / "containerd-cri.toml").read_text())
    criu = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["criu"]
    assert tuple(criu["container_annotations"]) == RESTORE_ANNOTATIONS
    assert fnmatch.fnmatchcase(RESTORE_DIR, RESTORE_ANNOTATIONS[0])
    assert handoff.CRIU_CONFIG_ANNOTATION in RESTORE_ANNOTATIONS


def test_python_copies_still_agree_with_the_owner() -> None:
    """Names other modules keep under their own name (aliases of the owner's): pinned equal."""
    from shim.restore import lazy, relay_processes
    from shim.runtime import lazy_daemon

    assert lazy.PLAN_FILE == lazy_daemon.PLAN_FILE == handoff.LAZY_PLAN
    assert lazy.CRIU_OPTION == lazy_daemon.CRIU_OPTION == handoff.LAZY_CRIU_OPTION
    daemon = lazy_daemon.LazyPages(Path("/w/abc"), Path("/criu"), {})
    assert daemon.criu_config == handoff.criu_config(Path("/w/abc"))
    relay, files = relay_processes.Relay(Path("/w/abc")), RelayFiles("abc")
    assert (relay.socket, relay.upstream_file, relay.pid_file, relay.log_file) == (
        files.socket, files.upstream_file, files.pid_file, files.log_file)


def test_criu_config_sits_beside_the_work_dir() -> None:
    assert handoff.criu_config(Path("/var/lib/criu-shim/restore/abc")) == Path("/var/lib/criu-shim/restore/abc.criu.conf")
