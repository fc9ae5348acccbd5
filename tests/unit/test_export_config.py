"""[export] of the proxy's config: off by default, a registry host and a repository path, garbage refused."""

from __future__ import annotations

import re

import pytest

from shim.config import ExportSettings, parse
from shim.errors import InvalidArgument


def test_off_by_default_and_read_when_set() -> None:
    assert parse({}).export == ExportSettings(None, "criu-shim/checkpoints")
    got = parse({"export": {"registry": "registry.example:5000", "repository": "team/ckpt"}}).export
    assert got == ExportSettings("registry.example:5000", "team/ckpt")


@pytest.mark.parametrize(("section", "text"), [
    ("not a table", "[export] must be a table"),
    ({"registri": "x"}, "unknown keys in [export]: registri"),
    ({"registry": ""}, "export.registry must be a registry host"),
    ({"registry": "host/repo"}, "export.registry must be a registry host"),
    ({"registry": 5000}, "export.registry must be a registry host"),
    ({"registry": "bad host!"}, "export.registry must be a registry host (HOST[:PORT], with a dot or a port, or "
     "localhost), got 'bad host!'"),
    ({"registry": "registry"}, "got 'registry'"),  # no dot, no port: docker would read it as a repository
    ({"registry": "r.example:port"}, "got 'r.example:port'"),
    ({"registry": "r.example", "repository": "Upper/Case"}, "export.repository must be a repository path"),
    ({"registry": "r.example", "repository": "a//b"}, "export.repository must be a repository path"),
])
def test_garbage_is_refused(section: object, text: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(text)):
        parse({"export": section})
