"""`kubectl checkpoint`: checkpoint, restore and migrate containers through the API server (no node access).

Installed as the console script `kubectl-checkpoint`, which kubectl runs as the `checkpoint` subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import Any

from shim.errors import FailedPrecondition, InvalidArgument, ShimError
from shim.export import DEFAULT_REPOSITORY, check_destination, kubelet_reference
from shim.image_reference import Reference
from shim.kubectl import plan
from shim.kubectl.cluster import Cluster, Target
from shim.registry import RegistryClient

REGISTRY_ENV = "KUBECTL_CHECKPOINT_REGISTRY"
ACTIONS = ("restore", "migrate")

EXAMPLES = f"""\
examples:
  # checkpoint container "app" of pod "web" (the archive stays on the pod's node; its path is printed)
  kubectl checkpoint web -c app -n shop

  # checkpoint "web" now and restore it into a new pod "web-copy" on the same node
  kubectl checkpoint restore web --name web-copy --registry registry.example:5000

  # restore from a checkpoint taken earlier (the path `kubectl checkpoint` printed), onto node-2
  kubectl checkpoint restore web --from /var/lib/kubelet/checkpoints/checkpoint-web_shop-app-2026-12-05T00:41:02Z.tar \\
      --node node-2 --registry registry.example:5000

  # move "web" to node-2: checkpoint, restore there, delete the source once the copy runs
  kubectl checkpoint migrate web --to-node node-2 --registry registry.example:5000

How the archive reaches the registry: criu-shim on each node publishes every kubelet checkpoint
(config `[export] registry = "HOST:PORT"`) as REGISTRY/{DEFAULT_REPOSITORY}/<pod>_<ns>-<ctr>:<time>,
derived from the archive's file name; this plugin derives the same reference. --registry (or
${REGISTRY_ENV}) must name that registry. Credentials for it come from $DOCKER_CONFIG/config.json or
~/.docker/config.json; the cluster's from KUBECONFIG / --kubeconfig and --context, as for kubectl.
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pod", metavar="POD", help="the pod (NAME or pod/NAME)")
    parser.add_argument("-c", "--container", help="the container (default: the pod's only or default container)")
    parser.add_argument("-n", "--namespace", help="the pod's namespace (default: the context's, else default)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context to use")
    parser.add_argument("--timeout", type=_positive(int), default=120, metavar="SECONDS",
                        help="how long the kubelet may take to checkpoint (default 120)")


def _restoring(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", default=os.environ.get(REGISTRY_ENV), metavar="HOST[:PORT]",
                        help=f"where the nodes publish checkpoints ([export] registry; default ${REGISTRY_ENV})")
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY,
                        help=f"the nodes' [export] repository (default {DEFAULT_REPOSITORY})")
    parser.add_argument("--name", help="name of the new pod (default: POD-<checkpoint time>)")
    parser.add_argument("--copy-labels", action="store_true",
                        help="give the new pod the source's labels (Services then select it; so would a "
                        "ReplicaSet that owns the source, which may delete pods beyond its count)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not look the image up in the registry from here (the node still pulls it); "
                        "the pod then names it by tag instead of digest")
    parser.add_argument("--wait-timeout", type=_positive(float), default=180.0, metavar="SECONDS",
                        help="how long to wait for the new pod to run (default 180)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl checkpoint", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        usage="kubectl checkpoint POD [-c CONTAINER] [-n NAMESPACE] [options]\n"
              "       kubectl checkpoint restore POD [--from ARCHIVE|IMAGE] [--name NEW] [--node NODE] [options]\n"
              "       kubectl checkpoint migrate POD --to-node NODE [--keep-source] [options]",
        description="Checkpoint a running container through the kubelet checkpoint API (the API server's node "
        "proxy: POST /api/v1/nodes/NODE/proxy/checkpoint/NS/POD/CONTAINER) and print the archive's path on the "
        "node; restore it into a new pod; or migrate a pod to another node. Restores need criu-shim on the "
        "target node with restore enabled and the registry allowed.")
    _common(parser)
    parser.add_argument("-o", "--output", choices=["path", "json"], default="path",
                        help="print the archive's path (default) or the kubelet's JSON answer")
    return parser


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(value: str) -> int | float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
        if not 0 < number < 86400:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"expected seconds between 0 and 86400, got {value!r}")
        return number
    return parse


