"""`criu-shim gc`: one retention pass from the command line, saying what goes and why."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from shim.config import load
from shim.retention.collector import collect_once


def run(config_file: Path | None, dry_run: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config = load(config_file)
    settings = config.retention
    if not settings.enabled:
        print("retention: no limits configured (set ttl, max_per_container, max_per_pod or node_quota_bytes "
              "under [retention]); nothing to collect", file=out)
        return 0
    actions = collect_once(settings, config.audit_log, dry_run=dry_run)
    for action in actions:
        decision = action.decision
        print(f"{action.done}\t{decision.archive.path}\t{decision.reason}: {decision.detail}", file=out)
    if not actions:
        print(f"retention: nothing to collect in {', '.join(str(d) for d in settings.dirs)}", file=out)
    return 1 if any(a.done.startswith("error") for a in actions) else 0
