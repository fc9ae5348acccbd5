"""Who may restore and who may be checkpointed: criu-shim's admission policy (pure).

Restore is admitted separately from container creation (containerd 2.4 removed
restore-via-CreateContainer for this reason, containerd#13871: create and
restore are different control flows an administrator wants to admit under
separate policy). A restore passes these rules, in this order, and the first
that fails refuses it with PERMISSION_DENIED naming itself:

    restore.enabled                     the node allows restores at all
    admission.restore_namespaces        the new pod's namespace (shell globs)
    admission.restore_runtime_handlers  the new pod's RuntimeClass handler ("" = none)
    restore.allowed_dirs / restore.allowed_registries   where the checkpoint comes from
    admission.restore_from_other_namespaces  (once the archive is read) a checkpoint taken in another
                                        namespace than the new pod's is refused unless this is true

A checkpoint is refused for a pod in `admission.checkpoint_excluded_namespaces`
or carrying the annotation `checkpoint.criu-shim.io/exclude: "true"` (pods
holding secrets that must never reach disk). The annotation can only opt out,
never in; a value other than "true"/"false" refuses too (fail closed).

The facts come from containerd (the sandbox's status), not from the request,
so a CRI caller cannot claim another namespace. Nothing here does I/O: the
engines pass resolved paths and sandbox facts in.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim import oci
from shim.annotations import CHECKPOINT_PREFIX, FALSE, TRUE
from shim.errors import InvalidArgument, PermissionDenied

EXCLUDE_ANNOTATION = CHECKPOINT_PREFIX + "exclude"
ANY = ("*",)


@dataclass(frozen=True)
class AdmissionSettings:
    """The `[admission]` table of the config file."""

    restore_namespaces: tuple[str, ...] = ANY
    restore_runtime_handlers: tuple[str, ...] = ANY
    checkpoint_excluded_namespaces: tuple[str, ...] = ()
    # A checkpoint holds its pod's memory (tokens, keys): it goes back into its own namespace only.
    restore_from_other_namespaces: bool = False


@dataclass(frozen=True)
class PodFacts:
    """What containerd says about a pod (PodSandboxStatus)."""

    namespace: str
    name: str
    runtime_handler: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_section(section: Any, origin: str) -> AdmissionSettings:
    """`[admission]` from a parsed TOML table; anything unexpected is refused, naming the key."""
    if not isinstance(section, dict):
        raise InvalidArgument(f"{origin}: [admission] must be a table")
    keys = {"restore_namespaces", "restore_runtime_handlers", "checkpoint_excluded_namespaces"}
    unknown = set(section) - keys - {"restore_from_other_namespaces"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown keys in [admission]: {', '.join(sorted(unknown))}")
    defaults = AdmissionSettings()
    values = {key: _patterns(section.get(key, list(getattr(defaults, key))), f"{origin}: admission.{key}",
                             allow_empty_string=key == "restore_runtime_handlers")
              for key in sorted(keys)}
    other = section.get("restore_from_other_namespaces", False)
    if not isinstance(other, bool):
        raise InvalidArgument(f"{origin}: admission.restore_from_other_namespaces must be true or false, "
                              f"got {other!r}")
    return AdmissionSettings(**values, restore_from_other_namespaces=other)


def _patterns(value: Any, what: str, allow_empty_string: bool) -> tuple[str, ...]:
    ok = isinstance(value, list) and all(
        isinstance(p, str) and (p or allow_empty_string) and p.isprintable() for p in value)
    if not ok:
        empty = ' ("" stands for pods without a RuntimeClass)' if allow_empty_string else ""
        raise InvalidArgument(f"{what} must be a list of names or shell patterns (\"team-*\"){empty}, got {value!r}")
    return tuple(value)


def _matches(value: str, patterns: Sequence[str]) -> bool:
    # fnmatchcase: namespaces are case-sensitive, and the host's case rules must not matter.
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _show(values: Sequence[str]) -> str:
    return json.dumps(list(values))


def require_restore_enabled(enabled: bool, image: str) -> None:
    if not enabled:
        raise PermissionDenied(f"restore from checkpoint {image} refused by rule restore.enabled: restores are "
                               "disabled on this node (set [restore] enabled = true in the criu-shim config)")


def admit_restore_into(settings: AdmissionSettings, pod: PodFacts, image: str) -> None:
    """The new pod may receive a restore: its namespace and its RuntimeClass handler."""
    if not _matches(pod.namespace, settings.restore_namespaces):
        raise PermissionDenied(
            f"restore from checkpoint {image} into pod {pod.ref} refused by rule admission.restore_namespaces: "
            f"namespace {pod.namespace!r} matches none of {_show(settings.restore_namespaces)}")
    if not _matches(pod.runtime_handler, settings.restore_runtime_handlers):
        raise PermissionDenied(
            f"restore from checkpoint {image} into pod {pod.ref} refused by rule admission.restore_runtime_handlers: "
            f"runtime handler {pod.runtime_handler!r} matches none of {_show(settings.restore_runtime_handlers)}")


def origin_namespace(spec: Mapping[str, Any]) -> str | None:
    """The namespace of the pod a checkpoint was taken in, as containerd recorded it in the container's
    OCI spec (criu-shim's and containerd's archives); None where the archive does not say."""
    annotations = spec.get("annotations") if isinstance(spec, Mapping) else None
    value = annotations.get(oci.CRI_SANDBOX_NAMESPACE) if isinstance(annotations, Mapping) else None
    return value if isinstance(value, str) and value else None


def admit_origin(settings: AdmissionSettings, pod: PodFacts, origin: str | None, image: str) -> None:
    """A checkpoint goes back into the namespace it came from, unless the node allows otherwise: its
    memory holds what that namespace's pod held (tokens, keys), which no other tenant may receive."""
    if settings.restore_from_other_namespaces or origin is None or origin == pod.namespace:
        return
    raise PermissionDenied(
        f"restore from checkpoint {image} into pod {pod.ref} refused by rule "
        f"admission.restore_from_other_namespaces: the checkpoint was taken in namespace {origin!r}, not "
        f"{pod.namespace!r} (set restore_from_other_namespaces = true in [admission] to allow)")


