"""Merge criu-shim's runtime handler `criu` into an operator's containerd config (pure: text in, text out).

tomlkit keeps every byte it does not have to change: comments, order, quoting,
the operator's mirrors, runtimes and options. What changes:

    [<cri>.containerd]                default_runtime_name = "criu" (unless keep_default)
    [<cri>.containerd.runtimes.criu]  runtime_type = "io.containerd.runc.v2", runtime_path = the launcher,
                                      container_annotations = what a restore needs in the OCI spec
    [<cri>.containerd.runtimes.criu.options]  a copy of the default runc runtime's options, so
                                      SystemdCgroup and BinaryName stay what the operator chose

where <cri> is `plugins."io.containerd.grpc.v1.cri"` in config version 2
(containerd 1.6/1.7) and `plugins."io.containerd.cri.v1.runtime"` in versions 3
and 4 (2.x). Anything criu-shim cannot merge safely is refused with the file and
line: unparseable TOML, version 1 (or none), an unknown version, a `criu`
runtime that is not criu-shim's, a default runtime that is not runc.
"""

from __future__ import annotations

import re
from typing import Any

import tomlkit
from tomlkit.exceptions import ParseError, TOMLKitError
from tomlkit.items import Table

from shim.errors import InvalidArgument
from shim.handoff import RESTORE_ANNOTATIONS  # what containerd copies into a restored container's spec

HANDLER = "criu"
RUNC_TYPE = "io.containerd.runc.v2"
VERSION_LINE = r"^\s*version\s*="
CRI_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime", 4: "io.containerd.cri.v1.runtime"}


def version_for(containerd_version: str) -> int:
    """The config version a containerd release writes (`containerd --version`'s "1.7.24", "v2.4.2")."""
    major = containerd_version.lstrip("v").split(".", 1)[0]
    if major == "1":
        return 2
    if major == "2":
        return 3
    raise InvalidArgument(f"containerd {containerd_version!r} is not one criu-shim knows (1.6 to 2.4)")


def merge(text: str, origin: str, launcher: str, keep_default: bool = False,
          empty_version: int | None = None) -> str:
    """`text` with the `criu` handler merged in. `empty_version`, the version the node's containerd
    writes, is used when the file says nothing (empty, or comments only: containerd then runs on its
    defaults); a file newer than that containerd reads is refused."""
    try:
        doc = tomlkit.parse(text)
    except ParseError as exc:
        raise InvalidArgument(f"{origin}:{exc.line}:{exc.col}: not valid TOML, criu-shim cannot merge it "
                              f"({_reason(exc)}); nothing was changed") from None
    except TOMLKitError as exc:  # e.g. a key defined twice
        raise InvalidArgument(f"{origin}: not valid TOML, criu-shim cannot merge it ({exc}); "
                              "nothing was changed") from None
    version = _version(doc, text, origin, empty_version)
    if empty_version == 2 and version > 2:  # containerd 1.x reads version 2 at most
        raise InvalidArgument(f"{origin}:{_line_of(text, VERSION_LINE)}: config version {version} is for "
                              "containerd 2.x, but this node's containerd is 1.x; nothing was changed")
    if "version" not in doc:
        doc.add("version", version)
    containerd = _table(doc, ("plugins", CRI_PLUGIN[version], "containerd"), text, origin)
    runtimes = _table(containerd, ("runtimes",), text, origin)
    options = _runc_options(containerd, runtimes, text, origin, keep_default)
    existing = runtimes.get(HANDLER)
    if existing is not None:
        _check_ours(existing, launcher, text, origin)
        del runtimes[HANDLER]
    runtimes.add(HANDLER, _handler(launcher, options))
    if not keep_default:
        containerd["default_runtime_name"] = HANDLER
    return tomlkit.dumps(doc)


def _reason(exc: ParseError) -> str:
    return re.sub(r" at line \d+ col \d+$", "", str(exc))


