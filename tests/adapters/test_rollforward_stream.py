"""A stop-after archive written before CRIU's gate opens (StreamedArchive.append), then completed either
by the live checkpoint (`complete`) or, criu-shim having died, by recovery's roll-forward: the same tar."""

from __future__ import annotations

import contextlib
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from shim.checkpoint import rollforward
from shim.checkpoint.archive import Member
from shim.checkpoint.compression import Compression
from tests.adapters.test_pagestream import INTERLEAVED, run_dump

CONTAINER = "c0ffee"


@pytest.mark.parametrize("zstd", [False, True], ids=["tar", "zstd"])
@pytest.mark.parametrize("completed_by", ["criu-shim", "recovery"])
def test_an_archive_prepared_before_the_gate_is_completed_with_what_criu_wrote_last(tmp_path: Path,
                                                                                   completed_by: str,
                                                                                   zstd: bool) -> None:
    staging = tmp_path / ".criu-shim-c0ffee-1"
    staging.mkdir(mode=0o700)
    images, work = staging / "checkpoint", staging / "work"
    compression = Compression(3, threads=0) if zstd else None
    streamed = run_dump(staging, INTERLEAVED, [str(images / "pages-1.img"), str(images / "pages-2.img")],
                        processes=2, compression=compression)  # pages-2 arrives out of turn: spilled, then appended
    work.mkdir(mode=0o700)
    (images / "core-1.img").write_bytes(b"core")
    os.mkfifo(images / "inventory.img", 0o600)  # the gate, still closed
    (images / "files.img").write_bytes(b"half")  # CRIU still holds it open, buffered
    late = rollforward.late_names({"files.img"})
    early = [Member("checkpoint", is_dir=True), Member("spec.dump", data=b"{}"),
             Member("checkpoint/core-1.img", source=images / "core-1.img")]
    assert not any(m.name in late for m in early)
    end, file_end = streamed.append(early, durable=True)
    location = tmp_path / "out.tar"
    rollforward.write_marker(rollforward.Marker(CONTAINER, location, staging, end, file_end, 3 if zstd else None),
                             durable=True)
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
    with open(location, "rb") as f, contextlib.ExitStack() as stack:
        source = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)) \
            if zstd else f
        contents = {i.name: tar.extractfile(i).read() if i.isreg() else b""  # type: ignore[union-attr]
                    for tar in [stack.enter_context(tarfile.open(fileobj=source, mode="r|"))] for i in tar}
        names = list(contents)
        assert sorted(names) == sorted(set(names))  # each member once
        assert set(names) == {"checkpoint", "spec.dump", "checkpoint/core-1.img", "checkpoint/pages-1.img",
                              "checkpoint/pages-2.img", "checkpoint/files.img", "checkpoint/inventory.img",
                              "stats-dump", "dump.log"}
        assert contents["checkpoint/files.img"] == b"files, whole"
        assert contents["checkpoint/pages-2.img"] == b"B" * 300000
        assert contents["checkpoint/pages-1.img"] == b"A" * 200000