def admit_archive(requested: Path, real: Path, is_file: bool, allowed_dirs: Sequence[Path]) -> Path:
    """`real` (the archive with links resolved) if it is a file under an allowed directory (also resolved)."""
    if not is_file or not any(real.is_relative_to(d) for d in allowed_dirs):
        raise PermissionDenied(f"restore from checkpoint {requested} refused by rule restore.allowed_dirs: it is not "
                               f"a file under an allowed directory (restore.allowed_dirs = "
                               f"{[str(d) for d in allowed_dirs]})")
    return real


def admit_registry(ref: str, allowed_registries: Sequence[str]) -> None:
    """A checkpoint image is restored only from an allow-listed registry."""
    registry = registry_of(ref)
    if registry not in allowed_registries:
        raise PermissionDenied(f"restore from checkpoint image {ref} refused by rule restore.allowed_registries: "
                               f"registry {registry!r} is not in restore.allowed_registries {list(allowed_registries)}")


def admit_base_image_pull(ref: str, allowed_registries: Sequence[str]) -> None:
    """The original image a checkpoint names is pulled only from an allow-listed registry.

    The name comes from the archive (hostile input): without this rule a crafted
    checkpoint makes the node contact any registry it names.
    """
    registry = registry_of(ref)
    if registry not in allowed_registries:
        raise PermissionDenied(f"restore refused by rule restore.allowed_registries: the checkpoint's original image "
                               f"{ref} is not on this node and its registry {registry!r} is not in "
                               f"restore.allowed_registries {list(allowed_registries)} (it was not contacted)")


def registry_of(ref: str) -> str:
    """The registry host of an image reference, as docker names it (docker.io when implicit)."""
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def admit_checkpoint(settings: AdmissionSettings, pod: PodFacts, container_id: str) -> None:
    """The container's pod may be checkpointed: not in an excluded namespace, not opted out."""
    if _matches(pod.namespace, settings.checkpoint_excluded_namespaces):
        raise PermissionDenied(
            f"checkpoint of container {container_id} in pod {pod.ref} refused by rule "
            f"admission.checkpoint_excluded_namespaces: namespace {pod.namespace!r} matches "
            f"{_show(settings.checkpoint_excluded_namespaces)}")
    value = pod.annotations.get(EXCLUDE_ANNOTATION)
    if value is None or value == FALSE:
        return
    why = "the pod opted out" if value == TRUE else f'its value {value!r} is not "true" or "false"'
    raise PermissionDenied(f"checkpoint of container {container_id} in pod {pod.ref} refused by the pod "
                           f"annotation {EXCLUDE_ANNOTATION}: {why}")
