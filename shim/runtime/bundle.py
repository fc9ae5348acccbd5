"""What the proxy told the shim about a restore, read from the OCI bundle (pure-ish)."""

from __future__ import annotations

import json
from pathlib import Path

from shim.handoff import RESTORE_DIR, RestorePlan


def restore_plan(bundle: Path) -> RestorePlan | None:
    """The plan if the bundle's spec marks a restore, else None."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = spec.get("annotations", {}).get(RESTORE_DIR)
    if not value:
        return None
    path = Path(value)
    return RestorePlan(path) if path.is_absolute() else None
