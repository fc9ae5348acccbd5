"""Image references, as distribution's grammar spells them: HOST[:PORT]/REPOSITORY[:TAG][@DIGEST].

The one owner of that grammar: the registry client (shim.registry), the [export] config section
(shim.config), `criu-shim push`/`pull` and `kubectl checkpoint` all check names here. Ground layer:
it needs nothing but shim.errors.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from shim.errors import InvalidArgument

# distribution's reference grammar
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?$")


def is_registry_host(host: str) -> bool:
    """HOST[:PORT] that names a registry: a dot or a port in it, or localhost (never docker.io by default)."""
    return bool(_HOST_RE.match(host)) and ("." in host or ":" in host or host == "localhost")


def is_repository(name: str) -> bool:
    return bool(_REPO_RE.match(name)) and len(name) <= 255


def is_tag(tag: str) -> bool:
    return bool(_TAG_RE.match(tag))


def is_digest(digest: str) -> bool:
    """A sha256 digest, the only algorithm registries and containerd use for checkpoint images."""
    return bool(_DIGEST_RE.match(digest))


@dataclass(frozen=True)
class Reference:
    """HOST[:PORT]/REPO[:TAG][@DIGEST], always naming its registry (never docker.io by default)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        host, slash, rest = ref.partition("/")
        if not slash or not is_registry_host(host):
            raise InvalidArgument(f"image reference {ref!r} must name its registry: HOST[:PORT]/REPOSITORY[:TAG]")
        rest, at, digest = rest.partition("@")
        name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if not colon:
            name = rest
        reference = cls(host, name, tag or None, digest or None)
        if at and not digest:
            raise InvalidArgument(f"image reference {ref!r}: empty digest")
        reference.check()
        if reference.tag is None and reference.digest is None:
            return cls(host, name, "latest")
        return reference

    def check(self) -> None:
        if not is_registry_host(self.registry):
            raise InvalidArgument(f"invalid registry host {self.registry!r} (HOST[:PORT], with a dot or a port, "
                                  "or localhost)")
        if not is_repository(self.repository):
            raise InvalidArgument(f"invalid repository name {self.repository!r} in {self}")
        if self.tag is not None and not _TAG_RE.match(self.tag):
            raise InvalidArgument(f"invalid tag {self.tag!r} in {self}")
        if self.digest is not None and not _DIGEST_RE.match(self.digest):
            raise InvalidArgument(f"invalid digest {self.digest!r} in {self} (sha256:<64 hex digits>)")

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{tag}{digest}"


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
