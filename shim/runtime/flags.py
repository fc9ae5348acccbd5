"""The command line containerd gives a runtime v2 shim (Go `flag` syntax, single dash)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_VALUED = {"namespace", "address", "publish-binary", "id", "bundle", "socket"}
_BOOLEAN = {"debug", "v"}


@dataclass(frozen=True)
class ShimArgs:
    namespace: str
    address: str
    id: str
    bundle: str
    action: str
    argv: tuple[str, ...]  # as given, to hand on to the runc shim unchanged


def parse(argv: Sequence[str]) -> ShimArgs:
    values: dict[str, str] = {}
    positional: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        word = items[i]
        name = word.lstrip("-")
        if word.startswith("-") and "=" in name:
            key, _, value = name.partition("=")
            values[key] = value
        elif word.startswith("-") and name in _VALUED and i + 1 < len(items):
            values[name] = items[i + 1]
            i += 1
        elif word.startswith("-") and name in _BOOLEAN:
            values[name] = "true"
        else:
            positional.append(word)
        i += 1
    return ShimArgs(values.get("namespace", ""), values.get("address", ""), values.get("id", ""),
                    values.get("bundle", ""), positional[-1] if positional else "", tuple(argv))
