#!/usr/bin/env bash
# Generate criu-shim's Python API modules into shim/api/ (gitignored, except __init__.py).
#
#   scripts/gen-protos.sh           idempotent: skips when inputs and generator are unchanged
#   scripts/gen-protos.sh --force   regenerate
#
# Inputs: vendor-protos/src/ (scripts/fetch-protos.sh) and our own proto/*.proto.
# The protos are copied into a staging tree under build/protos/ at their shim/api/... path,
# with their imports rewritten to match, so protoc emits `from shim.api.containerd... import`
# and every generated module resolves inside the shim.api package:
#
#   k8s.io/cri-api/pkg/apis/runtime/v1/               -> shim/api/cri/v1/
#   github.com/containerd/containerd/third_party/k8s.io/cri-api/pkg/apis/runtime/v1alpha2/
#                                                     -> shim/api/cri/v1alpha2/
#   github.com/gogo/protobuf/gogoproto/               -> shim/api/gogoproto/
#   github.com/containerd/cgroups/ (cgroup1|cgroup2/stats/metrics.proto: a task's Stats)
#                                                     -> shim/api/cgroups/
#   github.com/containerd/containerd/api/             -> shim/api/containerd/
#   github.com/containerd/containerd/ (runc options, runtime/v1 shim, runctypes, pkg/...)
#                                                     -> shim/api/containerd/
#   proto/NAME.proto (ours)                           -> shim/api/own/NAME.proto
#
# google/protobuf/* come with grpcio-tools; google/rpc/status.proto (containerd's
# introspection service) with googleapis-common-protos, which also provides google.rpc at run time.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
VPY=$ROOT/.venv/bin/python
[[ -x $VPY ]] || { echo "ERROR: $VPY missing: run scripts/setup-venv.sh first" >&2; exit 1; }
[[ -d $ROOT/vendor-protos/src ]] || { echo "ERROR: vendor-protos/src missing: run scripts/fetch-protos.sh first" >&2; exit 1; }

exec "$VPY" - "$ROOT" "$@" <<'PYEOF'
import hashlib
import importlib.metadata as md
import re
import shutil
import sys
from pathlib import Path

root = Path(sys.argv[1])
force = "--force" in sys.argv[2:]
vendor = root / "vendor-protos" / "src"
own = root / "proto"
api = root / "shim" / "api"
build = root / "build" / "protos"
stamp = api / ".gen-stamp"

# (upstream prefix, staging prefix): first match wins, so longer prefixes come first
RULES = [
    ("k8s.io/cri-api/pkg/apis/runtime/v1/", "shim/api/cri/v1/"),
    ("github.com/containerd/containerd/third_party/k8s.io/cri-api/pkg/apis/runtime/v1alpha2/",
     "shim/api/cri/v1alpha2/"),
    ("github.com/gogo/protobuf/gogoproto/", "shim/api/gogoproto/"),
    ("github.com/containerd/cgroups/", "shim/api/cgroups/"),
    ("github.com/containerd/containerd/api/", "shim/api/containerd/"),
    ("github.com/containerd/containerd/", "shim/api/containerd/"),
]
OWN_PREFIX = "shim/api/own/"
IMPORT_RE = re.compile(r'^(\s*import\s+(?:public\s+|weak\s+)?")([^"]+)(";)', re.M)


def log(what: str, msg: str) -> None:
    print(f"{what:<16} {msg}", flush=True)