def _version(doc: Any, text: str, origin: str, empty_version: int | None) -> int:
    if "version" not in doc:
        if not doc.keys():
            if empty_version is not None:
                return empty_version
            raise InvalidArgument(f"{origin}: missing or empty, and no containerd binary was found to tell which "
                                  "config version to write (give --containerd-bin); nothing was changed")
        raise InvalidArgument(f"{origin}: no `version` key: a version 1 config (containerd 1.x before 1.5), which "
                              "criu-shim does not merge; migrate it first (`containerd config migrate`) and "
                              "run install again; nothing was changed")
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version not in CRI_PLUGIN:
        line = _line_of(text, VERSION_LINE)
        raise InvalidArgument(f"{origin}:{line}: config version {version!r} is not "
                              "one criu-shim merges (2 for containerd 1.6/1.7, 3 or 4 for 2.x); nothing was changed")
    return int(version)


def _table(parent: Any, path: tuple[str, ...], text: str, origin: str) -> Any:
    """The table at `path` under `parent`, created (as a header-less super table) where missing."""
    node = parent
    for key in path:
        if key not in node:
            node.add(key, tomlkit.table(is_super_table=True))
        node = node[key]
        if not isinstance(node, dict):
            raise InvalidArgument(f"{origin}:{_line_of(text, re.escape(key))}: `{key}` is a "
                                  f"{type(node).__name__}, not a table; nothing was changed")
    return node


def _runc_options(containerd: Any, runtimes: Any, text: str, origin: str, keep_default: bool) -> dict[str, Any]:
    """The options the operator gave runc: the default runtime's, else the runtime named `runc`'s."""
    default = str(containerd.get("default_runtime_name", "runc"))
    runtime = runtimes.get(default)
    if default != HANDLER and isinstance(runtime, dict) and runtime.get("runtime_type", RUNC_TYPE) != RUNC_TYPE \
            and not keep_default:
        raise InvalidArgument(
            f"{origin}:{_line_of(text, r'default_runtime_name')}: the default runtime {default!r} is of type "
            f"{runtime.get('runtime_type')!r}; criu-shim's handler wraps runc ({RUNC_TYPE}) and would change what "
            "every pod runs on. Use --keep-default-runtime (pods then need RuntimeClass handler \"criu\" to "
            "receive a restore); nothing was changed")
    for name in (default, "runc"):
        candidate = runtimes.get(name)
        if name != HANDLER and isinstance(candidate, dict) and candidate.get("runtime_type", RUNC_TYPE) == RUNC_TYPE:
            options = candidate.get("options", {})
            return dict(options.unwrap()) if hasattr(options, "unwrap") else dict(options)
    current = runtimes.get(HANDLER)
    if isinstance(current, dict) and isinstance(current.get("options"), dict):
        return dict(current["options"].unwrap())  # our own, from an earlier install
    return {}


def _check_ours(existing: Any, launcher: str, text: str, origin: str) -> None:
    ours = isinstance(existing, dict) and existing.get("runtime_type") == RUNC_TYPE \
        and existing.get("runtime_path") == launcher
    if not ours:
        line = _line_of(text, rf"runtimes\.{HANDLER}\]") or _line_of(text, rf"\b{HANDLER}\s*=")
        raise InvalidArgument(
            f"{origin}:{line}: a runtime named {HANDLER!r} is already configured and it is not criu-shim's "
            f"(runtime_path is not {launcher}); rename or remove it, then run install again; nothing was changed")


def _handler(launcher: str, options: dict[str, Any]) -> Table:
    handler = tomlkit.table()
    handler.add(tomlkit.comment("criu-shim's handler (criu-shim install): runc, with criu-shim's launcher in front "
                                "so restored containers come back through CRIU"))
    handler.add("runtime_type", RUNC_TYPE)
    handler.add("runtime_path", launcher)
    handler.add("container_annotations", list(RESTORE_ANNOTATIONS))
    table = tomlkit.table()
    for key, value in options.items():
        table.add(key, value)
    handler.add("options", table)
    return handler


def _line_of(text: str, pattern: str) -> int | str:
    """The first line matching `pattern` (1-based), for messages; "?" when none does."""
    for number, line in enumerate(text.splitlines(), 1):
        if re.search(pattern, line):
            return number
    return "?"
