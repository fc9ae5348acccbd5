"""The JSON side files of a checkpoint archive, byte for byte as Go would write them (pure).

Their readers are Go programs: checkpointctl (`config.dump`, `spec.dump`) and
containerd 2.x's restore, which json.Unmarshals `status.dump` into the
gogo-generated CRI `ContainerStatus`. So the encoding follows Go's
encoding/json, not protobuf's JSON mapping: snake_case proto field names,
`omitempty`, enums and 64-bit integers as plain numbers, and Go's escaping of
<, >, & and U+2028/9 (json.Marshal is HTML-safe by default).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

# No stubs for protobuf 7 in the venv; the second code keeps this quiet once there are.
from google.protobuf.descriptor import FieldDescriptor  # type: ignore[import-untyped, unused-ignore]
from google.protobuf.message import Message  # type: ignore[import-untyped, unused-ignore]

from shim.api.cri.v1 import api_pb2

# Go's zero time.Time, which is what an unset time marshals to.
ZERO_TIME = "0001-01-01T00:00:00Z"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)
# A time is a datetime (timezone-aware) or Unix nanoseconds, as CRI reports them.
Timestamp = datetime | int


def go_json(value: object) -> bytes:
    """Compact JSON as Go's json.Marshal writes it (for dicts, lists, str, int, bool)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # Only string contents can hold these characters, so translating the whole text is safe.
    return text.translate(_GO_ESCAPES).encode("utf-8")


def rfc3339nano(ns: int) -> str:
    """Unix nanoseconds as Go's time.RFC3339Nano in UTC ("...T10:00:00.5Z")."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    try:
        moment = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"time {ns}ns is outside years 1-9999") from None
    return _format(moment, nanos)


def go_time(value: Timestamp) -> str:
    if isinstance(value, int):
        return rfc3339nano(value)
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: a time zone is required")
    return _format(value, value.microsecond * 1000)


def _format(moment: datetime, nanos: int) -> str:
    # By hand, because strftime's %Y does not zero-pad years before 1000 on glibc.
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + _zone(moment)


def _zone(moment: datetime) -> str:
    offset = moment.utcoffset()
    minutes = int(offset.total_seconds()) // 60 if offset is not None else 0
    if minutes == 0:
        return "Z"  # Go writes "Z" for any zero offset, not "+00:00"
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def config_dump(
    container_id: str,
    name: str,
    image: str,
    image_ref: str,
    runtime: str,
    created: Timestamp,
    checkpointed: Timestamp,
) -> bytes:
    """checkpointctl's `ContainerConfig`, filled the way containerd 2.x fills it.

    `image` is the CRI status image (containerd puts it in both rootfsImage and
    rootfsImageName), `image_ref` its image_ref (a repo digest), `runtime` the
    containerd runtime name such as "io.containerd.runc.v2".
    """
    config: dict[str, object] = {"id": container_id, "name": name}
    optional = (
        ("rootfsImage", image),
        ("rootfsImageRef", image_ref),
        ("rootfsImageName", image),
        ("runtime", runtime),
    )
    config.update((key, value) for key, value in optional if value)  # omitempty
    config["createdTime"] = go_time(created)
    config["checkpointedTime"] = go_time(checkpointed)
    config["restoredTime"] = ZERO_TIME
    config["restored"] = False
    return go_json(config)


def spec_dump(spec_json: bytes) -> bytes:
    """The OCI runtime spec, unchanged, once it is known to be one (JSON object, ociVersion)."""
    try:
        spec = json.loads(spec_json.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"OCI spec is not UTF-8 JSON: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("ociVersion"), str):
        # ValueError, not TypeError: it is the content that is wrong, not the argument.
        raise ValueError("OCI spec is not a JSON object with a string ociVersion")  # noqa: TRY004
    return spec_json


def _reject_constant(name: str) -> object:
    raise ValueError(f"OCI spec contains {name}, which is not JSON")


def status_dump(status: api_pb2.ContainerStatus) -> bytes:
    """The CRI ContainerStatus as Go's json.Marshal writes the gogo-generated struct."""
    return go_json(go_message(status))


def go_message(message: Message) -> dict[str, object]:
    """Fields in declaration order (Go's struct order), each omitted when Go omits it."""
    out: dict[str, object] = {}
    for field in message.DESCRIPTOR.fields:
        value = _go_field(message, field)
        if value is not None:
            out[field.name] = value
    return out


def _go_field(message: Message, field: FieldDescriptor) -> object | None:
    """The field's JSON value, or None where `omitempty` drops it."""
    value = getattr(message, field.name)
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        keys = sorted(value, key=_go_map_key)  # Go sorts map keys by their string form
        return {_go_map_key(key): _go_value(value_field, value[key]) for key in keys} or None
    if field.is_repeated:
        return [_go_value(field, item) for item in value] or None
    oneof = field.containing_oneof
    if oneof is not None and not _is_synthetic(field):
        raise ValueError(f"{field.full_name}: oneofs (Go interfaces) are not supported")
    if field.has_presence:
        # A Go pointer: omitted when nil, written even when it points at a zero value.
        return _go_value(field, value) if message.HasField(field.name) else None
    return _go_value(field, value) if value else None


def _go_value(field: FieldDescriptor, value: object) -> object:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        return go_message(value)
    if kind == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        return base64.b64encode(value).decode("ascii")
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        # CRI has none; Go's float formatting differs from Python's, so refuse to guess.
        raise ValueError(f"{field.full_name}: floating-point fields are not supported")
    return value  # str, bool, and integers of every width (enums included) as numbers


def _is_map(field: FieldDescriptor) -> bool:
    message_type = field.message_type
    return bool(field.is_repeated and message_type is not None and message_type.GetOptions().map_entry)


def _is_synthetic(field: FieldDescriptor) -> bool:
    # protoc wraps each proto3 `optional` field in a one-field oneof named "_<field>".
    oneof = field.containing_oneof
    return len(oneof.fields) == 1 and oneof.name == "_" + field.name


def _go_map_key(key: object) -> str:
    # Proto map keys are strings, integers or bools; Go's encoding/json refuses bool keys.
    if isinstance(key, bool):
        raise ValueError(f"map key {key!r}: Go's encoding/json cannot encode bool map keys")  # noqa: TRY004
    return str(key)
