"""Whether a restore asks for lazy pages: the `restore.criu-shim.io/lazy-pages` annotation (pure)."""

from __future__ import annotations

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.errors import InvalidArgument
from shim.restore.create_request import LAZY_ANNOTATION, lazy_wanted


def request(pod: dict[str, str] | None = None, container: dict[str, str] | None = None) -> cri.CreateContainerRequest:
    made = cri.CreateContainerRequest(pod_sandbox_id="sandbox-1")
    made.config.metadata.name = "web"
    made.config.annotations.update(container or {})
    made.sandbox_config.annotations.update(pod or {})
    return made


def test_the_annotation_name() -> None:
    assert LAZY_ANNOTATION == "restore.criu-shim.io/lazy-pages"


def test_lazy_by_default() -> None:
    assert lazy_wanted(request()) is True


def test_other_annotations_do_not_matter() -> None:
    others = {"restore.criu-shim.io/lazy": "false", "web.restore.criu-shim.io/lazy-pages": "false",
              "checkpoint.criu-shim.io/tcp-established": "false"}
    assert lazy_wanted(request(pod=others, container=others)) is True


@pytest.mark.parametrize(("pod", "container", "wanted"), [
    ({LAZY_ANNOTATION: "false"}, {}, False),
    ({LAZY_ANNOTATION: "true"}, {}, True),
    ({}, {LAZY_ANNOTATION: "false"}, False),
    ({}, {LAZY_ANNOTATION: "true"}, True),
    ({LAZY_ANNOTATION: "true"}, {LAZY_ANNOTATION: "false"}, False),  # the container's wins
    ({LAZY_ANNOTATION: "false"}, {LAZY_ANNOTATION: "true"}, True),
])
def test_pod_and_container_annotations(pod: dict[str, str], container: dict[str, str], wanted: bool) -> None:
    assert lazy_wanted(request(pod=pod, container=container)) is wanted


@pytest.mark.parametrize("value", ["yes", "False", "TRUE", "1", "0", "", " true", "false\n"])
@pytest.mark.parametrize("where", ["pod", "container"])
def test_bad_value_is_invalid_argument_naming_annotation_and_value(where: str, value: str) -> None:
    annotations = {LAZY_ANNOTATION: value}
    bad = request(pod=annotations) if where == "pod" else request(container=annotations)
    with pytest.raises(InvalidArgument) as caught:
        lazy_wanted(bad)
    assert LAZY_ANNOTATION in caught.value.message
    assert repr(value) in caught.value.message
    assert '"true" or "false"' in caught.value.message


def test_bad_container_value_is_refused_even_when_the_pod_value_is_good() -> None:
    with pytest.raises(InvalidArgument, match="'maybe'"):
        lazy_wanted(request(pod={LAZY_ANNOTATION: "false"}, container={LAZY_ANNOTATION: "maybe"}))


def test_bad_pod_value_is_refused_even_when_the_container_sets_its_own() -> None:
    with pytest.raises(InvalidArgument) as caught:
        lazy_wanted(request(pod={LAZY_ANNOTATION: "maybe"}, container={LAZY_ANNOTATION: "true"}))
    assert "'maybe'" in caught.value.message
