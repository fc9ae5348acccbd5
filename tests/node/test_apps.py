"""Real applications move into a new pod with their clients' connections and their data.

Stock Debian bookworm builds (images built by `make images` from Debian's packages, see
images/README.md): PostgreSQL 15, nginx 1.22, Redis 7.0. Each runs in pod A with
`tcp-established` and `stop-after`; a client on the host connects to the pod IP over the
node's bridge and loads data; the container is checkpointed (pod A's copy stops), pod A is
deleted, and the archive is restored into pod B, lazily (the default) and eagerly
(`restore.criu-shim.io/lazy-pages: "false"`). The same client connection then checks the data:

- Redis: 200,000 keys; `DEBUG DIGEST` (a hash of the whole dataset) and `CLIENT ID` identical.
- nginx: the keep-alive connection serves the 2 MiB file byte-identical, and the worker reports
  the same connection number with its request count going on.
- PostgreSQL: the same backend pid; row count and an md5 over every row identical; a
  transaction left open across the move sees its own rows and commits afterwards.

Users: each application runs as its own user (redis 998, www-data 33, postgres 999) where the
node lets CRIU dump other users' processes, which needs CAP_SYS_RESOURCE (CRIU reads each task's
rlimits with prlimit()). Where root lacks it (these CI VMs: "Can't get rlimit 0: Operation not
permitted"), Redis and nginx (master and workers) run as root, and PostgreSQL, which refuses to
run as root, is skipped saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.archive_layout import DEVSHM
from shim.handoff import LAZY_PLAN, RESTORE_DIR
from shim.restore.lazy import DEFER_MIN_SIZE
from tests.node.app_clients import (
    EAGER,
    MIGRATE,
    NGINX,
    NON_ROOT_DUMPS,
    POSTGRES,
    REDIS,
    Http,
    Postgres,
    Redis,
    import_app_images,
    pod_ip,
    port_open,
    restore,
    run_as,
    start,
    userns_pod,
)
from tests.node.conftest import Node, Nodes
from tests.node.pods import Cri, wait_for

pytestmark = pytest.mark.node

ROOT_ONLY_REASON = ("root lacks CAP_SYS_RESOURCE here, so CRIU cannot dump processes of other users "
                    "(prlimit: 'Can't get rlimit 0: Operation not permitted')")


@dataclass
class Moved:
    container: str
    lazy: bool  # a lazy-pages plan was made for the restore


@pytest.fixture(scope="module")
def app_images(nodes: Nodes) -> None:
    import_app_images(nodes.get("1.7").containerd)


@pytest.fixture
def client(node: Node, app_images: None, tmp_path: Path) -> Iterator[Cri]:
    c = Cri(node.cri, tmp_path / "pod-logs")
    yield c
    c.close()


def serving(client: Cri, ctr: str, ip: str, port: int) -> None:
    def up() -> bool:
        assert client.state(ctr) == "CONTAINER_RUNNING", client.log(ctr)
        return port_open(ip, port)
    wait_for(up, timeout=60, interval=0.1)


def move(client: Cri, node: Node, source: contextlib.ExitStack, ctr: str, lazy: bool,
         stack: contextlib.ExitStack, name: str, uid: int) -> Moved:
    """Checkpoint `ctr` (stop-after), delete its pod (closing `source`), restore it into a new pod
    kept open on `stack`, with the container's security context (`uid`) as a kubelet would send it.
    The archive is removed when `stack` closes."""
    archive = node.dir / "checkpoints" / f"{name}-{'lazy' if lazy else 'eager'}.tar"
    stack.callback(archive.unlink, missing_ok=True)
    client.checkpoint(ctr, str(archive))
    wait_for(lambda: client.state(ctr) == "CONTAINER_EXITED")  # stop-after: the source is gone
    source.close()  # pod A deleted: its IP is free for the restored sockets
    pod_b = stack.enter_context(client.pod(MIGRATE if lazy else MIGRATE | EAGER))
    restored = restore(client, pod_b, str(archive), name, uid)
    status = client.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=restored)).status
    planned = (Path(status.annotations[RESTORE_DIR]) / LAZY_PLAN).exists()
    # Lazy exactly when asked and when a page image is big enough to be worth deferring.
    assert planned == (lazy and _largest_pages(archive) >= DEFER_MIN_SIZE)
    assert client.state(restored) == "CONTAINER_RUNNING"
    return Moved(restored, planned)


def _largest_pages(archive: Path) -> int:
    with tarfile.open(archive) as tar:
        return max(m.size for m in tar.getmembers() if m.name.startswith("checkpoint/pages-"))


LAZY = pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])


@LAZY
def test_redis_dataset_and_connection_come_back(client: Cri, node: Node, lazy: bool) -> None:
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(contextlib.ExitStack())
        pod_a = source.enter_context(client.pod(MIGRATE))
        ip = pod_ip(client, pod_a)
        ctr = start(client, pod_a, REDIS)
        serving(client, ctr, ip, 6379)
        redis = stack.enter_context(Redis(ip))
        assert redis.call("DEBUG", "POPULATE", 200_000, "key", 64) == "OK"
        redis.call("SET", "moved", "no")
        redis.call("INCRBY", "counter", 41)
        before = redis.call("DEBUG", "DIGEST")
        client_id = redis.call("CLIENT", "ID")
        assert redis.call("DBSIZE") == 200_002

        moved = move(client, node, source, ctr, lazy, stack, "redis", run_as(REDIS))
        assert moved.lazy == lazy  # 200,000 keys are tens of MiB: a real lazy restore
        assert redis.call("DEBUG", "DIGEST") == before  # the whole dataset, byte for byte
        assert redis.call("CLIENT", "ID") == client_id  # the same connection on the server's side
        assert redis.call("DBSIZE") == 200_002
        assert redis.call("INCR", "counter") == 42
        assert redis.call("SET", "moved", "yes") == "OK"
        assert redis.call("GET", "moved") == "yes"
        assert redis.call("CONFIG", "GET", "port") == ["port", "6379"]
        uid = client.exec(moved.container, "cat", "/proc/1/status")
        assert f"Uid:\t{run_as(REDIS)}\t" in uid


@LAZY
def test_nginx_keep_alive_connection_serves_the_same_file(client: Cri, node: Node, lazy: bool) -> None:
    user = f"user {'www-data' if NON_ROOT_DUMPS else 'root'};"  # the workers' user (a root master switches)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(contextlib.ExitStack())
        pod_a = source.enter_context(client.pod(MIGRATE))
        ip = pod_ip(client, pod_a)
        # The master starts as root, as nginx's packaging does; its workers run as `user`.
        ctr = start(client, pod_a, NGINX, ["-g", f"daemon off; {user}"], uid=0)
        serving(client, ctr, ip, 8080)
        web = stack.enter_context(Http(ip))
        body, response = web.get("/blob.bin")
        assert response.status == 200 and len(body) == 2 << 20
        conn, requests = response.headers["X-Connection"].split()
        digest = hashlib.sha256(body).hexdigest()

        moved = move(client, node, source, ctr, lazy, stack, "nginx", 0)
        again, response = web.get("/blob.bin")
        assert response.status == 200
        assert hashlib.sha256(again).hexdigest() == digest and again == body
        # The same worker connection (nginx numbers them), its request count going on.
        assert response.headers["X-Connection"].split() == [conn, str(int(requests) + 1)]
        missing, response = web.get("/missing")
        assert response.status == 404
        worker_uid = 33 if NON_ROOT_DUMPS else 0
        assert [p for p in processes(client, moved.container) if p.startswith("nginx: worker")] == [
            f"nginx: worker process uid={worker_uid}"] * 2


def processes(client: Cri, ctr: str) -> list[str]:
    """'<cmdline> uid=<real uid>' for each process of the container."""
    script = ("for p in /proc/[0-9]*; do [ -r $p/cmdline ] || continue; "
              "echo \"$(tr '\\0' ' ' <$p/cmdline | sed 's/ *$//') uid=$(awk '/^Uid:/ {print $2}' $p/status)\"; done")
    return client.exec(ctr, "sh", "-c", script).splitlines()


def _table_digest(pg: Postgres) -> tuple[object, ...]:
    return pg.one("SELECT count(*), sum(id), md5(string_agg(id::text || ':' || payload, ',' ORDER BY id)) FROM items")


@pytest.mark.skipif(not NON_ROOT_DUMPS, reason=f"PostgreSQL refuses to run as root and {ROOT_ONLY_REASON}")
@LAZY
def test_postgres_session_and_open_transaction_come_back(client: Cri, node: Node, lazy: bool) -> None:
    """Stock settings: dynamic shared memory in /dev/shm (POSIX), which travels with the container."""
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(contextlib.ExitStack())
        pod_a = source.enter_context(client.pod(MIGRATE))
        ip = pod_ip(client, pod_a)
        ctr = start(client, pod_a, POSTGRES)
        pg = _connect(client, ctr, ip)
        stack.enter_context(pg)
        committed, backend, in_flight = _load(pg)

        moved = move(client, node, source, ctr, lazy, stack, "postgres", POSTGRES.user)
        assert pg.one("SELECT pg_backend_pid()") == backend  # the same session, the same backend
        assert _table_digest(pg) == in_flight  # the open transaction sees its own rows
        pg.run("COMMIT")
        with Postgres(ip) as other:  # a new session sees everything, committed after the move
            assert other.one("SELECT count(*) FROM items") == (201_000,)
            assert other.one("SELECT count(*), sum(id) FROM items WHERE id <= 200000") == committed[:2]
        uid = client.exec(moved.container, "cat", "/proc/1/status")
        assert f"Uid:\t{POSTGRES.user}\t" in uid


def _load(pg: Postgres) -> tuple[tuple[object, ...], tuple[object, ...], tuple[object, ...]]:
    """200,000 committed rows, then a transaction left open with 1,000 more: (committed digest,
    backend pid, digest the open transaction sees)."""
    assert pg.one("SHOW dynamic_shared_memory_type") == ("posix",)  # stock: segments in /dev/shm
    pg.run("CREATE TABLE items (id int PRIMARY KEY, payload text NOT NULL)")
    pg.run("INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 200000) g")
    committed = _table_digest(pg)
    backend = pg.one("SELECT pg_backend_pid()")
    pg.run("BEGIN")
    pg.run("INSERT INTO items SELECT g, 'in flight' FROM generate_series(200001, 201000) g")
    return committed, backend, _table_digest(pg)


@pytest.mark.skipif(NON_ROOT_DUMPS, reason="this node dumps non-root processes: the full PostgreSQL move runs")
def test_postgres_in_a_pod_user_namespace_is_checkpointed_here_but_criu_cannot_restore_it(
        client: Cri, node: Node) -> None:
    """What this machine allows of stock PostgreSQL: where root lacks CAP_SYS_RESOURCE, a pod user
    namespace (CRI userns_options) is the one way to checkpoint postgres (uid 999, host uid 100999):
    root owns that namespace, so CRIU may read its rlimits. The dump works, with the client's
    connection, an open transaction and the /dev/shm segments. CRIU 4.2 cannot restore it into a
    pod: the restored task, already in its new user namespace, may not join the pod's network
    namespace (checkpoint-restore/criu#2651). Both are checked, so the suite notices when CRIU can."""
    archive = node.dir / "checkpoints" / "postgres-userns.tar"
    with contextlib.ExitStack() as stack:
        stack.callback(archive.unlink, missing_ok=True)
        source = stack.enter_context(contextlib.ExitStack())
        pod_a = source.enter_context(userns_pod(client, MIGRATE))
        ip = pod_ip(client, pod_a)
        ctr = start(client, pod_a, POSTGRES, uid=POSTGRES.user, userns=True)
        pg = _connect(client, ctr, ip)
        stack.callback(_close_quietly, pg)  # its server is gone by the end
        _load(pg)
        # Our session's backend, as uid 999 inside, its transaction open.
        assert [p for p in processes(client, ctr) if p.startswith("postgres: postgres postgres ")
                and "idle in transaction" in p and p.endswith(f"uid={POSTGRES.user}")]
        client.checkpoint(ctr, str(archive))
        wait_for(lambda: client.state(ctr) == "CONTAINER_EXITED")
        assert [n for n in _devshm_names(archive) if n.startswith("PostgreSQL.")], "no DSM segment saved"
        source.close()
        pod_b = stack.enter_context(userns_pod(client, MIGRATE))
        with pytest.raises(grpc.RpcError) as caught:
            restore(client, pod_b, str(archive), POSTGRES.name, POSTGRES.user, userns=True)
        details = caught.value.details() or ""
        assert "Can't setns" in details and "net" in details, details


def _close_quietly(pg: Postgres) -> None:
    with contextlib.suppress(Exception):
        pg.close()


def _devshm_names(archive: Path) -> list[str]:
    with tarfile.open(archive) as outer:
        member = outer.extractfile(DEVSHM)
        assert member is not None, f"{DEVSHM} missing from the archive"
        with tarfile.open(fileobj=member) as inner:
            return [m.name.removeprefix("./") for m in inner.getmembers()]


def _connect(client: Cri, ctr: str, ip: str) -> Postgres:
    found: list[Postgres] = []

    def ready() -> bool:
        assert client.state(ctr) == "CONTAINER_RUNNING", client.log(ctr)
        try:
            found.append(Postgres(ip))
            return True
        except Exception:  # refused, or "the database system is starting up"
            return False
    wait_for(ready, timeout=60, interval=0.2)
    return found[0]
