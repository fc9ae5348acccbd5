"""The image a checkpointed container ran from, found (or pulled) on this node for its restore.

The rootfs of a restore is the original image plus the archive's rootfs diff, so
the image must be the very one: looked up by digest or ID first, then by name,
never re-tagged. Missing here (another node checkpointed it), it is pulled by
digest, else by name, and only from a registry the restore policy allows: the
name is the archive's word, hostile input like the rest of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shim import policy
from shim.containerd import Containerd
from shim.errors import NotFound


async def resolve_base_image(containerd: Containerd, config: dict[str, Any], allowed_registries: Sequence[str]) -> str:
    """The original image's id, from the checkpoint's config.dump."""
    candidates = [config.get(k) for k in ("rootfsImageRef", "rootfsImageName", "rootfsImage")]
    refs = [c for c in candidates if isinstance(c, str) and c]
    for ref in refs:
        image = await containerd.image_status(ref)
        if image is not None:
            return str(image.id)
    pullable = next((r for r in refs if not r.startswith("sha256:")), None)
    if pullable is not None:
        policy.admit_base_image_pull(pullable, allowed_registries)
        await containerd.pull_image(pullable)
        image = await containerd.image_status(pullable)
        if image is not None:
            return str(image.id)
    raise NotFound(f"the checkpoint's original image ({', '.join(refs)}) is not on this node "
                   "and could not be pulled")
