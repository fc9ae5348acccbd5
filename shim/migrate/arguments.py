"""The `migrate` and `migrate-receiver` subcommands' arguments (argparse only: cheap to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

CERTS = Path("/etc/criu-shim/migrate")
CRI_SOCKET = "unix:///run/criu-shim/cri.sock"

MIGRATE_EXAMPLES = f"""\
The pod of CONTAINER needs checkpoint.criu-shim.io/stop-after: "true" (the source stops right
after its checkpoint); with checkpoint.criu-shim.io/tcp-established: "true" on both pods its
established TCP connections follow it: its pod IP moves to the target (the target's
--address-hook routes it there), or the migration is refused before anything is stopped.
Node certificates: {CERTS}/node.crt, node.key (server and client auth) and ca.crt.

examples:
  # on the source node: move container 3f2a... into pod shop/web-2 on the node at 10.0.0.12
  criu-shim migrate 3f2a9c1d --to 10.0.0.12:7543 --to-pod shop/web-2
  # the same through a development node (criu-shim node up --fabric f1 prints the values)
  criu-shim migrate 3f2a9c1d --to 10.235.7.2:7543 --to-pod 9b1e \\
      --runtime-endpoint unix:///run/criu-shim/ab12cd34/cri.sock --checkpoints-dir /tmp/n1/checkpoints \\
      --cert /tmp/n1/migrate/node.crt --key /tmp/n1/migrate/node.key --ca /tmp/n1/migrate/ca.crt \\
      --address-hook /tmp/n1/bin/address-hook
  # lazy (post-copy): the target runs it at once, its memory follows from here
  criu-shim migrate 3f2a9c1d --to 10.0.0.12:7543 --to-pod shop/web-2 --mode lazy
  # through a registry: the checkpoint is pushed as an image, the target pulls it (CRI PullImage)
  criu-shim migrate 3f2a9c1d --to 10.0.0.12:7543 --to-pod shop/web-2 --mode registry \\
      --image registry.example:5000/migrations/web
  # after a failed transfer: send the checkpoint that was kept, without checkpointing again
  criu-shim migrate 3f2a9c1d --checkpoint /var/lib/kubelet/checkpoints/migrate-3f2a9c1d-....tar \\
      --to 10.0.0.12:7543 --to-pod shop/web-2
"""

RECEIVER_EXAMPLES = f"""\
examples:
  criu-shim migrate-receiver --listen 10.0.0.12:7543 --config /etc/criu-shim/config.toml \\
      --address-hook /usr/local/lib/criu-shim/announce-pod-ip
