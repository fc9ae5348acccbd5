"""A stop-after archive written before CRIU's gate opens (StreamedArchive.append), then completed either
by the live checkpoint (`complete`) or, criu-shim having died, by recovery's roll-forward: the same tar."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint import rollforward
from shim.checkpoint.archive import Member
from tests.adapters.test_pagestream import INTERLEAVED, run_dump

CONTAINER = "c0ffee"


@pytest.mark.parametrize("completed_by", ["criu-shim", "recovery"])
def test_an_archive_prepared_before_the_gate_is_completed_with_what_criu_wrote_last(tmp_path: Path,
                                                                                   completed_by: str) -> None:
    staging = tmp_path / ".criu-shim-c0ffee-1"
    staging.mkdir(mode=0o700)
    images, work = staging / "checkpoint", staging / "work"
    streamed = run_dump(staging, INTERLEAVED, [str(images / "pages-1.img"), str(images / "pages-2.img")],
                        processes=2)  # pages-2 arrives out of turn: spilled, archived by `append`
    work.mkdir(mode=0o700)
    (images / "core-1.img").write_bytes(b"core")
    os.mkfifo(images / "inventory.img", 0o600)  # the gate, still closed
    (images / "files.img").write_bytes(b"half")  # CRIU still holds it open, buffered
    late = rollforward.late_names({"files.img"})
    early = [Member("checkpoint", is_dir=True), Member("spec.dump", data=b"{}"),
             Member("checkpoint/core-1.img", source=images / "core-1.img")]
    assert not any(m.name in late for m in early)
    end = streamed.append(early, durable=True)
    location = tmp_path / "out.tar"
    rollforward.write_marker(rollforward.Marker(CONTAINER, location, staging, end), durable=True)
    written = {m.name for m in early} | streamed.image_names
    # The gate opens; CRIU writes its inventory, closes its last images, ends the tasks, logs and exits.
    (images / "inventory.img").unlink()
    for name, data in (("inventory.img", b"inventory"), ("files.img", b"files, whole")):
        (images / name).write_bytes(data)
        (images / name).chmod(0o600)
    (work / "dump.log").write_text("(00.2) Dumping finished successfully\n")
    (work / "stats-dump").write_bytes(b"stats")
    for path in work.iterdir():
        path.chmod(0o600)
    if completed_by == "criu-shim":
        size = streamed.complete(location, rollforward.late_members(staging, written), durable=False)
        streamed.close()
    else:
        streamed.close()  # criu-shim died: its descriptors went, the file stayed
        size = rollforward.complete(rollforward.decide(staging, CONTAINER, str(location)))
    assert location.stat().st_size == size
    with tarfile.open(location) as tar:
        names = tar.getnames()
        assert sorted(names) == sorted(set(names))  # each member once
        assert set(names) == {"checkpoint", "spec.dump", "checkpoint/core-1.img", "checkpoint/pages-1.img",
                              "checkpoint/pages-2.img", "checkpoint/files.img", "checkpoint/inventory.img",
                              "stats-dump", "dump.log"}
        assert tar.extractfile("checkpoint/files.img").read() == b"files, whole"  # type: ignore[union-attr]
        assert tar.extractfile("checkpoint/pages-2.img").read() == b"B" * 300000  # type: ignore[union-attr]
        assert tar.extractfile("checkpoint/pages-1.img").read() == b"A" * 200000  # type: ignore[union-attr]
