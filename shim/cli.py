"""The `criu-shim` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shim.errors import ShimError
from shim.install import arguments as install_arguments
from shim.migrate import arguments as migrate_arguments

if TYPE_CHECKING:
    from shim.sealed import Keyring

DESCRIPTION = """\
criu-shim: checkpoint, restore and migration for Kubernetes nodes on containerd 1.6 to 2.4.

It sits between the kubelet and containerd as a CRI proxy: every CRI call it
does not handle itself is relayed to containerd unchanged. It answers
CheckpointContainer itself, and restores a container at CreateContainer when
the image is a checkpoint archive or checkpoint image (opt-in, see README).

examples:
  criu-shim serve --listen unix:///run/criu-shim/cri.sock \\
                  --runtime-endpoint unix:///run/containerd/containerd.sock \\
                  --config /etc/criu-shim/config.toml
  criu-shim check                      # can this node checkpoint and restore?
  criu-shim node up --dir /tmp/node1   # a local containerd 1.7 node with the proxy
  criu-shim checkpoint-image ckpt.tar --name registry.example/app:ckpt --out app-ckpt.tar
  criu-shim push ckpt.tar registry.example/app:ckpt   # the same image, pushed; prints REF@DIGEST
  criu-shim inspect ckpt.tar --trusted-key /etc/criu-shim/trusted/node-a.pub   # what it holds, signature
  criu-shim gc --config /etc/criu-shim/config.toml --dry-run   # which checkpoint archives retention deletes
  criu-shim install --dry-run          # what wiring criu-shim into this node would change
  criu-shim migrate CTR --to 10.0.0.12:7543 --to-pod shop/web-2   # move a container to another node
