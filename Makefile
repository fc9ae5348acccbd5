SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Every target below is idempotent: the scripts detect what is already there and skip it,
# so `make setup` on a prepared machine takes about a second.
# Where things are installed: scripts/paths.env. Pinned versions: scripts/host-packages.lock
# (host tools) and vendor-protos/packages.lock (proto sources).

.PHONY: setup host venv protos

## setup: everything a developer or CI needs (host tools, Python venv, generated API)
setup: host venv protos

## host: apt sources (trixie/forky pinned low), bookworm tools, private prefixes under
## /opt/criu-shim (containerd 1.6/1.7/2.x, runc, CRIU 4.2 + sysroot, checkpointctl). Root.
host:
	scripts/setup-host.sh

## venv: .venv with `pip install -e '.[dev]'` and Debian's pycriu
venv:
	scripts/setup-venv.sh

## protos: fetch pinned vendor .proto files and generate shim/api (needs the venv)
protos: venv
	scripts/fetch-protos.sh
	scripts/gen-protos.sh