def die(msg: str) -> None:
    print(f"ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def map_vendor(rel: str) -> str | None:
    for src, dst in RULES:
        if rel.startswith(src):
            return dst + rel[len(src):]
    return None


inputs: dict[str, tuple[Path, str]] = {}  # staged path -> (source file, upstream path)
for p in sorted(vendor.rglob("*.proto")):
    rel = p.relative_to(vendor).as_posix()
    staged = map_vendor(rel)
    if staged is None:
        die(f"no mapping rule for vendor proto {rel} (add one to RULES in scripts/gen-protos.sh)")
    if staged in inputs:
        die(f"{rel} and {inputs[staged][1]} both map to {staged}")
    inputs[staged] = (p, rel)
own_names = set()
for p in sorted(own.glob("*.proto")) if own.is_dir() else []:
    own_names.add(p.name)
    inputs[OWN_PREFIX + p.name] = (p, f"proto/{p.name}")

import grpc_tools  # noqa: E402
from grpc_tools import protoc  # noqa: E402

grpc_include = Path(grpc_tools.__file__).parent / "_proto"
try:
    import google.rpc.status_pb2 as _status  # googleapis-common-protos

    googleapis_include = Path(_status.__file__).parents[2]
except ImportError:
    googleapis_include = None

# Everything that changes the output goes into the stamp.
h = hashlib.sha256()
h.update(Path(root / "scripts" / "gen-protos.sh").read_bytes())
for k in ("grpcio-tools", "protobuf", "googleapis-common-protos"):
    try:
        h.update(f"{k}={md.version(k)}".encode())
    except md.PackageNotFoundError:
        pass
for staged, (p, _) in sorted(inputs.items()):
    h.update(staged.encode() + b"\0" + p.read_bytes())
digest = h.hexdigest()
if not force and stamp.is_file() and stamp.read_text().strip() == digest:
    n = sum(1 for _ in api.rglob("*_pb2.py"))
    log("protos", f"ok ({n} *_pb2 modules in shim/api, inputs unchanged)")
    sys.exit(0)


def rewrite_import(imp: str, who: str) -> str:
    if imp.startswith("google/"):
        return imp  # well-known types (grpc_tools) and google/rpc (googleapis-common-protos)
    mapped = map_vendor(imp)
    if mapped is not None:
        if mapped not in inputs:
            die(f"{who} imports {imp} -> {mapped}, which is not among the fetched protos")
        return mapped
    if imp in inputs:  # already written as a shim/api/... path
        return imp
    if imp in own_names:
        return OWN_PREFIX + imp
    die(f"{who}: cannot resolve import {imp!r}")
    return imp


staging = build / "staging"
out = build / "out"
shutil.rmtree(build, ignore_errors=True)
for staged, (p, upstream) in inputs.items():
    text = p.read_text()
    text = IMPORT_RE.sub(lambda m: m.group(1) + rewrite_import(m.group(2), upstream) + m.group(3), text)
    dst = staging / staged
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
out.mkdir(parents=True)

args = ["grpc_tools.protoc", f"-I{staging}", f"-I{grpc_include}"]
if googleapis_include is not None:
    args.append(f"-I{googleapis_include}")
args += [f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
args += sorted(inputs)
rc = protoc.main(args)
if rc != 0:
    die(f"protoc failed ({rc}); staging tree kept in {staging}")

# Replace the generated part of shim/api (keep the committed shim/api/__init__.py).
gen_root = out / "shim" / "api"
for child in api.iterdir():
    if child.name in ("__init__.py",):
        continue
    if child.is_dir():
        shutil.rmtree(child)
    else:
        child.unlink()
for item in gen_root.iterdir():
    if item.name == "__init__.py":
        continue
    dst = api / item.name
    if item.is_dir():
        shutil.copytree(item, dst)
    else:
        shutil.copy2(item, dst)
for d in [api, *[p for p in api.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
    init = d / "__init__.py"
    if not init.exists():
        init.write_text("# generated by scripts/gen-protos.sh\n")

# Every generated module must import cleanly, warnings (e.g. gencode/runtime) being errors.
import subprocess  # noqa: E402

mods = sorted(
    ".".join(p.relative_to(root).with_suffix("").parts)
    for p in api.rglob("*_pb2*.py")
)
check = subprocess.run(
    [sys.executable, "-W", "error", "-c",
     "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)", *mods],
    cwd=root, capture_output=True, text=True,
)
if check.returncode != 0:
    die(f"generated modules do not import cleanly:\n{check.stderr[-3000:]}")

n = sum(1 for _ in api.rglob("*_pb2.py"))
stamp.write_text(digest + "\n")
log("protos", f"generated {n} *_pb2 modules (+ _pb2_grpc, .pyi) into shim/api"
    + (f" incl. {len(own_names)} own" if own_names else ""))
PYEOF
