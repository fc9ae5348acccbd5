"""Where the page daemon's bytes come from: a memory image seen as addressable memory.

The daemon copies with UFFDIO_COPY, which reads its source from the daemon's
own address space; so a source's one job is to make a byte range of the image
addressable (`span`) and to say what it would like read next (`prefetch`).
`MappedImage` is the local one: the image is an mmap of its bytes where they
are (a member inside the uncompressed archive, or an unpacked file), so a page
travels once, page cache to process, with no loop device and no buffer.

Other sources fit the same two calls (see the README, "Lazy restore"): a sealed
archive decrypts the chunk holding the range into a buffer it owns and returns
that buffer's address (`shim.restore.sealed_pages.SealedImage`). A lazy migration's network
stream does not fit `span` (its bytes arrive later than asked): the daemon drives it by the plan's
claims instead, asking for each and copying it in once it has landed (shim.restore.remote_pages).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path
from typing import Protocol

MADV_WILLNEED = 3
MADV_SEQUENTIAL = 2
MADV_POPULATE_READ = 22  # Linux 5.14: fault the range in (read it if needed) before the copy asks
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


class PageSource(Protocol):
    """A memory image, `size` bytes, readable in place."""

    size: int

    def span(self, offset: int, length: int) -> int:
        """The address of image bytes [offset, offset + length); waits for them if needed.

        Valid until the next `span` or `close` (a source may reuse one buffer: the sealed source
        decrypts into a window of its own, shim.restore.sealed_pages); use it before asking again.
        """
        ...

    def prefetch(self, offset: int, length: int) -> None:
        """A hint: these bytes are wanted soon (start reading them now, without waiting)."""
        ...

    def close(self) -> None: ...


class MappedImage:
    """`size` bytes of `path` from `offset`, mapped read-only (a tar member needs no alignment of its own)."""

    def __init__(self, path: Path, offset: int, size: int, unlink: bool = False) -> None:
        if offset < 0 or size <= 0:
            raise ValueError(f"memory image in {path}: offset {offset}, size {size}")
        self.size = size
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if unlink:  # a private copy (a sealed archive's plaintext): gone with the last descriptor
                path.unlink(missing_ok=True)
            if os.fstat(self._fd).st_size < offset + size:
                raise ValueError(f"memory image in {path}: ends before byte {offset + size}")
            self._file_offset = offset
            aligned = offset - offset % mmap.PAGESIZE
            self._lead = offset - aligned
            self._length = size + self._lead
            address = _libc.mmap(None, self._length, mmap.PROT_READ, mmap.MAP_SHARED, self._fd, aligned)
            if address in (None, _MAP_FAILED):
                code = ctypes.get_errno()
                raise OSError(code, f"cannot map the memory image in {path}: {os.strerror(code)}")
            self._address: int = address
        except BaseException:
            os.close(self._fd)
            raise
        _libc.madvise(self._address, self._length, MADV_SEQUENTIAL)
        self._populate = True

    def span(self, offset: int, length: int) -> int:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}+{length} are outside the memory image ({self.size} bytes)")
        address = self._address + self._lead + offset
        if self._populate:  # into our page tables first: the copy then runs without faulting on its source
            lo = address - address % mmap.PAGESIZE
            if _libc.madvise(lo, address + length - lo, MADV_POPULATE_READ) != 0:
                if ctypes.get_errno() != errno.EINVAL:  # EINVAL: an older kernel; the copy faults the pages in
                    code = ctypes.get_errno()
                    raise OSError(code, f"cannot read the memory image in {self.path}: {os.strerror(code)}")
                self._populate = False
        return address

    def prefetch(self, offset: int, length: int) -> None:
        length = min(length, self.size - offset)
        if length > 0:
            os.posix_fadvise(self._fd, self._file_offset + offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            _libc.munmap(self._address, self._length)
            os.close(self._fd)
            self._fd = -1
