#!/usr/bin/env bash
# Idempotent host setup for criu-shim (run as root on Debian 12).
#
#   scripts/setup-host.sh            install what is missing, skip what is there (fast)
#   scripts/setup-host.sh --verify   also re-run every check (incl. a CRIU TCP dump/restore)
#   scripts/setup-host.sh --force    rebuild every private prefix from the .debs
#
# Versions come from scripts/host-packages.lock, locations from scripts/paths.env.
# Host libraries never move: bookworm packages are installed with --no-upgrade, and
# trixie/forky are only added as apt sources pinned at priority 50; everything taken from
# them is extracted from .debs into private prefixes under /opt/criu-shim.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCK=$HERE/host-packages.lock
# shellcheck source=scripts/paths.env
source "$HERE/paths.env"

PREFIX=$CRIU_SHIM_PREFIX
SYSROOT=$CRIU_SHIM_SYSROOT
CACHE=$CRIU_SHIM_DEB_CACHE
STAMPS=$PREFIX/.stamps
LDSO=$SYSROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
LIBDIR=$SYSROOT/usr/lib/x86_64-linux-gnu
# Bump when the layout logic below changes, so existing prefixes get rebuilt.
LAYOUT_REV=1

VERIFY=0
FORCE=0
for arg in "$@"; do
  case $arg in
    --verify) VERIFY=1 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

[[ $(id -u) == 0 ]] || { echo "setup-host.sh must run as root" >&2; exit 1; }

log() { printf '%-16s %s\n' "$1" "$2"; }
die() { echo "ERROR: $*" >&2; exit 1; }

# lock_rows COMPONENT -> "package suite version" lines
lock_rows() { awk -v c="$1" '!/^[[:space:]]*(#|$)/ && $1 == c {print $2, $3, $4}' "$LOCK"; }

# ---------------------------------------------------------------- apt sources
SOURCES_FILE=/etc/apt/sources.list.d/criu-shim.sources
PREFS_FILE=/etc/apt/preferences.d/criu-shim
SOURCES_CONTENT="# Added by criu-shim scripts/setup-host.sh. Pinned low in $PREFS_FILE:
# packages are only taken from here explicitly (apt-get download pkg=version).
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
PREFS_CONTENT="# Added by criu-shim scripts/setup-host.sh: never upgrade the host from these suites.
Package: *
Pin: release n=trixie
Pin-Priority: 50

Package: *
Pin: release n=forky
Pin-Priority: 50
"
APT_UPDATED=0

apt_update() {
  apt-get update -qq -o APT::Sandbox::User=root >/dev/null || apt-get update
  APT_UPDATED=1
}

lists_present() {
  local s
  for s in bookworm trixie forky; do
    compgen -G "/var/lib/apt/lists/*_dists_${s}_main_binary-amd64_Packages*" >/dev/null || return 1
  done
}

setup_apt_sources() {
  local changed=0
  if [[ ! -f $SOURCES_FILE || $(cat "$SOURCES_FILE") != "${SOURCES_CONTENT%$'\n'}" ]]; then
    printf '%s' "$SOURCES_CONTENT" >"$SOURCES_FILE"; changed=1
  fi
  if [[ ! -f $PREFS_FILE || $(cat "$PREFS_FILE") != "${PREFS_CONTENT%$'\n'}" ]]; then
    printf '%s' "$PREFS_CONTENT" >"$PREFS_FILE"; changed=1
  fi
  if ((changed)) || ! lists_present; then
    apt_update
    log apt-sources "written + apt-get update (trixie, forky pinned at 50)"
  else
    log apt-sources "ok (trixie, forky pinned at 50)"
  fi
}

