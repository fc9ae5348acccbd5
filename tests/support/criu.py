"""Stand-ins for CRIU's side of things in tests: a `criu` program that only answers questions, and
pagemap images in CRIU's own format (protobuf messages from pycriu, the CRIU images' own schema)."""

from __future__ import annotations

import shlex
import struct
from pathlib import Path
from typing import Any

from pycriu.images import pb

from shim.restore.pagemap import IMG_COMMON_MAGIC, PAGE_SIZE, PAGEMAP_MAGIC


def fake_criu(directory: Path, version: str = "4.2.1", *, version_output: str | None = None,
              name: str = "criu") -> Path:
    """An executable `directory/name` answering `--version` ("Version: VERSION", or `version_output`
    verbatim), `check` ("Looks good.") and `check --feature F` ("F is supported"); anything else fails."""
    said = version_output if version_output is not None else f"Version: {version}"
    script = directory / name
    script.write_text(f"""#!/bin/sh
case "$1" in
  --version) printf '%s\\n' {shlex.quote(said)} ;;
  check) if [ "$2" = --feature ]; then echo "$3 is supported"; else echo "Looks good."; fi ;;
  *) exit 1 ;;
esac
""")
    script.chmod(0o755)
    return script


def pagemap_image(pages_id: int, *runs: tuple[int, int], start: int = 0x7F0000000000) -> bytes:
    """A pagemap-N.img: its head naming pages-`pages_id`.img, then one entry per (nr_pages, flags) run,
    the runs laid out back to back from `start`."""
    head = pb.pagemap_head()
    head.pages_id = pages_id
    messages: list[Any] = [head]
    vaddr = start
    for nr_pages, flags in runs:
        entry: Any = pb.pagemap_entry()
        entry.vaddr, entry.compat_nr_pages, entry.nr_pages, entry.flags = vaddr, 0, nr_pages, flags
        vaddr += nr_pages * PAGE_SIZE
        messages.append(entry)
    out = struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)
    for message in messages:
        raw = message.SerializeToString()
        out += struct.pack("<I", len(raw)) + raw
    return out