"""


def _unix_path(value: str) -> Path:
    if not value.startswith("unix://") or len(value) <= len("unix://"):
        raise argparse.ArgumentTypeError(f"expected unix:///absolute/path, got {value!r}")
    path = Path(value.removeprefix("unix://"))
    if not path.is_absolute():
        raise argparse.ArgumentTypeError(f"socket path must be absolute: {value!r}")
    return path


def _kubelet_duration(value: str) -> str:
    from shim.node.kube_render import check_gc_age  # the dev node's rule, spelled there

    try:
        return check_gc_age(value)
    except ShimError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="criu-shim", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the CRI proxy in front of containerd",
                           description="Serve CRI v1 on --listen and relay it to --runtime-endpoint "
                           "(containerd's CRI socket). SIGTERM drains in-flight calls, then exits 0.")
    serve.add_argument("--listen", type=_unix_path, required=True, metavar="unix://PATH",
                       help="socket the kubelet connects to (created 0660, owner root)")
    serve.add_argument("--runtime-endpoint", type=_unix_path, required=True, metavar="unix://PATH",
                       help="containerd's socket, e.g. unix:///run/containerd/containerd.sock")
    serve.add_argument("--config", type=Path, metavar="FILE", help="criu-shim TOML config (see README)")
    serve.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                       help="how long SIGTERM waits for in-flight calls (default 10)")

    image = sub.add_parser("checkpoint-image", help="turn a checkpoint archive into an OCI image (like "
                           "`checkpointctl build`)",
                           description="Writes an OCI layout tar holding ARCHIVE as a checkpoint image named REF, "
                           "with the org.criu.checkpoint.* and CRI-O checkpoint annotations. Import it with "
                           "`ctr -n k8s.io images import OUT` or push it to a registry; a pod whose image is REF "
                           "is then restored by criu-shim.")
    image.add_argument("archive", type=Path, help="checkpoint archive (uncompressed tar)")
    image.add_argument("--name", required=True, metavar="REF", help="image reference, e.g. registry/app:ckpt")
    image.add_argument("--out", type=Path, required=True, help="OCI layout tar to write")
    image.add_argument("--config", type=Path, metavar="FILE",
                       help="criu-shim TOML config: its [encryption] keys read an encrypted archive's names")

    push = sub.add_parser("push", help="push a checkpoint archive to a registry as a checkpoint image",
                          description="Builds the checkpoint image of ARCHIVE (as checkpoint-image does) and pushes "
                          "it as REF, blobs first, manifest last; prints REF@DIGEST. Credentials come from "
                          "$DOCKER_CONFIG/config.json, else ~/.docker/config.json; loopback registries are plain "
                          "HTTP, all others HTTPS.",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  criu-shim push /var/lib/kubelet/checkpoints/checkpoint-web_shop-app-2026-12-05T00:41:02Z.tar \\
      registry.example:5000/ckpt/web:1      # prints registry.example:5000/ckpt/web:1@sha256:...
  criu-shim push ckpt.tar registry.example:5000/ckpt/web:1 --sign-key /etc/criu-shim/signing.key
  DOCKER_CONFIG=/etc/criu-shim/docker criu-shim push ckpt.tar registry.example/team/web:1   # its config.json
""")
    push.add_argument("archive", type=Path, help="checkpoint archive (uncompressed tar)")
    push.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPOSITORY[:TAG]")
    push.add_argument("--sign-key", type=Path, metavar="KEY",
                      help="also push a cosign signature of the image made with this PEM EC P-256 key "
                      "([signing] key_file); `cosign verify --key KEY.pub --insecure-ignore-tlog REF@DIGEST` checks it")
    push.add_argument("--config", type=Path, metavar="FILE",
                      help="criu-shim TOML config: its [encryption] keys read an encrypted archive's names")
    pull = sub.add_parser("pull", help="fetch the archive of a checkpoint image from a registry",
                          description="Writes the checkpoint archive of checkpoint image REF (its tar layer, or its "
                          "sealed blob, still sealed) to OUT "
                          "(0600, must not exist); prints REF@DIGEST. A multi-platform index gives this machine's "
                          "linux manifest. Credentials as for push.",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  criu-shim pull registry.example:5000/ckpt/web:1 web.tar
  criu-shim pull registry.example:5000/ckpt/web@sha256:<64 hex digits> web.tar   # exactly that image
""")
    pull.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")
    pull.add_argument("out", type=Path, metavar="OUT", help="where to write the archive")

    node = sub.add_parser("node", help="a local containerd node for development, tests and the demo")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    node_up = node_sub.add_parser("up", help="start containerd, a CNI bridge and the proxy, all under DIR",
                                  description="Prints CONTAINERD_ENDPOINT=... and CRI_ENDPOINT=... once both answer.")
    node_up.add_argument("--dir", type=Path, required=True, help="the node's directory (created if missing)")
    node_up.add_argument("--containerd", default="1.7", choices=["1.7", "1.6", "2.x", "2.1", "2.3", "2.4",
                                                                 "2.3-native"],
                         help="containerd release to run (default 1.7); 2.x is Debian's 2.1 with containerd's "
                         "own handler only, 2.1 the same with criu-shim's handler; 2.3 and 2.4 are built by "
                         "`make peers` and use criu-shim's handler; 2.3-native is 2.3 with its own handler "
                         "and its own restore switched on")
    node_up.add_argument("--proxy-config", type=Path, metavar="FILE", help="config file for the node's proxy")
    node_up.add_argument("--kubernetes", action="store_true",
                         help="also etcd, kube-apiserver and a kubelet using the proxy (built by `make peers`)")
    node_up.add_argument("--join", type=Path, metavar="DIR1",
                         help="a kubelet registered with the API server of the node in DIR1 (implies --kubernetes)")
    node_up.add_argument("--image-gc-max-age", type=_kubelet_duration, metavar="DURATION",
                         help="turn the kubelet's image GC on: every 5 minutes it removes images no container "
                         "has used for DURATION (30s, 5m, 1h; default: image GC off)")
    node_up.add_argument("--fabric", metavar="NAME",
                         help="run the node as a host of its own: its containerd, CNI bridge, pods, proxy and "
                         "migration receiver in a network namespace linked to the router of fabric NAME (made by "
                         "the first node), which routes each node's pod subnet; for `criu-shim migrate`")
    node_down = node_sub.add_parser("down", help="stop the node in DIR and remove its processes, mounts, "
                                    "network namespaces and CNI state")
    node_down.add_argument("--dir", type=Path, required=True)
    node_down.add_argument("--purge", action="store_true", help="also delete DIR (images, logs)")

    install_arguments.add_parsers(sub)
    migrate_arguments.add_parsers(sub)

    _add_inspect(sub)

    gc = sub.add_parser("gc", help="apply the retention limits to the checkpoint archives now",
                        description="Lists each checkpoint archive the [retention] limits of the config pick, with "
                        "the rule and numbers, and deletes it (an audit line each) unless --dry-run. Archives a "
                        "restore still reads (loop device, open file) are kept. Exit 1 if a deletion failed.")
    gc.add_argument("--config", type=Path, metavar="FILE", help="criu-shim TOML config (see README)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")

    check = sub.add_parser(
        "check", help="preflight: can this node checkpoint and restore containers?",
        description="Probe CRIU (version, `criu check`, features), runc, containerd, the kernel, cgroups, "
        "LSMs and privileges, print what works and what does not as a table, and exit 1 (saying why) "
        "when checkpointing cannot work here. Tools default to scripts/paths.env, then $PATH.")
    check.add_argument("--criu", metavar="PATH", help="CRIU binary to check (default: paths.env CRIU_BIN, then PATH)")
    check.add_argument("--runc", metavar="PATH", help="runc binary to check (default: paths.env RUNC_BIN, then PATH)")
    check.add_argument("--containerd-bin", metavar="PATH",
                       help="the node's containerd binary or its bin directory (default: paths.env CONTAINERD_1_7)")
    check.add_argument("--json", action="store_true", help="print machine-readable findings and facts instead")
    return parser


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect = sub.add_parser(
        "inspect", help="show what a checkpoint archive holds (as checkpointctl does), its signature and encryption",
        description="Container, image, engine, times, sizes, process tree and mounts of ARCHIVE, read without "
        "unpacking or writing anything; the signature ARCHIVE.sig checked against the trusted keys; an "
        "encrypted archive read with its key. Exit 1 if it cannot be read or its signature does not verify. "
        "Also checkpointctl's plugin `checkpointctl criu-shim ARCHIVE` (checkpointctl 1.6+).")
    inspect.add_argument("archive", type=Path, help="checkpoint archive (tar, gzip, zstd or encrypted)")
    inspect.add_argument("--config", type=Path, metavar="FILE", help="take [signing] trusted_keys from this config")
    inspect.add_argument("--trusted-key", type=Path, action="append", default=[], metavar="PUB",
                         help="PEM public key to verify the signature with (repeatable)")
    inspect.add_argument("--key-file", type=Path, metavar="FILE", help="key of an encrypted archive")
    inspect.add_argument("--key-command", metavar="COMMAND",
                         help="command printing the key of an encrypted archive (given its key id)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of the tree")


def checkpointctl_plugin() -> int:
    """`checkpointctl-criu-shim`: checkpointctl 1.6+ runs it for `checkpointctl criu-shim ARGS`."""
    args = sys.argv[1:]
    if args == ["--plugin-description"]:  # checkpointctl's plugin protocol: the one-line help, exit 42
        print("Inspect criu-shim checkpoints: signature, encryption, process tree (criu-shim inspect)")
        return 42
    return main(["inspect", *args[args[:1] == ["inspect"]:]])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except ShimError as exc:
        print(f"criu-shim: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path we were given or need is unusable: say which, no traceback
        print(f"criu-shim: {exc}", file=sys.stderr)
        return 1


def _keyring(config: Path | None) -> Keyring | None:
    """The [encryption] keys of `config` (an encrypted archive's image names come from inside it)."""
    if config is None:
        return None
    from shim.config import load
    from shim.restore import unseal

    return unseal.keyring(load(config).encryption)


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from shim.app import serve

        return serve(args.listen, args.runtime_endpoint, args.config, args.grace)
    if args.command == "checkpoint-image":
        from shim.restore.build_image import build

        print(build(args.archive, args.name, args.out, _keyring(args.config)))
        return 0
    if args.command in ("push", "pull"):
        from shim import export
        from shim.image_reference import Reference

        if args.command == "push":
            print(export.push_checkpoint(args.archive, args.ref, signing_key=args.sign_key,
                                         keyring=_keyring(args.config)).pinned)
        else:
            ref = Reference.parse(args.ref)
            print(ref.with_digest(export.pull_checkpoint(ref, args.out)))
        return 0
    if args.command == "node":
        from shim.node import kubernetes, local

        if args.node_command == "up" and args.fabric and (args.kubernetes or args.join):
            raise SystemExit("criu-shim: node up: --fabric does not work with --kubernetes or --join yet")
        if args.node_command == "up" and (args.kubernetes or args.join):
            print(kubernetes.up(args.dir, args.containerd, args.proxy_config, args.join,
                                args.image_gc_max_age).lines(), flush=True)
        elif args.node_command == "up":
            print(local.up(args.dir, args.containerd, args.proxy_config, args.fabric).lines(), flush=True)
        else:
            for line in kubernetes.down(args.dir, purge=args.purge):
                print(line)
        return 0
    if args.command in ("migrate", "migrate-receiver"):
        return migrate_arguments.run(args)
    if args.command in ("install", "uninstall"):
        return install_arguments.run(args)
    if args.command == "inspect":
        from shim.inspection.command import run as inspect

        return inspect(args.archive, config=args.config, trusted_keys=args.trusted_key, key_file=args.key_file,
                       key_command=args.key_command, as_json=args.json)
    if args.command == "gc":
        from shim.retention.command import run as gc

        return gc(args.config, args.dry_run)
    if args.command == "check":
        from shim import preflight

        return preflight.run(args.criu, args.runc, args.containerd_bin, as_json=args.json)
    raise AssertionError(args.command)
