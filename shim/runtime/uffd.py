"""userfaultfd, the parts a page daemon uses: reading its events and the COPY, ZEROPAGE, WAKE, UNREGISTER ioctls.

The restoring CRIU opens the descriptor (with the FORK, REMAP, REMOVE and UNMAP
events where the kernel has them), registers the process's lazy memory on it
and hands it over; the daemon only reads and fills. Each ioctl reports what it
did: a copy that stops part way says how many bytes landed (`Outcome.done`) and
why it stopped (`Outcome.error`, an errno: EEXIST a page was there already,
EAGAIN the address space is changing and events wait to be read, ESRCH/ENOSPC
the process is gone, ENOENT nothing is registered there any more).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

# linux/userfaultfd.h
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16
_IOC_UFFD = 0xAA


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_IOC_UFFD << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_IOC_UFFD << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_UNREGISTER = _ior(0x01, ctypes.sizeof(_Range))
UFFDIO_WAKE = _ior(0x02, ctypes.sizeof(_Range))
UFFDIO_COPY = _iowr(0x03, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _iowr(0x04, ctypes.sizeof(_Zeropage))
MSG_SIZE = 32
_MSG = struct.Struct("=B3x4x24s")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
# The process is gone (its mm exited): nothing to fill any more.
GONE = frozenset({errno.ESRCH, errno.ENOSPC})


@dataclass(frozen=True, slots=True)
class Event:
    """One uffd_msg: `kind` is an EVENT_* and `args` its three u64 (fault: flags, address; fork: ufd;
    remap: from, to, len; remove/unmap: start, end)."""

    kind: int
    args: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Outcome:
    done: int  # bytes in place from the start of the range
    error: int  # 0, or the errno that stopped it


def read_events(fd: int, limit: int = 64) -> list[Event]:
    """The events waiting on `fd` (non-blocking); [] if none. OSError for anything but EAGAIN."""
    try:
        raw = os.read(fd, MSG_SIZE * limit)
    except BlockingIOError:
        return []
    events = []
    for pos in range(0, len(raw) - len(raw) % MSG_SIZE, MSG_SIZE):
        kind, arg = _MSG.unpack_from(raw, pos)
        events.append(Event(kind, struct.unpack_from("=3Q", arg)))
    return events


def copy(fd: int, dst: int, src: int, length: int) -> Outcome:
    """UFFDIO_COPY `length` bytes from our `src` to `dst` in the process (waking its threads waiting there)."""
    arg = _Copy(dst, src, length, 0, 0)
    return _outcome(_libc.ioctl(fd, UFFDIO_COPY, ctypes.byref(arg)), arg.copy, length)


def zeropage(fd: int, dst: int, length: int) -> Outcome:
    """UFFDIO_ZEROPAGE over [dst, dst + length)."""
    arg = _Zeropage(_Range(dst, length), 0, 0)
    return _outcome(_libc.ioctl(fd, UFFDIO_ZEROPAGE, ctypes.byref(arg)), arg.zeropage, length)


def wake(fd: int, start: int, length: int) -> None:
    """Wake threads waiting on [start, start + length) (a page that was in place already)."""
    _libc.ioctl(fd, UFFDIO_WAKE, ctypes.byref(_Range(start, length)))


def unregister(fd: int, start: int, length: int) -> int:
    """Stop handling faults in [start, start + length): 0 or the errno (ENOMEM: the process is gone)."""
    if _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.byref(_Range(start, length))) == 0:
        return 0
    return ctypes.get_errno()


def _outcome(rc: int, reported: int, length: int) -> Outcome:
    """The kernel writes the bytes done (or -errno) into the struct; a partial copy returns EAGAIN."""
    if rc == 0:
        return Outcome(length, 0)
    code = ctypes.get_errno()
    if reported > 0:  # part landed, then the next page failed (-EAGAIN from the ioctl hides the reason)
        return Outcome(reported, code)
    return Outcome(0, -reported if reported < 0 else code)
