#!/usr/bin/env bash
# Idempotent Python environment for criu-shim: .venv with the machine's python3 (>= 3.11),
# `pip install -e '.[dev]'`, and pycriu (not on PyPI) copied in from Debian's python3-pycriu.
#
#   scripts/setup-venv.sh          create/refresh what is missing or stale (fast when current)
#   scripts/setup-venv.sh --force  reinstall the Python packages and pycriu
#
# pip runs again only when pyproject.toml or the interpreter changed (stamp in .venv).
# pycriu comes from $PYCRIU_DIR (made by setup-host.sh); if that is missing it is extracted
# here from the python3-pycriu .deb pinned in scripts/host-packages.lock.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/paths.env
source "$HERE/paths.env"

VENV=$ROOT/.venv
VPY=$VENV/bin/python
PY=${PYTHON:-python3}
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

log() { printf '%-16s %s\n' "$1" "$2"; }
die() { echo "ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- venv
if [[ ! -x $VPY ]]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$PY is $("$PY" --version 2>&1); criu-shim needs Python >= 3.11 (set PYTHON=...)"
  "$PY" -m venv "$VENV"
  log venv "created $VENV ($("$VPY" --version))"
fi

# ---------------------------------------------------------------- pip install -e .[dev]
STAMP=$VENV/.criu-shim-pip-stamp
want=$( { "$VPY" --version; sha256sum "$ROOT/pyproject.toml"; } 2>&1)
if ((FORCE == 0)) && [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  log python-deps "ok ($("$VPY" -c 'import google.protobuf as p, grpc; print("protobuf", p.__version__, "grpcio", grpc.__version__)'))"
else
  "$VPY" -m pip install -q --disable-pip-version-check -e "${ROOT}[dev]" 2>&1 |
    grep -v "^WARNING: Location '.*' is ignored" || true
  "$VPY" -m pip check >/dev/null || die "pip check failed: $("$VPY" -m pip check)"
  printf '%s\n' "$want" >"$STAMP"
  log python-deps "installed ($("$VPY" -c 'import google.protobuf as p, grpc; print("protobuf", p.__version__, "grpcio", grpc.__version__)'))"
fi

# ---------------------------------------------------------------- pycriu
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PYCRIU_VER=$(awk '$1 == "pycriu" && $2 == "python3-pycriu" {print $4}' "$HERE/host-packages.lock")
PSTAMP=$SITE/.criu-shim-pycriu-stamp

if ((FORCE == 0)) && [[ -f $PSTAMP && $(cat "$PSTAMP") == "$PYCRIU_VER" && -f $SITE/pycriu/__init__.py ]]; then
  log pycriu "ok ($PYCRIU_VER in .venv)"
else
  src=$PYCRIU_DIR
  tmp=""
  if [[ ! -f $src/pycriu/__init__.py ]]; then
    # setup-host.sh has not run: take the pinned .deb ourselves
    tmp=$(mktemp -d)
    mkdir -p "$CRIU_SHIM_DEB_CACHE"
    deb=$(echo "$CRIU_SHIM_DEB_CACHE/python3-pycriu_${PYCRIU_VER}_"*.deb)
    if [[ ! -f $deb ]]; then
      (cd "$CRIU_SHIM_DEB_CACHE" && apt-get download -qq -o APT::Sandbox::User=root \
        "python3-pycriu=$PYCRIU_VER" >/dev/null) ||
        die "cannot download python3-pycriu=$PYCRIU_VER: run scripts/setup-host.sh first (it adds the apt sources)"
      deb=$(echo "$CRIU_SHIM_DEB_CACHE/python3-pycriu_${PYCRIU_VER}_"*.deb)
    fi
    dpkg-deb -x "$deb" "$tmp"
    src=$tmp/usr/lib/python3/dist-packages
  fi
  rm -rf "$SITE/pycriu" "$SITE/crit" "$SITE"/pycriu-*.dist-info "$SITE"/crit-*.dist-info
  cp -a "$src/pycriu" "$src/crit" "$src"/pycriu-*.dist-info "$src"/crit-*.dist-info "$SITE/"
  [[ -z $tmp ]] || rm -rf "$tmp"
  printf '%s\n' "$PYCRIU_VER" >"$PSTAMP"
  log pycriu "installed $PYCRIU_VER into $SITE"
fi

# Debian's generated rpc_pb2/images must load under the venv's protobuf without warnings.
"$VPY" -W error -c 'import pycriu, pycriu.images; pycriu.rpc.criu_opts(); pycriu.images.load' ||
  die "pycriu does not import with this protobuf: regenerate its *_pb2 (see scripts/setup-venv.sh)"

# Talk to the private CRIU over pycriu's RPC (criu swrk), when it is installed and we are root.
if [[ -x $CRIU_BIN && $(id -u) == 0 ]]; then
  "$VPY" - "$CRIU_BIN" <<'EOF' || die "pycriu check RPC against $CRIU_BIN failed"
import sys, pycriu
c = pycriu.criu()
c.use_binary(sys.argv[1])
c.check()  # raises on failure
EOF
  log pycriu-rpc "ok (check RPC via $CRIU_BIN)"
fi
