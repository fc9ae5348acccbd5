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

.PHONY: peers crictl kubernetes

## peers: the real peers built from the Go module proxy, versions in scripts/peers.lock:
## kubelet, kube-apiserver, kubectl, crictl, critest, containerd 2.3/2.4 (+ shim), etcd.
## Cached under /var/cache/criu-shim/go, a stamp per lock entry: a second run builds nothing.
## Heavy when cold (see README): not a prerequisite of `make demo`.
peers:
	nice -n 10 python3 scripts/build-peers.py

## crictl: only crictl and critest (cri-tools)
crictl:
	nice -n 10 python3 scripts/build-peers.py cri-tools

## kubernetes: kubelet, kube-apiserver, kubectl, etcd, crictl, critest (tests/node/test_kubelet.py)
kubernetes:
	nice -n 10 python3 scripts/build-peers.py kubernetes etcd cri-tools

.PHONY: images demo test bench typecheck lint

## images: the locally built OCI images (pause, busybox, test programs) in build/images
images:
	python3 scripts/build-images.py

## demo: a local node, the proxy, a pod through it (see README)
demo: setup images
	.venv/bin/python scripts/demo.py

## typecheck: mypy --strict over shim/
typecheck: venv
	.venv/bin/mypy

## lint: ruff (rules in pyproject.toml) over the code, tests, benchmarks and scripts
lint: venv
	.venv/bin/ruff check shim tests bench scripts

## test: the whole suite; node tests need root (CI is root). Every peer is built (cached): the
## kubelet tests run the Kubernetes pieces, tests/node/test_containerd_built.py containerd 2.3/2.4.
test: setup images peers typecheck lint
	.venv/bin/python -m pytest

## bench: latency and checkpoint/restore figures, ours against the references, in one run
bench: setup images
	.venv/bin/python bench/run.py