def _action_parser(action: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"kubectl checkpoint {action}", description=description, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    _restoring(parser)
    return parser


def restore_parser() -> argparse.ArgumentParser:
    parser = _action_parser("restore", "Restore container CONTAINER of POD into a new pod: from a checkpoint taken "
                            "now, or --from the archive path `kubectl checkpoint` printed, or --from a checkpoint "
                            "image reference. The new pod copies POD's spec and annotations, with the container's "
                            "image set to the checkpoint image.")
    parser.add_argument("--from", dest="source", metavar="ARCHIVE|IMAGE",
                        help="a kubelet archive path (its name gives the published image) or an image reference")
    parser.add_argument("--node", help="node for the new pod (default: POD's node)")
    return parser


def migrate_parser() -> argparse.ArgumentParser:
    parser = _action_parser("migrate", "Move POD to node NODE: checkpoint its container, restore it into a new pod "
                            "bound to NODE, and once that pod runs delete POD (unless --keep-source). If the new pod "
                            "does not run, it is deleted and POD is left as it is.")
    parser.add_argument("--to-node", required=True, metavar="NODE", help="the node to move to")
    parser.add_argument("--keep-source", action="store_true", help="leave the source pod running")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in ACTIONS:
            action = args.pop(0)
            parsed = (restore_parser() if action == "restore" else migrate_parser()).parse_args(args)
            return _restore(parsed, migrate=action == "migrate")
        return _checkpoint(build_parser().parse_args(args))
    except ShimError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


def _pod_name(value: str) -> str:
    kind, slash, name = value.partition("/")
    if slash:
        if kind not in ("pod", "pods", "po"):
            raise InvalidArgument(f"{value}: only pods can be checkpointed")
        value = name
    return plan.check_name(value)


def _open(args: argparse.Namespace) -> tuple[Cluster, Target]:
    cluster = Cluster(args.kubeconfig, args.context)
    return cluster, Target(args.namespace or cluster.default_namespace, _pod_name(args.pod))


def _checkpoint(args: argparse.Namespace) -> int:
    cluster, target = _open(args)
    try:
        pod = cluster.pod(target)
        container = plan.choose_container(pod, args.container)
        path = cluster.checkpoint(plan.node_of(pod), target, container, args.timeout)
    finally:
        cluster.close()
    print(path if args.output == "path" else json.dumps({"items": [path]}))
    return 0


def _restore(args: argparse.Namespace, migrate: bool) -> int:
    cluster, target = _open(args)
    try:
        source = cluster.pod(target)
        container = plan.choose_container(source, args.container)
        if args.name and cluster.pod_or_none(Target(target.namespace, plan.check_name(args.name))) is not None:
            raise FailedPrecondition(f"pod {args.name} already exists in namespace {target.namespace}: "
                                     "choose another --name")
        node = args.to_node if migrate else (args.node or plan.node_of(source))
        ref = _checkpoint_image(args, cluster, source, target, container, None if migrate else args.source, node)
        image = ref if args.no_verify else _pinned(ref)
        print(f"image: {image}")
        name = args.name or _default_name(target.pod, ref)
        cluster.create_pod(target.namespace, plan.restore_pod(source, container, str(image), name, node,
                                                              args.copy_labels))
        print(f"pod/{name} created on node {node}")
        _wait_for_copy(args, cluster, target, Target(target.namespace, name), container, migrate)
    finally:
        cluster.close()
    return 0


def _checkpoint_image(args: argparse.Namespace, cluster: Cluster, source: dict[str, Any], target: Target,
                      container: str, from_: str | None, node: str) -> Reference:
    """The checkpoint image to restore: --from IMAGE as given, else the one the node published for
    --from ARCHIVE or for a checkpoint taken now. Every refusal comes before that checkpoint."""
    by_archive = from_ is None or from_.startswith("/") or from_.startswith("checkpoint-")
    given = None if by_archive or from_ is None else Reference.parse(from_)
    if by_archive:
        _published(args, "")  # which registry: asked before anything is checkpointed
    cluster.node(node)  # a typo in --node is refused before anything is checkpointed
    if given is not None:
        return given
    if from_ is None:
        from_ = cluster.checkpoint(plan.node_of(source), target, container, args.timeout)
        print(f"checkpoint: {from_} (node {plan.node_of(source)})")
    published = _published(args, PurePosixPath(from_).name)
    assert published is not None  # a name was given
    return published


def _wait_for_copy(args: argparse.Namespace, cluster: Cluster, source: Target, copy: Target, container: str,
                   migrate: bool) -> None:
    """Until the copy runs; then a migration deletes the source. A migration whose copy does not run
    deletes the copy, and the source is left as it was: nothing half-moved."""
    try:
        cluster.wait_running(copy, container, args.wait_timeout)
    except ShimError:
        if migrate:
            cluster.delete_pod(copy)
            print(f"pod/{copy.pod} deleted; pod/{source.pod} left running", file=sys.stderr)
        raise
    print(f"pod/{copy.pod} running")
    if migrate and not args.keep_source:
        cluster.delete_pod(source)
        print(f"pod/{source.pod} deleted")


def _published(args: argparse.Namespace, archive_name: str) -> Reference | None:
    """The reference the node published `archive_name` under; with no name, only checks --registry and
    --repository (before anything is checkpointed)."""
    if not args.registry:
        raise InvalidArgument(f"which registry do the nodes publish checkpoints to? Pass --registry HOST[:PORT] "
                              f"or set {REGISTRY_ENV} (the nodes' criu-shim [export] registry)")
    check_destination(args.registry, args.repository)
    return kubelet_reference(archive_name, args.registry, args.repository) if archive_name else None


def _pinned(ref: Reference) -> Reference:
    """ref@digest, looked up in the registry: the pod gets exactly this image, and a node that did not
    publish it (no [export] registry, or a failed push) is reported here rather than as a pull error."""
    try:
        with RegistryClient(ref.registry) as client:
            _, _, digest = client.manifest(ref)
    except ShimError as exc:
        raise type(exc)(f"checkpoint image {ref} is not available: {exc.message} (criu-shim on the node "
                        "publishes kubelet checkpoints only when its config sets [export] registry; its log "
                        "says why a push failed)") from None
    return ref.with_digest(digest)


def _default_name(pod: str, ref: Reference) -> str:
    """POD-<checkpoint time as digits>, dropping an earlier such suffix (A -> B -> C keeps a short name)."""
    base = re.sub(r"-\d{8}t\d{6}z?$", "", pod)
    stamp = re.sub(r"[^0-9tz]", "", (ref.tag or "").lower())[:16] or "restored"
    return f"{base[:253 - len(stamp) - 1]}-{stamp}"