# ---------------------------------------------------------------- host packages
setup_host_packages() {
  local pkgs missing
  mapfile -t pkgs < <(lock_rows host | awk '{print $1}')
  mapfile -t missing < <(
    dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${pkgs[@]}" 2>/dev/null |
      awk '$2 == "installed" {print $1}' | sort | comm -23 <(printf '%s\n' "${pkgs[@]}" | sort) -)
  if ((${#missing[@]} == 0)); then
    log host-packages "ok (${#pkgs[@]} bookworm packages present)"
    return
  fi
  ((APT_UPDATED)) || apt_update
  without_service_starts env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends --no-upgrade "${missing[@]}" >/dev/null
  log host-packages "installed: ${missing[*]}"
}

# without_service_starts CMD...: run CMD with a policy-rc.d that denies every start, so no
# package's maintainer script starts a daemon (docker-registry's postinst starts one on :5000
# through invoke-rc.d / deb-systemd-invoke, and fails the install if that start fails).
# An existing policy-rc.d is left as it is.
without_service_starts() (
  local policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    trap 'rm -f "$policy"' EXIT
    printf '#!/bin/sh\n# temporary, from criu-shim scripts/setup-host.sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
  fi
  "$@"
)

# ---------------------------------------------------------------- docker-registry
# The package's own service (on :5000) must be neither running nor enabled: criu-shim runs
# private instances on loopback ports (shim/node/registry.py). Works with and without systemd
# as PID 1 (`systemctl` may be installed on a host that was not booted with it).
setup_registry() {
  [[ -x $REGISTRY_BIN ]] || die "$REGISTRY_BIN missing (host package docker-registry)"
  local notes=() unit=docker-registry.service
  if [[ -d /run/systemd/system ]]; then
    if systemctl --quiet is-active "$unit" 2>/dev/null; then
      systemctl stop "$unit"; notes+=("stopped $unit")
    fi
  elif [[ -x /etc/init.d/docker-registry ]] && /etc/init.d/docker-registry status >/dev/null 2>&1; then
    /etc/init.d/docker-registry stop >/dev/null; notes+=("stopped the init.d service")
  fi
  # systemctl edits the unit links itself when systemd is not running
  if command -v systemctl >/dev/null && systemctl --quiet is-enabled "$unit" 2>/dev/null; then
    systemctl --quiet disable "$unit" 2>/dev/null; notes+=("disabled $unit")
  fi
  if compgen -G '/etc/rc[2-5].d/S*docker-registry' >/dev/null; then
    update-rc.d docker-registry disable >/dev/null 2>&1; notes+=("disabled the init.d links")
  fi
  local v; v=$("$REGISTRY_BIN" --version 2>&1 | awk '{print $NF; exit}')
  log docker-registry "ok $v ($REGISTRY_BIN; host service off${notes:+: ${notes[*]}})"
}

# ---------------------------------------------------------------- .deb fetching
# Files under $CACHE are named like apt names them (epoch ':' -> '%3a').
deb_file() { echo "$CACHE/${1}_${2//:/%3a}_"*.deb; }

# candidate version of PKG in SUITE (first match in madison order = highest)
suite_version() { apt-cache madison "$1" | awk -v s="$2" '$6 ~ "^"s"/" {print $3; exit}'; }

# apt_download PKG=VERSION... into $CACHE
apt_download() {
  (cd "$CACHE" && apt-get download -qq -o APT::Sandbox::User=root "$@" >/dev/null 2>&1)
}

# fetch_deb PKG SUITE VERSION: sets DEB (path of the cached .deb) and DEB_VERSION (the
# version used: the pinned one, or the suite's current one if the pin left the mirror)
fetch_deb() {
  local pkg=$1 suite=$2 ver=$3
  mkdir -p "$CACHE"
  DEB=$(deb_file "$pkg" "$ver")
  if [[ ! -f $DEB ]]; then
    if ! apt_download "$pkg=$ver"; then
      ((APT_UPDATED)) || apt_update
      if ! apt_download "$pkg=$ver"; then
        local cur
        cur=$(suite_version "$pkg" "$suite")
        [[ -n $cur ]] || die "$pkg: pinned $ver not downloadable and $suite has no $pkg"
        echo "WARNING: $pkg=$ver ($suite) is gone from the mirror; using $suite's $cur." \
             "Update scripts/host-packages.lock." >&2
        ver=$cur
        apt_download "$pkg=$ver" || die "apt-get download $pkg=$ver failed"
      fi
    fi
    DEB=$(deb_file "$pkg" "$ver")
  fi
  [[ -f $DEB ]] || die "no .deb for $pkg=$ver in $CACHE"
  DEB_VERSION=$ver
}

# prefetch: one apt-get download for every locked .deb not cached yet (one apt run is much
# faster than one per package); whatever fails here is retried one by one by fetch_deb.
prefetch_debs() {
  local pkg suite ver want=()
  while read -r pkg suite ver; do
    [[ -f $(deb_file "$pkg" "$ver") ]] || want+=("$pkg=$ver")
  done < <(awk '!/^[[:space:]]*(#|$)/ && $1 != "host" {print $2, $3, $4}' "$LOCK")
  ((${#want[@]})) || return 0
  mkdir -p "$CACHE"
  apt_download "${want[@]}" || { ((APT_UPDATED)) || apt_update; apt_download "${want[@]}"; } || true
  log debs "downloaded ${#want[@]} .debs into $CACHE"
}

# ---------------------------------------------------------------- helpers
# patch_elf FILE: run with the private loader, resolve every library (DT_RPATH, which also
# applies to indirect dependencies) from the private sysroot.
patch_elf() {
  patchelf --set-interpreter "$LDSO" --force-rpath --set-rpath "$LIBDIR" "$1"
}

# check_private_libs FILE: every shared library resolves inside the sysroot
check_private_libs() {
  local out
  out=$("$LDSO" --list "$1" 2>&1) || die "$1: loader failed: $out"
  if grep -q 'not found' <<<"$out"; then die "$1: missing libraries: $out"; fi
  if grep '=>' <<<"$out" | grep -v "=> $SYSROOT/" | grep -q .; then
    die "$1: libraries resolved outside $SYSROOT: $out"
  fi
}

stamp_for() { # stamp_for COMPONENT [EXTRA_COMPONENT...]
  { echo "layout $LAYOUT_REV prefix $PREFIX"; local c; for c in "$@"; do lock_rows "$c"; done; }
}
stamp_ok() { # stamp_ok NAME CONTENT
  ((FORCE == 0)) && [[ -f $STAMPS/$1 && $(cat "$STAMPS/$1") == "$2" ]]
}
stamp_write() { mkdir -p "$STAMPS"; printf '%s\n' "$2" >"$STAMPS/$1"; }

# extract_component COMPONENT DEST: dpkg-deb -x every locked .deb of COMPONENT into DEST,
# and record the versions used in $STAMPS/COMPONENT.versions (collected into VERSIONS)
extract_component() {
  local pkg suite ver used=""
  mkdir -p "$2" "$STAMPS"
  while read -r pkg suite ver; do
    fetch_deb "$pkg" "$suite" "$ver"
    dpkg-deb -x "$DEB" "$2"
    used+="$1 $pkg $suite $DEB_VERSION"$'\n'
  done < <(lock_rows "$1")
  printf '%s' "$used" >"$STAMPS/$1.versions"
}

# replace_dir NEW FINAL: swap a freshly built dir into place
replace_dir() { rm -rf "$2.old"; [[ -e $2 ]] && mv "$2" "$2.old"; mv "$1" "$2"; rm -rf "$2.old"; }

link_bin() { mkdir -p "$PREFIX/bin"; ln -sfn "$1" "$PREFIX/bin/$2"; }

first_line() { "$@" 2>&1 | head -n1; }

# ---------------------------------------------------------------- components
setup_sysroot() {
  local st; st=$(stamp_for sysroot)
  if stamp_ok sysroot "$st" && [[ -x $LDSO ]]; then
    log sysroot "ok ($(lock_rows sysroot | wc -l) packages, glibc $("$LDSO" --version | grep -o 'release version [0-9.]*[0-9]' | awk '{print $3}'))"
    return
  fi
  local tmp=$PREFIX/.tmp-sysroot
  rm -rf "$tmp"
  extract_component sysroot "$tmp"
  rm -rf "$tmp/usr/share/doc" "$tmp/usr/share/man" "$tmp/usr/share/locale" "$tmp/usr/share/lintian"
  replace_dir "$tmp" "$SYSROOT"
  [[ -x $LDSO ]] || die "sysroot has no loader at $LDSO"
  stamp_write sysroot "$st"
  log sysroot "installed $(lock_rows sysroot | wc -l) packages into $SYSROOT"
}

# setup_patched COMPONENT SRC_IN_DEB BINNAME [LINKNAME]: one patchelf'd binary in
# $PREFIX/COMPONENT/bin; sets FRESH=1 when it was (re)built
setup_patched() {
  FRESH=0
  local comp=$1 src=$2 name=$3 link=${4:-}
  local dest=$PREFIX/$comp/bin/$name st
  st=$(stamp_for "$comp" sysroot)
  if stamp_ok "$comp" "$st" && [[ -x $dest ]]; then
    ((VERIFY == 0)) || check_private_libs "$dest"
    [[ -z $link ]] || link_bin "../$comp/bin/$name" "$link"
    return 0
  fi
  local tmp=$PREFIX/.tmp-$comp
  rm -rf "$tmp" "$tmp.x"
  extract_component "$comp" "$tmp.x"
  install -D -m 0755 "$tmp.x/$src" "$tmp/bin/$name"
  rm -rf "$tmp.x"
  patch_elf "$tmp/bin/$name"
  replace_dir "$tmp" "$PREFIX/$comp"
  check_private_libs "$dest"
  [[ -z $link ]] || link_bin "../$comp/bin/$name" "$link"
  stamp_write "$comp" "$st"
  FRESH=1
}

version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

# A process owning a TCP listener and an established loopback connection is dumped and
# restored; it must carry on using the same connection afterwards.
criu_tcp_selftest() ( # subshell: its EXIT trap cleans up
  local py; py=$(command -v python3) || { log criu-selftest "skipped (no python3)"; return 0; }
  local d; d=$(mktemp -d /tmp/criu-shim-selftest.XXXXXX)
  pid=""
  trap '[[ -z $pid ]] || kill -9 "$pid" 2>/dev/null || true; rm -rf "$d"' EXIT
  cat >"$d/prog.py" <<'EOF'
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname()); a, _ = s.accept()
n, end = 0, time.monotonic() + 60
while time.monotonic() < end:
    c.sendall(b"x"); assert a.recv(1) == b"x"
    n += 1
    with open(sys.argv[1] + ".tmp", "w") as f: f.write(str(n))
    import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(0.02)
EOF
  setsid "$py" "$d/prog.py" "$d/count" </dev/null >/dev/null 2>&1 &
  pid=$!
  disown "$pid"
  for _ in $(seq 100); do [[ -s $d/count ]] && break; sleep 0.05; done
  mkdir "$d/img"
  "$CRIU_BIN" dump -t "$pid" -D "$d/img" --shell-job --tcp-established -v4 -o dump.log ||
    die "criu dump failed, see $(cp "$d/img/dump.log" /tmp/criu-shim-selftest-dump.log; echo /tmp/criu-shim-selftest-dump.log)"
  # the dumped task is gone once our pid 1 reaps it; restore needs the pid free
  for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.05; done
  local before; before=$(cat "$d/count")
  "$CRIU_BIN" restore -D "$d/img" -d --shell-job --tcp-established -v4 -o restore.log ||
    die "criu restore failed, see $(cp "$d/img/restore.log" /tmp/criu-shim-selftest-restore.log; echo /tmp/criu-shim-selftest-restore.log)"
  for _ in $(seq 100); do (($(cat "$d/count") > before + 5)) && break; sleep 0.05; done
  local after; after=$(cat "$d/count")
  ((after > before + 5)) || die "restored process did not carry on over its TCP connection ($before -> $after)"
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.05; done
  pid=""
  log criu-selftest "ok: dump+restore of a TCP listener + established connection (counter $before -> $after)"
)

setup_criu() {
  setup_patched criu usr/sbin/criu criu criu
  local fresh=$FRESH
  local v; v=$("$CRIU_BIN" --version | awk '/^Version:/ {print $2}')
  version_ge "$v" "$CRIU_MIN_VERSION" || die "CRIU $v at $CRIU_BIN is older than $CRIU_MIN_VERSION"
  if ((fresh || VERIFY)); then
    "$CRIU_BIN" check >/dev/null 2>&1 || die "criu check failed: $("$CRIU_BIN" check 2>&1 | tail -n3)"
    log criu "$( ((fresh)) && echo installed || echo verified) $v at $CRIU_BIN (criu check: ok)"
    criu_tcp_selftest
  else
    log criu "ok $v ($CRIU_BIN)"
  fi
}

setup_runc() { # setup_runc COMPONENT [LINK]
  local comp=$1 link=${2:-}
  setup_patched "$comp" usr/sbin/runc runc "$link"
  local fresh=$FRESH
  local v; v=$("$PREFIX/$comp/bin/runc" --version | awk '/^runc version/ {print $3}')
  [[ -n $v ]] || die "$PREFIX/$comp/bin/runc does not run"
  log "$comp" "$( ((fresh)) && echo installed || echo ok) $v ($PREFIX/$comp/bin/runc)"
}

setup_checkpointctl() {
  setup_patched checkpointctl usr/bin/checkpointctl checkpointctl checkpointctl
  local fresh=$FRESH
  "$CHECKPOINTCTL_BIN" --help >/dev/null 2>&1 || die "$CHECKPOINTCTL_BIN --help fails"
  log checkpointctl "$( ((fresh)) && echo installed || echo ok) $(awk '{print $4}' "$STAMPS/checkpointctl.versions") ($CHECKPOINTCTL_BIN)"
}

setup_containerd() { # setup_containerd COMPONENT
  local comp=$1 dir=$PREFIX/$1 st b
  st=$(stamp_for "$comp")
  if ! stamp_ok "$comp" "$st" || [[ ! -x $dir/bin/containerd ]]; then
    local tmp=$PREFIX/.tmp-$comp
    rm -rf "$tmp" "$tmp.x"
    extract_component "$comp" "$tmp.x"
    mkdir -p "$tmp/bin"
    cp -a "$tmp.x/usr/bin/." "$tmp/bin/"
    rm -rf "$tmp.x"
    replace_dir "$tmp" "$dir"
    stamp_write "$comp" "$st"
    st=installed
  else
    st=ok
  fi
  for b in containerd ctr containerd-shim-runc-v2; do
    [[ -x $dir/bin/$b ]] || die "$dir/bin/$b missing"
  done
  log "$comp" "$st $("$dir/bin/containerd" --version | awk '{print $3}') ($dir/bin)"
}

setup_pycriu() {
  local st; st=$(stamp_for pycriu)
  if stamp_ok pycriu "$st" && [[ -f $PYCRIU_DIR/pycriu/__init__.py ]]; then
    log pycriu "ok ($PYCRIU_DIR)"
    return
  fi
  local tmp=$PREFIX/.tmp-pycriu
  rm -rf "$tmp" "$tmp.x"
  extract_component pycriu "$tmp.x"
  mkdir -p "$tmp"
  cp -a "$tmp.x/usr/lib/python3/dist-packages/." "$tmp/"
  rm -rf "$tmp.x"
  replace_dir "$tmp" "$PYCRIU_DIR"
  stamp_write pycriu "$st"
  log pycriu "installed $(awk '{print $4}' "$STAMPS/pycriu.versions") into $PYCRIU_DIR"
}

# ---------------------------------------------------------------- main
mkdir -p "$PREFIX/bin" "$STAMPS"

setup_apt_sources
setup_host_packages
setup_registry
prefetch_debs
setup_sysroot
setup_criu
setup_pycriu
setup_runc runc runc
setup_runc runc-1.3
setup_containerd containerd-1.6
setup_containerd containerd-1.7
setup_containerd containerd-2.x
setup_checkpointctl

# VERSIONS: "component package suite version" each prefix was actually built from
# (differs from the lock only after a fallback)
cat "$STAMPS"/*.versions >"$CRIU_SHIM_VERSIONS_FILE.tmp"
mv "$CRIU_SHIM_VERSIONS_FILE.tmp" "$CRIU_SHIM_VERSIONS_FILE"
