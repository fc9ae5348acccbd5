"""Where `make setup` installed the host tools: scripts/paths.env, read as KEY=VALUE lines.

The file is the contract between the setup scripts (shell) and Python. It exists in a
checkout; a packaged install has none, and its readers then fall back to $PATH (see
shim.preflight). `CRIU_SHIM_PATHS` names another file. Product code reads it here, never
through the development node (shim.node).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

# In a checkout: <repo>/scripts/paths.env, next to the shim package.
DEFAULT = Path(__file__).resolve().parents[1] / "scripts" / "paths.env"
OVERRIDE_ENV = "CRIU_SHIM_PATHS"


@cache
def load_paths() -> dict[str, str]:
    """The KEY=VALUE pairs (shell quoting stripped); OSError when the file is missing."""
    path = Path(os.environ.get(OVERRIDE_ENV, DEFAULT))
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values
