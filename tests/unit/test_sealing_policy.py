"""Which checkpoints are sealed: node default, pod and container annotations, opt-out policy; config."""

from __future__ import annotations

import pytest

from shim.checkpoint.sealing import wanted
from shim.config import EncryptionSettings, parse
from shim.errors import FailedPrecondition, InvalidArgument, PermissionDenied

ON = EncryptionSettings(enabled=True, key_id="k1", opt_out_namespaces=("dev-*",))
KEYED_OFF = EncryptionSettings(enabled=False, key_id="k1")
ANNOTATION = "checkpoint.criu-shim.io/encrypt"


def decide(settings: EncryptionSettings, annotations: dict[str, str], namespace: str = "default") -> bool:
    return wanted(settings, annotations, "app", namespace, "web", "c1")


def test_node_default_and_opt_in() -> None:
    assert decide(ON, {}) and not decide(EncryptionSettings(), {}) and not decide(KEYED_OFF, {})
    assert decide(KEYED_OFF, {ANNOTATION: "true"})
    assert decide(KEYED_OFF, {f"app.{ANNOTATION}": "true"})
    assert not decide(KEYED_OFF, {ANNOTATION: "true", f"app.{ANNOTATION}": "false"})


def test_opt_out_only_where_allowed() -> None:
    assert not decide(ON, {ANNOTATION: "false"}, namespace="dev-team")
    with pytest.raises(PermissionDenied, match="refused by rule encryption.opt_out_namespaces.*'default'"):
        decide(ON, {ANNOTATION: "false"})
    with pytest.raises(PermissionDenied):
        decide(ON, {f"app.{ANNOTATION}": "false"})


def test_opt_in_without_a_key_and_bad_values() -> None:
    with pytest.raises(FailedPrecondition, match="no encryption key"):
        decide(EncryptionSettings(), {ANNOTATION: "true"})
    with pytest.raises(InvalidArgument, match='expected "true" or "false"'):
        decide(ON, {ANNOTATION: "yes"})


def test_config_section() -> None:
    config = parse({"encryption": {"enabled": True, "key_id": "k1", "key_file": "/etc/k1",
                                   "keys": {"k0": "/etc/k0"}, "key_command": ["/bin/kms", "--x"],
                                   "opt_out_namespaces": ["dev-*"]}})
    enc = config.encryption
    assert enc.enabled and enc.key_command == ("/bin/kms", "--x") and enc.opt_out_namespaces == ("dev-*",)
    assert {k: str(v) for k, v in enc.key_files.items()} == {"k0": "/etc/k0", "k1": "/etc/k1"}
    assert parse({}).encryption == EncryptionSettings()
    for bad, match in (({"enabled": True, "key_id": "k1"}, "needs encryption.key_file"),
                       ({"enabled": True, "key_file": "/k"}, "key_id must name"),
                       ({"key_id": "k", "key_file": "rel/k"}, "absolute"),
                       ({"key_id": "k", "key_command": "/bin/kms"}, "must be a list"),
                       ({"key_id": "k", "key_command": ["kms"]}, "absolute program"),
                       ({"enabled": "yes"}, "true or false"),
                       ({"key": "x"}, "unknown keys in \\[encryption\\]")):
        with pytest.raises(InvalidArgument, match=match):
            parse({"encryption": bad})