Clients must present a certificate of --ca ({CERTS}/ca.crt by default). The checkpoints
directory must be one of the proxy's restore.allowed_dirs (the default is the first of them).
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    migrate = sub.add_parser(
        "migrate", help="move a running container into a prepared pod on another node",
        description="Checkpoint CONTAINER through this node's criu-shim (stop-after), stream the archive over "
        "mutual TLS to the target node's `criu-shim migrate-receiver`, which restores it into the prepared pod "
        "and starts it. Everything the target can check is checked before the source is stopped. On a failure "
        "after the checkpoint the source stays stopped, its checkpoint is kept, and the error says how to retry.",
        epilog=MIGRATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    migrate.add_argument("container", help="the container id (or a unique prefix) on this node")
    migrate.add_argument("--to", required=True, metavar="HOST:PORT", help="the target node's migration receiver")
    migrate.add_argument("--to-pod", required=True, metavar="POD",
                         help="the prepared pod on the target: its id, an id prefix, or NAMESPACE/NAME")
    migrate.add_argument("--name", help="the container's name in the target pod (default: its name here)")
    migrate.add_argument("--checkpoints-dir", type=Path, default=Path("/var/lib/kubelet/checkpoints"),
                         help="where the checkpoint is written here, and kept on failure (default: %(default)s)")
    migrate.add_argument("--checkpoint", type=Path, metavar="ARCHIVE",
                         help="retry: send this checkpoint (kept by a failed migration) instead of checkpointing")
    migrate.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoint here after success")
    migrate.add_argument("--address-hook", type=Path, metavar="PATH",
                         help="run `PATH release IP` here once the target has claimed the pod IP")
    migrate.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                         help="for the checkpoint, and for the transfer and restore (default 300)")
    migrate.add_argument("--mode", choices=("eager", "lazy", "registry"), default="eager",
                         help="eager: the whole checkpoint crosses before the target starts (default); lazy: the "
                         "target starts at once and the memory follows from the source over the same mutual TLS "
                         "(the pause does not grow with memory; the source must live until it has all crossed); "
                         "registry: the checkpoint is pushed as an image to --image and the target pulls it")
    migrate.add_argument("--image", metavar="REGISTRY/REPOSITORY[:TAG]",
                         help="registry mode: where the checkpoint image is pushed (credentials from the docker "
                         "config; without a tag: migrate-<container>-<UTC time>); the target pulls it by digest")
    migrate.add_argument("--runc", type=Path, metavar="PATH", help="lazy: the runc of containerd's runc shim "
                         "(default: runc on PATH, else the one beside the configured CRIU)")
    migrate.add_argument("--page-port", type=_port, default=0, metavar="PORT",
                         help="lazy: the port on this node where the target's page daemon fetches the memory "
                         "(TLS; default 0: one the kernel picks), for firewalls that open only known ports")
    migrate.add_argument("--no-hold", dest="hold", action="store_false",
                         help="with connections: the target claims the pod IPs only after the restore "
                         "and holds no packets (peers wait for their retransmission timer; for comparison)")
    migrate.add_argument("--no-first-part", dest="first_part", action="store_false",
                         help="lazy: the target creates the container only once the whole checkpoint has "
                         "arrived, inside the pause, instead of from its first part before anything stops "
                         "(for comparison)")
    _common(migrate)

    receiver = sub.add_parser(
        "migrate-receiver", help="accept migrations into this node (the target's end of `criu-shim migrate`)",
        description="Listen for migrations over mutual TLS; restore each arriving checkpoint into the pod the "
        "source names, through this node's criu-shim, and start it.",
        epilog=RECEIVER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    receiver.add_argument("--listen", required=True, metavar="HOST:PORT", help="address on the node network")
    receiver.add_argument("--checkpoints-dir", type=Path, help="where arriving checkpoints are written (default: "
                          "the first restore.allowed_dirs of --config, else /var/lib/kubelet/checkpoints)")
    receiver.add_argument("--address-hook", type=Path, metavar="PATH",
                          help="run `PATH claim IP VIA` to route a moved pod IP to the local pod VIA; without it, "
                          "migrations whose TCP connections follow are refused at preflight")
    _common(receiver)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r:.40}") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} out of range (0 to 65535)")
    return port


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--idle-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a transfer that moves no byte for this long (a cut link) is abandoned (default 30)")
    parser.add_argument("--runtime-endpoint", default=CRI_SOCKET, metavar="unix://PATH",
                        help="this node's criu-shim CRI socket (default: %(default)s)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="this node's criu-shim config (node-wide "
                        "checkpoint defaults, restore.allowed_dirs)")
    parser.add_argument("--cert", type=Path, default=CERTS / "node.crt", help="this node's certificate")
    parser.add_argument("--key", type=Path, default=CERTS / "node.key", help="its private key (never logged)")
    parser.add_argument("--ca", type=Path, default=CERTS / "ca.crt", help="the CA every node's certificate "
                        "chains to")


def run(args: argparse.Namespace) -> int:
    from shim import config
    from shim.migrate import channel

    socket = Path(str(args.runtime_endpoint).removeprefix("unix://"))
    if not str(args.runtime_endpoint).startswith("unix://") or not socket.is_absolute():
        raise SystemExit(f"criu-shim: --runtime-endpoint: expected unix:///absolute/path, got {args.runtime_endpoint!r}")
    settings = config.load(args.config)
    creds = channel.Credentials(args.cert, args.key, args.ca)
    if args.command == "migrate":
        from shim.migrate import registry_mode, source
        from shim.restore import unseal

        channel.parse_address(args.to)
        image = registry_mode.image_target(args.mode, args.image, settings.signing.key_file,
                                           unseal.keyring(settings.encryption))
        result = source.run(source.MigrateRequest(
            args.container, args.to, args.to_pod, socket, args.checkpoints_dir, creds, args.address_hook,
            args.name, args.checkpoint, args.keep_checkpoint, args.timeout, args.idle_timeout, settings.criu,
            settings.checkpoint, args.mode, args.runc, image, args.hold, args.first_part, args.page_port))
        print(result.lines(), flush=True)
        return 0
    from shim.migrate import receiver

    checkpoints = args.checkpoints_dir or (settings.restore.allowed_dirs[0] if settings.restore.allowed_dirs
                                           else Path("/var/lib/kubelet/checkpoints"))
    from shim.migrate import claims, compat

    return receiver.run(receiver.ReceiverSettings(args.listen, socket, checkpoints, creds, args.address_hook,
                                                  args.idle_timeout, criu=compat.installed(settings.criu),
                                                  criu_path=settings.criu,
                                                  allowed_registries=settings.restore.allowed_registries,
                                                  claims_file=settings.state_dir / claims.CLAIMS_FILE,
                                                  page_daemon=settings.restore.page_daemon,
                                                  config_file=args.config))
