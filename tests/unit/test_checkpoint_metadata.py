"""The JSON side files, compared byte for byte with what Go's encoding/json writes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.descriptor import FieldDescriptor

from shim.api.cri.v1 import api_pb2
from shim.checkpoint.metadata import (
    ZERO_TIME,
    config_dump,
    go_json,
    go_time,
    rfc3339nano,
    spec_dump,
    status_dump,
)

CREATED_NS = 1_700_000_000_123_456_789
FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (CREATED_NS, "2023-11-14T22:13:20.123456789Z"),
        (1_500_000_000, "1970-01-01T00:00:01.5Z"),  # trailing zeros trimmed, as RFC3339Nano does
        (1_000_000_010, "1970-01-01T00:00:01.00000001Z"),
        (-1, "1969-12-31T23:59:59.999999999Z"),
        (-62_135_596_800_000_000_000, ZERO_TIME),
    ],
)
def test_rfc3339nano(ns: int, text: str) -> None:
    assert rfc3339nano(ns) == text


def test_rfc3339nano_out_of_range() -> None:
    with pytest.raises(ValueError):
        rfc3339nano(10**30)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC), "2025-03-04T05:06:07Z"),
        (datetime(2025, 3, 4, 5, 6, 7, 120000, tzinfo=timezone(timedelta(hours=2))),
         "2025-03-04T05:06:07.12+02:00"),
        (datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
         "2025-03-04T05:06:07-09:30"),
        (datetime(2025, 3, 4, tzinfo=timezone(timedelta(0), "GMT")), "2025-03-04T00:00:00Z"),
    ],
)
def test_go_time_of_datetimes(moment: datetime, text: str) -> None:
    assert go_time(moment) == text


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        go_time(datetime(2025, 1, 1))


def test_config_dump_matches_containerd() -> None:
    data = config_dump(
        "c0ffee", "web", "docker.io/library/nginx:1.27", "docker.io/library/nginx@sha256:ab",
        "io.containerd.runc.v2", CREATED_NS, datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
    )
    assert data == (
        b'{"id":"c0ffee","name":"web",'
        b'"rootfsImage":"docker.io/library/nginx:1.27",'
        b'"rootfsImageRef":"docker.io/library/nginx@sha256:ab",'
        b'"rootfsImageName":"docker.io/library/nginx:1.27",'
        b'"runtime":"io.containerd.runc.v2",'
        b'"createdTime":"2023-11-14T22:13:20.123456789Z",'
        b'"checkpointedTime":"2025-01-02T03:04:05.6Z",'
        b'"restoredTime":"0001-01-01T00:00:00Z","restored":false}'
    )


def test_config_dump_omits_empty_optional_strings() -> None:
    data = json.loads(config_dump("i", "n", "", "", "", 0, 0))
    assert list(data) == ["id", "name", "createdTime", "checkpointedTime", "restoredTime", "restored"]


def full_status() -> api_pb2.ContainerStatus:
    status = api_pb2.ContainerStatus(
        id="c0ffee",
        state=api_pb2.CONTAINER_RUNNING,
        created_at=CREATED_NS,
        started_at=2**62 + 1,  # beyond float precision: must stay an exact JSON number
        image_ref="docker.io/library/nginx@sha256:ab",
        log_path="/var/log/pods/x/web/0.log",
        labels={"b": "2", "a": "1"},
        annotations={"html": "<a&b>", "empty": ""},
    )
    status.metadata.name = "web"  # attempt 0: omitted
    status.image.image = "docker.io/library/nginx:1.27"
    mount = status.mounts.add(container_path="/data", host_path="/srv", readonly=True,
                              propagation=api_pb2.PROPAGATION_BIDIRECTIONAL)
    mount.uidMappings.add(host_id=100000, container_id=0, length=65536)
    status.resources.linux.memory_limit_in_bytes = 2**40
    status.resources.linux.hugepage_limits.add(page_size="2MB", limit=2**64 - 1)
    status.user.linux.SetInParent()  # present but empty: a non-nil Go pointer, written as {}
    return status


def test_status_dump_matches_go_encoding_json() -> None:
    assert status_dump(full_status()) == (
        b'{"id":"c0ffee","metadata":{"name":"web"},"state":1,'
        b'"created_at":1700000000123456789,"started_at":4611686018427387905,'
        b'"image":{"image":"docker.io/library/nginx:1.27"},'
        b'"image_ref":"docker.io/library/nginx@sha256:ab",'
        b'"labels":{"a":"1","b":"2"},'
        b'"annotations":{"empty":"","html":"\\u003ca\\u0026b\\u003e"},'
        b'"mounts":[{"container_path":"/data","host_path":"/srv","readonly":true,"propagation":2,'
        b'"uidMappings":[{"host_id":100000,"length":65536}]}],'
        b'"log_path":"/var/log/pods/x/web/0.log",'
        b'"resources":{"linux":{"memory_limit_in_bytes":1099511627776,'
        b'"hugepage_limits":[{"page_size":"2MB","limit":18446744073709551615}]}},'
        b'"user":{"linux":{}}}'
    )


def test_status_dump_of_an_empty_status() -> None:
    assert status_dump(api_pb2.ContainerStatus()) == b"{}"


def test_status_dump_numbers_are_numbers() -> None:
    decoded = json.loads(status_dump(full_status()))
    assert decoded["started_at"] == 2**62 + 1
    assert decoded["state"] == 1


def test_status_fields_are_all_supported() -> None:
    """Regenerated CRI protos with a float or a real oneof would need converter work."""
    seen: set[str] = set()
    pending = [api_pb2.ContainerStatus.DESCRIPTOR]
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            assert field.type not in FLOATS, field.full_name
            assert field.containing_oneof is None, field.full_name
            if field.message_type is not None:
                pending.append(field.message_type)


def test_go_json_escapes_like_go() -> None:
    text = "<>&\u2028\u2029\n\t\x01\x7f\"\\é"
    expected = '"\\u003c\\u003e\\u0026\\u2028\\u2029\\n\\t\\u0001\x7f\\"\\\\é"'
    assert go_json(text) == expected.encode()


def test_spec_dump_returns_the_spec_unchanged() -> None:
    spec = b'{\n  "ociVersion": "1.2.0",\n  "process": {"args": ["sh"]}\n}\n'
    assert spec_dump(spec) is spec


@pytest.mark.parametrize(
    "spec",
    [b"", b"not json", b"[]", b"{}", b'{"ociVersion": 1}', b'{"ociVersion":"1.0","x":NaN}',
     b'{"ociVersion":"\xff"}', b'\xef\xbb\xbf{"ociVersion":"1.0"}'],
)
def test_spec_dump_refuses_non_specs(spec: bytes) -> None:
    with pytest.raises(ValueError):
        spec_dump(spec)
