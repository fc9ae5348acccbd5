"""The `install` and `uninstall` subcommands' arguments (argparse only: cheap to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

INSTALL_EXAMPLES = """\
Files it writes (under --root, default /):
  etc/systemd/system/criu-shim.service                   unit for `criu-shim serve`
  usr/local/bin/containerd-shim-criu-v2                   the "criu" runtime handler's launcher
  etc/containerd/config.toml (or --containerd-config)     handler "criu" merged in, made the default
  etc/systemd/system/kubelet.service.d/20-criu-shim.conf  kubelet CRI endpoints -> criu-shim
  containerd 1.6 only: etc/systemd/system/containerd.service.d/20-criu-shim.conf and
  usr/local/lib/criu-shim/runc-shim/containerd-shim-runc-v2 (1.6 ignores runtime_path)
Originals are kept (0600) in var/lib/criu-shim/install; `criu-shim uninstall` puts them back.

examples:
  criu-shim install --dry-run                  # print the diff of every file, change nothing
  criu-shim install                            # on a node: write, then run `criu-shim check`
  criu-shim install --root /mnt/image --containerd-bin /mnt/image/usr/bin/containerd --no-check
                                               # into a node image being built
  criu-shim install --containerd-config /etc/containerd/custom.toml --keep-default-runtime
  criu-shim uninstall                          # the original files back, byte for byte
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    install = sub.add_parser(
        "install", help="wire criu-shim into this node's containerd and kubelet (idempotent)",
        description="Install the systemd unit for `criu-shim serve`, merge criu-shim's runtime handler \"criu\" "
        "into containerd's config (version 2 for 1.6/1.7, 3/4 for 2.x; the operator's settings and comments "
        "kept), point the kubelet's CRI endpoints at criu-shim, then run `criu-shim check`. A config it cannot "
        "parse or merge is refused, saying file and line, and nothing is changed.",
        epilog=INSTALL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    install.add_argument("--dry-run", action="store_true", help="print the unified diff of every file it would "
                         "change and change nothing")
    _common(install)
    install.add_argument("--containerd-config", type=Path, metavar="FILE",
                         help="containerd's config (default: ROOT/etc/containerd/config.toml; created if missing)")
    install.add_argument("--containerd-bin", metavar="PATH", help="the node's containerd binary or its directory, "
                         "for its version (default: containerd on PATH)")
    install.add_argument("--criu-shim-bin", metavar="PATH", help="criu-shim executable the unit runs "
                         "(default: criu-shim on PATH)")
    install.add_argument("--python", metavar="PATH", help="the interpreter that has criu-shim, for the launcher's "
                         "restore path (default: the one running this command; give the image's for --root)")
    install.add_argument("--keep-default-runtime", action="store_true", help="leave containerd's default runtime "
                         "as it is (pods then need RuntimeClass handler \"criu\" to receive a restore)")
    install.add_argument("--no-kubelet", action="store_true", help="leave the kubelet alone (no drop-in)")
    install.add_argument("--no-check", action="store_true", help="skip `criu-shim check` afterwards")

    uninstall = sub.add_parser(
        "uninstall", help="put back the files `criu-shim install` changed, byte for byte",
        description="Restore every file install changed from the originals it kept and remove the files it "
        "created. Refuses, naming them, when files were changed since install, unless --force.",
        epilog="examples:\n  criu-shim uninstall\n  criu-shim uninstall --root /mnt/image\n"
        "  criu-shim uninstall --force      # originals back even over later edits",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(uninstall)
    uninstall.add_argument("--force", action="store_true", help="restore even files changed since install")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="the node's file system root (default /; a directory for image builds and tests)")


def run(args: argparse.Namespace) -> int:
    from shim.install import command

    root = args.root.absolute()
    if args.command == "uninstall":
        return command.uninstall(root, args.force)
    node = command.node_from_args(root, args.containerd_config, args.containerd_bin, args.criu_shim_bin,
                                  args.keep_default_runtime, kubelet=not args.no_kubelet, python=args.python)
    return command.install(node, args.dry_run, check=not args.no_check, containerd_bin=args.containerd_bin)
