"""Walking a directory tree one fd at a time, never through a symlink.

The rootfs a diff is applied to belongs to the container: an image or an earlier
diff member may have planted a symlink anywhere in it. Every step here opens the
next component with O_NOFOLLOW relative to the last directory's fd, so a symlink
is refused, not followed, and a swap between check and use changes nothing.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

from shim.errors import InvalidArgument

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def walk(label: str, root_fd: int, parts: tuple[str, ...], create: bool) -> int | None:
    """An fd for directory `parts` under `root_fd`, never through a symlink.

    Missing directories are made (0755) when `create`, else None is returned.
    The fd is `root_fd` itself for the root; close it with `close_unless`.
    """
    fd = root_fd
    try:
        for index, part in enumerate(parts):
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    close_unless(fd, root_fd)
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = "/".join(parts[:index + 1])
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise InvalidArgument(f"{label}: its path goes through the symlink {where!r}") from None
                if not create:
                    close_unless(fd, root_fd)
                    return None  # nothing can exist below a non-directory
                raise InvalidArgument(f"{label}: {where!r} is not a directory") from None
            fd = replace_fd(fd, root_fd, child)
    except BaseException:
        close_unless(fd, root_fd)
        raise
    return fd


def replace_fd(old: int, keep: int, new: int) -> int:
    close_unless(old, keep)
    return new


def close_unless(fd: int | None, keep: int) -> None:
    if fd is not None and fd != keep:
        os.close(fd)


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove `name` (recursively if a directory) without following symlinks; absent is fine."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based on Linux: immune to symlink swaps
    else:
        os.unlink(name, dir_fd=dir_fd)

