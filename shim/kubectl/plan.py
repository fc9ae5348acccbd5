"""Pure parts of `kubectl checkpoint`: which container, and the restore pod made from the source pod."""

from __future__ import annotations

import copy
import re
from typing import Any

from shim.annotations import RESTORED_FROM, RESTORED_IMAGE
from shim.errors import FailedPrecondition, InvalidArgument

DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"  # kubectl's own annotation
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def choose_container(pod: dict[str, Any], wanted: str | None) -> str:
    """`-c` if given (and in the pod), else kubectl's default-container annotation, else the only container."""
    names = [str(c.get("name", "")) for c in (pod.get("spec") or {}).get("containers") or []]
    pod_name = (pod.get("metadata") or {}).get("name", "")
    if wanted is not None:
        if wanted not in names:
            raise InvalidArgument(f"container {wanted} is not valid for pod {pod_name}: choose one of: "
                                  f"[{' '.join(names)}]")
        return str(wanted)
    default = ((pod.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CONTAINER)
    if default in names:
        return str(default)
    if len(names) == 1:
        return names[0]
    raise InvalidArgument(f"pod {pod_name} has {len(names)} containers: choose one with -c: [{' '.join(names)}]")


def node_of(pod: dict[str, Any]) -> str:
    node = (pod.get("spec") or {}).get("nodeName")
    meta = pod.get("metadata") or {}
    if not node:
        raise FailedPrecondition(f"pod {meta.get('name', '')} in namespace {meta.get('namespace', '')} "
                                 "is not on a node yet: nothing to checkpoint")
    return str(node)


def check_name(name: str) -> str:
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise InvalidArgument(f"invalid pod name {name!r}: lowercase letters, digits, '-' and '.', "
                              "starting and ending with a letter or digit")
    return name


def restore_pod(source: dict[str, Any], container: str, image: str, name: str, node: str | None,
                copy_labels: bool = False) -> dict[str, Any]:
    """A new pod like `source`, whose `container` is restored from the checkpoint image `image`.

    The spec is copied (volumes, security context, resources, probes: the new pod's win at restore) with
    nodeName set to `node` (no scheduler needed; None leaves it to the scheduler). Annotations are copied,
    since criu-shim reads its CRIU options (tcp-established, ...) from them at restore too. Labels are
    copied only when asked: a copy would be matched by the source's ReplicaSet or Service selectors,
    and a ReplicaSet deletes pods beyond its count. Other containers of the pod start from their images.
    """
    meta = source.get("metadata") or {}
    spec = copy.deepcopy(source.get("spec") or {})
    for key in ("nodeName", "hostname"):
        spec.pop(key, None)
    if node:
        spec["nodeName"] = node
    containers = spec.get("containers") or []
    target = next((c for c in containers if c.get("name") == container), None)
    if target is None:
        raise InvalidArgument(f"pod {meta.get('name', '')} has no container {container}")
    target["image"] = image
    target["imagePullPolicy"] = "IfNotPresent"
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    annotations[RESTORED_FROM] = f"{meta.get('namespace', '')}/{meta.get('name', '')}/{container}"
    annotations[RESTORED_IMAGE] = image
    metadata: dict[str, Any] = {"name": check_name(name), "namespace": meta.get("namespace", "default"),
                                "annotations": annotations}
    if copy_labels and meta.get("labels"):
        metadata["labels"] = dict(meta["labels"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
