"""criu-shim's own annotation families and how their values are read.

Users steer a checkpoint with pod annotations under `checkpoint.criu-shim.io/` (CRIU options,
opting out) and a restore under `restore.criu-shim.io/` (lazy pages; the proxy also marks a
restored container there, see shim.handoff). A boolean value is the word the kubelet and
kubectl write: "true" or "false"; anything else is refused, never guessed at.
"""

from __future__ import annotations

from shim.errors import InvalidArgument

CHECKPOINT_PREFIX = "checkpoint.criu-shim.io/"
RESTORE_PREFIX = "restore.criu-shim.io/"
TRUE, FALSE = "true", "false"
# Pod or container annotation: "false" restores the container's memory before it runs.
LAZY_PAGES = RESTORE_PREFIX + "lazy-pages"
# Container annotation, set by criu-shim's migration receiver at a restore's CreateContainer: the path of
# the checkpoint's second part, read at StartContainer (shim.restore.second_part).
IMAGES_FROM = RESTORE_PREFIX + "images-from"
# Pod or container annotation ("<container>." in front for one container): "zstd" or "none" archives.
COMPRESSION = CHECKPOINT_PREFIX + "compression"
# On a pod `kubectl checkpoint` made (for the operator): NAMESPACE/POD/CONTAINER it came from, and the image.
RESTORED_FROM = CHECKPOINT_PREFIX + "restored-from"
RESTORED_IMAGE = CHECKPOINT_PREFIX + "checkpoint-image"


def boolean(key: str, value: str, *, lenient: bool = False) -> bool:
    """The annotation `key`'s value as a bool; InvalidArgument naming key and value otherwise.

    `lenient` also takes any case and surrounding blanks (the checkpoint options always have).
    """
    word = value.strip().lower() if lenient else value
    if word not in (TRUE, FALSE):
        raise InvalidArgument(f'annotation {key}: expected "true" or "false", got {value!r}')
    return word == TRUE
