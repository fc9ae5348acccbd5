#!/usr/bin/env bash
# Fetch the pinned Debian packages that ship the vendor .proto files (CRI, containerd, gogo, cgroups),
# verify their sha256 and extract the .proto files into vendor-protos/src/<go import path>.
#
#   scripts/fetch-protos.sh               idempotent: does nothing when src/ matches the lock
#   scripts/fetch-protos.sh --update-lock pin each package to its suite's current version
#
# Pins: vendor-protos/packages.lock. Downloads: vendor-protos/debs/ (both dirs gitignored).
# Needs the trixie apt source that scripts/setup-host.sh adds (unless the .debs are cached).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LOCK=$ROOT/vendor-protos/packages.lock
DEBS=$ROOT/vendor-protos/debs
SRC=$ROOT/vendor-protos/src
GOSRC=usr/share/gocode/src

log() { printf '%-16s %s\n' "$1" "$2"; }
die() { echo "ERROR: $*" >&2; exit 1; }

rows() { awk '!/^[[:space:]]*(#|$)/ {print $1, $2, $3, $4, $5}' "$LOCK"; }
deb_path() { echo "$DEBS/${1}_${2//:/%3a}_"*.deb; }
download() { # download PKG=VERSION into $DEBS
  mkdir -p "$DEBS"
  (cd "$DEBS" && apt-get download -qq -o APT::Sandbox::User=root "$1" >/dev/null 2>&1)
}

if [[ ${1:-} == --update-lock ]]; then
  tmp=$(mktemp)
  while IFS= read -r line; do
    read -r pkg suite ver sha glob <<<"$line"
    if [[ $line =~ ^[[:space:]]*(#|$) ]]; then printf '%s\n' "$line" >>"$tmp"; continue; fi
    cur=$(apt-cache madison "$pkg" | awk -v s="$suite" '$6 ~ "^"s"/" {print $3; exit}')
    [[ -n $cur ]] || die "$pkg: not in $suite (apt-get update? scripts/setup-host.sh?)"
    download "$pkg=$cur" || die "apt-get download $pkg=$cur failed"
    newsha=$(sha256sum "$(deb_path "$pkg" "$cur")" | cut -d' ' -f1)
    printf '%-40s %-9s %-21s %s  %s\n' "$pkg" "$suite" "$cur" "$newsha" "$glob" >>"$tmp"
    [[ $cur == "$ver" ]] || log "$pkg" "$ver -> $cur"
  done <"$LOCK"
  mv "$tmp" "$LOCK"
  log packages.lock "updated; now run scripts/fetch-protos.sh and scripts/gen-protos.sh"
  exit 0
fi

STAMP=$SRC/.fetch-stamp
want=$(sha256sum "$LOCK" | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  log vendor-protos "ok ($(find "$SRC" -name '*.proto' | wc -l) .proto files in vendor-protos/src)"
  exit 0
fi

tmpsrc=$ROOT/vendor-protos/.src.tmp
rm -rf "$tmpsrc"
mkdir -p "$tmpsrc"
while read -r pkg suite ver sha glob; do
  f=$(deb_path "$pkg" "$ver")
  if [[ ! -f $f ]] || ! echo "$sha  $f" | sha256sum -c --status; then
    rm -f "$DEBS/${pkg}_"*.deb
    download "$pkg=$ver" || {
      apt-get update -qq -o APT::Sandbox::User=root >/dev/null || true
      download "$pkg=$ver"
    } || die "cannot download $pkg=$ver ($suite). If it left the mirror, run: scripts/fetch-protos.sh --update-lock"
    f=$(deb_path "$pkg" "$ver")
  fi
  echo "$sha  $f" | sha256sum -c --status ||
    die "sha256 mismatch for $f (want $sha, got $(sha256sum "$f" | cut -d' ' -f1))"
  x=$(mktemp -d)
  dpkg-deb -x "$f" "$x"
  n=0
  while IFS= read -r -d '' p; do
    rel=${p#"$x/$GOSRC/"}
    install -D -m 0644 "$p" "$tmpsrc/$rel"
    n=$((n + 1))
  done < <(find "$x/$GOSRC" -type f -path "$x/$GOSRC/$glob" -print0)
  rm -rf "$x"
  ((n > 0)) || die "$pkg=$ver has no files matching $glob"
  log "$pkg" "$ver: $n .proto files (sha256 ok)"
done < <(rows)

rm -rf "$SRC"
mv "$tmpsrc" "$SRC"
printf '%s\n' "$want" >"$STAMP"
log vendor-protos "extracted into vendor-protos/src"
