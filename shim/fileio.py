"""File data: copied in the kernel (memory images are gigabytes, a Python loop would halve the
rate), and small state files replaced atomically."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# copy_file_range and sendfile move at most ~2 GiB per call anyway (MAX_RW_COUNT).
_CHUNK = 1 << 30
# copy_file_range errors meaning "not between these two files": fall back to sendfile.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def kernel_copy(src: int, dst: int, count: int, offset: int | None = None) -> int:
    """Copy `count` bytes to `dst`'s position, from `src` at `offset` (or its position).

    Returns how many bytes were NOT copied: 0, unless `src` ended early (the
    caller decides what a short source means).
    """
    use_sendfile = False
    while count > 0:
        chunk = min(count, _CHUNK)
        try:
            done = (os.sendfile(dst, src, offset, chunk) if use_sendfile
                    else os.copy_file_range(src, dst, chunk, offset))
        except OSError as exc:
            if use_sendfile or exc.errno not in _NO_COPY_RANGE:
                raise
            use_sendfile = True
            continue
        if done == 0:
            return count
        count -= done
        if offset is not None:
            offset += done
    return 0


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part: a private temporary file (0600, named
    after our pid) renamed over it. A symlink at `path` is replaced, never followed."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)
