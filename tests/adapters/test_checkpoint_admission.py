"""The checkpoint engine refuses pods the admission policy excludes, before touching the container."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from shim.checkpoint.checkpointer import Request
from shim.config import Config
from shim.errors import PermissionDenied
from shim.policy import EXCLUDE_ANNOTATION, AdmissionSettings
from tests.adapters import test_checkpointer as base
from tests.adapters.test_checkpointer import CONTAINER, PEER, FakeContainerd, audit_lines, checkpointer, run

new_kernel = base.new_kernel  # autouse there, so here too
fake = base.fake
config = base.config
out = base.out


@pytest.mark.parametrize("admission, annotations, rule", [
    (AdmissionSettings(checkpoint_excluded_namespaces=("sh*",)), {}, "rule admission.checkpoint_excluded_namespaces"),
    (AdmissionSettings(), {EXCLUDE_ANNOTATION: "true"}, f"the pod annotation {EXCLUDE_ANNOTATION}"),
    (AdmissionSettings(), {EXCLUDE_ANNOTATION: "maybe"}, f"the pod annotation {EXCLUDE_ANNOTATION}"),
])
def test_excluded_pod_is_refused_before_anything_happens(fake: FakeContainerd, config: Config, out: Path,
                                                         admission: AdmissionSettings, annotations: dict[str, str],
                                                         rule: str) -> None:
    fake.annotations = annotations
    config = replace(config, admission=admission)
    with pytest.raises(PermissionDenied, match=f"refused by {rule}"):
        run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert fake.calls == []  # never paused, never dumped
    assert list(out.iterdir()) == []
    (line,) = audit_lines(config)
    assert line["result"].startswith("error: PERMISSION_DENIED: checkpoint of container")
    assert rule in line["result"]


def test_opt_out_false_and_other_namespaces_are_checkpointed(fake: FakeContainerd, config: Config, out: Path) -> None:
    fake.annotations = {EXCLUDE_ANNOTATION: "false"}
    config = replace(config, admission=AdmissionSettings(checkpoint_excluded_namespaces=("vault",)))
    run(checkpointer(fake, config).checkpoint(Request(CONTAINER, str(out / "cp.tar"), PEER)))
    assert (out / "cp.tar").exists()
