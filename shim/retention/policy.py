"""Which archives go: pure rules over what `archives.scan` found (no I/O, tested alone).

The rules, each independent, an archive going for the first that picks it:
`ttl` (older than the TTL, by modification time), `max_per_container` and
`max_per_pod` (beyond the newest N of that container or pod), `node_quota`
(the oldest of what is left go until all archives together fit). An archive
in use by a restore is never picked; it still counts towards the quota and
the counts (it still takes the space), so the next oldest may go instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from shim.config import RetentionSettings
from shim.retention.archives import Archive


@dataclass(frozen=True)
class Decision:
    archive: Archive
    reason: str  # ttl | max_per_container | max_per_pod | node_quota
    detail: str  # for people: why, with the numbers


def select(archives: Iterable[Archive], settings: RetentionSettings, now: float,
           in_use: Callable[[Archive], bool] = lambda _: False) -> list[Decision]:
    """The archives to delete, oldest first, each with the rule that picked it."""
    newest_first = sorted(archives, key=lambda a: (a.mtime, str(a.path)), reverse=True)
    going: dict[Archive, Decision] = {}

    def pick(archive: Archive, reason: str, detail: str) -> None:
        if archive not in going and not in_use(archive):
            going[archive] = Decision(archive, reason, detail)

    if settings.ttl_s is not None:
        for archive in newest_first:
            age = now - archive.mtime
            if age > settings.ttl_s:
                pick(archive, "ttl", f"{_duration(age)} old, ttl {_duration(settings.ttl_s)}")
    for reason, limit, key in (("max_per_container", settings.max_per_container, _container),
                               ("max_per_pod", settings.max_per_pod, _pod)):
        if limit:
            for group, members in _groups(newest_first, key).items():
                for archive in members[limit:]:
                    pick(archive, reason, f"{len(members)} archives of {_name(group)}, keeping the newest {limit}")
    if settings.node_quota_bytes is not None:
        total = sum(a.size for a in newest_first if a not in going)
        for archive in reversed(newest_first):
            if total <= settings.node_quota_bytes:
                break
            if archive not in going and not in_use(archive):
                pick(archive, "node_quota", f"archives take {total} bytes, quota {settings.node_quota_bytes}")
                total -= archive.size
    return sorted(going.values(), key=lambda d: (d.archive.mtime, str(d.archive.path)))


def _container(archive: Archive) -> Hashable | None:
    return archive.container_key


def _pod(archive: Archive) -> Hashable | None:
    return archive.pod_key


def _groups(archives: list[Archive], key: Callable[[Archive], Hashable | None]) -> dict[Hashable, list[Archive]]:
    groups: dict[Hashable, list[Archive]] = defaultdict(list)
    for archive in archives:  # newest first, kept in that order
        group = key(archive)
        if group is not None:  # an archive that does not say whose it is is only subject to ttl and quota
            groups[group].append(archive)
    return groups


def _name(group: Hashable) -> str:
    parts = list(group) if isinstance(group, tuple) else [str(group)]
    return "/".join(str(p) for p in parts)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
