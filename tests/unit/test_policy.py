"""shim.policy: who may restore and who may be checkpointed, fed sane and garbage facts and config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shim.config import parse
from shim.errors import Code, InvalidArgument, PermissionDenied
from shim.policy import (
    EXCLUDE_ANNOTATION,
    AdmissionSettings,
    PodFacts,
    admit_archive,
    admit_checkpoint,
    admit_origin,
    admit_registry,
    admit_restore_into,
    origin_namespace,
    parse_section,
    require_restore_enabled,
)

IMAGE = "/var/lib/kubelet/checkpoints/c.tar"


def pod(namespace: str = "shop", handler: str = "", **annotations: str) -> PodFacts:
    return PodFacts(namespace, "web-0", handler, annotations)


def refusal(call: Any, *args: Any) -> str:
    with pytest.raises(PermissionDenied) as caught:
        call(*args)
    assert caught.value.code is Code.PERMISSION_DENIED
    return caught.value.message


# ------------------------------------------------------------------ defaults


def test_defaults_admit_any_pod_and_exclude_none() -> None:
    settings = parse({}).admission
    assert settings == AdmissionSettings()
    for facts in (pod(), pod("kube-system", "kata"), pod("", ""), pod("x" * 10_000, "\x00")):
        admit_restore_into(settings, facts, IMAGE)
        admit_checkpoint(settings, facts, "c1")


def test_restore_stays_off_until_enabled_and_says_which_switch() -> None:
    message = refusal(require_restore_enabled, False, IMAGE)
    assert "refused by rule restore.enabled" in message and "enabled = true" in message
    require_restore_enabled(True, IMAGE)


# ------------------------------------------------------------------ restore: namespace and handler


def test_restore_namespaces_are_shell_patterns() -> None:
    settings = AdmissionSettings(restore_namespaces=("team-*", "batch"))
    admit_restore_into(settings, pod("team-a"), IMAGE)
    admit_restore_into(settings, pod("batch"), IMAGE)
    message = refusal(admit_restore_into, settings, pod("default"), IMAGE)
    assert message == (f"restore from checkpoint {IMAGE} into pod default/web-0 refused by rule "
                       "admission.restore_namespaces: namespace 'default' matches none of [\"team-*\", \"batch\"]")


@pytest.mark.parametrize("namespace", ["Team-a", "team", "batch2", " batch", "", "tea", "\u0000", "b\u0430tch"])
def test_namespaces_that_only_look_allowed_are_refused(namespace: str) -> None:
    settings = AdmissionSettings(restore_namespaces=("team-*", "batch"))
    assert "admission.restore_namespaces" in refusal(admit_restore_into, settings, pod(namespace), IMAGE)


def test_a_pattern_in_the_namespace_is_data_not_a_pattern() -> None:
    settings = AdmissionSettings(restore_namespaces=("team-a",))
    for hostile in ("*", "team-?", "[t]eam-a"):
        assert "admission.restore_namespaces" in refusal(admit_restore_into, settings, pod(hostile), IMAGE)


def test_restore_runtime_handlers_with_the_empty_handler() -> None:
    settings = AdmissionSettings(restore_runtime_handlers=("", "criu"))
    admit_restore_into(settings, pod(handler=""), IMAGE)  # no RuntimeClass: containerd's default handler
    admit_restore_into(settings, pod(handler="criu"), IMAGE)
    message = refusal(admit_restore_into, settings, pod(handler="kata"), IMAGE)
    assert "refused by rule admission.restore_runtime_handlers" in message
    assert "runtime handler 'kata' matches none of [\"\", \"criu\"]" in message


def test_namespace_rule_is_named_before_the_handler_rule() -> None:
    settings = AdmissionSettings(restore_namespaces=("a",), restore_runtime_handlers=("b",))
    assert "admission.restore_namespaces" in refusal(admit_restore_into, settings, pod("x", "y"), IMAGE)


def test_an_empty_allow_list_refuses_every_pod() -> None:
    settings = AdmissionSettings(restore_namespaces=())
    assert "matches none of []" in refusal(admit_restore_into, settings, pod(), IMAGE)


# ------------------------------------------------------------------ restore: source


def test_archive_outside_the_allowed_dirs_names_the_rule(tmp_path: Path) -> None:
    allowed = [tmp_path / "ckpt"]
    inside = tmp_path / "ckpt" / "a.tar"
    assert admit_archive(inside, inside, True, allowed) == inside
    for real, is_file in ((tmp_path / "other" / "a.tar", True), (tmp_path / "ckpt", False),
                          (tmp_path / "ckptx" / "a.tar", True), (inside, False)):
        message = refusal(admit_archive, inside, real, is_file, allowed)
        assert "refused by rule restore.allowed_dirs" in message and str(tmp_path / "ckpt") in message


def test_registry_rule() -> None:
    admit_registry("localhost/app:ckpt", ["localhost"])
    message = refusal(admit_registry, "evil.example/app:ckpt", ["localhost"])
    assert "refused by rule restore.allowed_registries: registry 'evil.example'" in message
    assert "registry 'docker.io'" in refusal(admit_registry, "app", ["localhost"])  # implicit registry
    assert "registry 'docker.io'" in refusal(admit_registry, "", [])


# ------------------------------------------------------------------ checkpoint


def test_excluded_namespaces_are_never_checkpointed() -> None:
    settings = AdmissionSettings(checkpoint_excluded_namespaces=("vault", "secrets-*"))
    admit_checkpoint(settings, pod("shop"), "c1")
    for namespace in ("vault", "secrets-prod"):
        message = refusal(admit_checkpoint, settings, pod(namespace), "c1")
        assert message.startswith(f"checkpoint of container c1 in pod {namespace}/web-0 refused by rule "
                                  "admission.checkpoint_excluded_namespaces")


@pytest.mark.parametrize("value, refused", [
    ("true", True), ("false", False), ("TRUE", True), ("yes", True), ("", True), ("1", True), (" true", True),
    ("\x00", True), ("x" * 100_000, True),
])
def test_the_pod_opt_out_annotation_fails_closed(value: str, refused: bool) -> None:
    facts = pod(**{EXCLUDE_ANNOTATION: value})
    if not refused:
        admit_checkpoint(AdmissionSettings(), facts, "c1")
        return
    message = refusal(admit_checkpoint, AdmissionSettings(), facts, "c1")
    assert f"refused by the pod annotation {EXCLUDE_ANNOTATION}" in message
    assert len(message) < 400 or value == "x" * 100_000


def test_per_container_or_lookalike_keys_do_not_opt_out() -> None:
    for key in ("web.checkpoint.criu-shim.io/exclude", "checkpoint.criu-shim.io/Exclude", "exclude"):
        admit_checkpoint(AdmissionSettings(), pod(**{key: "true"}), "c1")


# ------------------------------------------------------------------ config


def test_admission_section_is_parsed() -> None:
    settings = parse({"admission": {"restore_namespaces": ["team-*"], "restore_runtime_handlers": ["", "criu"],
                                    "checkpoint_excluded_namespaces": ["vault"]}}).admission
    assert settings == AdmissionSettings(("team-*",), ("", "criu"), ("vault",))
    assert parse({"admission": {}}).admission == AdmissionSettings()


@pytest.mark.parametrize("section, text", [
    ([], "[admission] must be a table"),
    ("x", "[admission] must be a table"),
    ({"restore_namespace": ["a"]}, "unknown keys in [admission]: restore_namespace"),
    ({"restore_namespaces": "team-a"}, "admission.restore_namespaces must be a list of names or shell patterns"),
    ({"restore_namespaces": [""]}, "admission.restore_namespaces must be a list"),
    ({"restore_namespaces": [1]}, "admission.restore_namespaces must be a list"),
    ({"restore_namespaces": [None]}, "admission.restore_namespaces must be a list"),
    ({"restore_namespaces": ["a\nb"]}, "admission.restore_namespaces must be a list"),
    ({"restore_runtime_handlers": [True]}, "admission.restore_runtime_handlers must be a list"),
    ({"restore_runtime_handlers": {"a": 1}}, "admission.restore_runtime_handlers must be a list"),
    ({"checkpoint_excluded_namespaces": [[]]}, "admission.checkpoint_excluded_namespaces must be a list"),
    ({"checkpoint_excluded_namespaces": True}, "admission.checkpoint_excluded_namespaces must be a list"),
])
def test_bad_admission_config_is_refused_naming_the_key(section: Any, text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse({"admission": section}, "/etc/criu-shim/config.toml")
    assert caught.value.message.startswith("/etc/criu-shim/config.toml: ")
    assert text in caught.value.message
    with pytest.raises(InvalidArgument):
        parse_section(section, "x")


def test_the_empty_handler_is_allowed_only_where_it_means_something() -> None:
    assert parse_section({"restore_runtime_handlers": [""]}, "x").restore_runtime_handlers == ("",)
    with pytest.raises(InvalidArgument):
        parse_section({"checkpoint_excluded_namespaces": [""]}, "x")


# ------------------------------------------------------------------ restore: the checkpoint's own namespace


def spec_from(namespace: object) -> dict[str, object]:
    return {"annotations": {"io.kubernetes.cri.sandbox-namespace": namespace}}


def test_a_checkpoint_goes_back_into_its_own_namespace_only() -> None:
    settings = AdmissionSettings()
    admit_origin(settings, pod("shop"), "shop", IMAGE)
    message = refusal(admit_origin, settings, pod("other"), "shop", IMAGE)
    assert message == (f"restore from checkpoint {IMAGE} into pod other/web-0 refused by rule "
                       "admission.restore_from_other_namespaces: the checkpoint was taken in namespace 'shop', "
                       "not 'other' (set restore_from_other_namespaces = true in [admission] to allow)")
    admit_origin(AdmissionSettings(restore_from_other_namespaces=True), pod("other"), "shop", IMAGE)
    admit_origin(settings, pod("other"), None, IMAGE)  # an archive that does not say (CRI-O's, Podman's)


@pytest.mark.parametrize("spec, origin", [
    (spec_from("shop"), "shop"), (spec_from(""), None), (spec_from(7), None), (spec_from(None), None),
    ({"annotations": "x"}, None), ({"annotations": None}, None), ({}, None), ({"annotations": {}}, None),
    ([], None), ("spec", None), (None, None),
])
def test_origin_namespace_from_hostile_specs(spec: Any, origin: str | None) -> None:
    assert origin_namespace(spec) == origin


def test_restore_from_other_namespaces_must_be_a_boolean() -> None:
    assert parse({"admission": {"restore_from_other_namespaces": True}}).admission.restore_from_other_namespaces
    assert parse({}).admission.restore_from_other_namespaces is False
    for bad in ("true", 1, [], None):
        with pytest.raises(InvalidArgument, match="admission.restore_from_other_namespaces must be true or false"):
            parse({"admission": {"restore_from_other_namespaces": bad}})
