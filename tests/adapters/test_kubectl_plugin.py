"""kubectl-checkpoint's arguments and error handling against a fake API server on loopback (plain HTTP,
a kubeconfig with two contexts): what the plugin asks, how it words 401/403/404/500 and an unreachable
server, and that refusals before the kubelet call send no checkpoint request. Pure parts: the container
choice and the restore pod."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from shim import annotations
from shim.errors import FailedPrecondition, InvalidArgument
from shim.kubectl import cli, plan
from shim.kubectl.cluster import container_state, status_message

POD = {"metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"},
                    "annotations": {plan.LAST_APPLIED: "{}", "checkpoint.criu-shim.io/tcp-established": "true"}},
       "spec": {"nodeName": "node-1", "hostname": "web", "containers": [{"name": "app", "image": "x/app:1"},
                                                                        {"name": "side", "image": "x/side:1"}]},
       "status": {"phase": "Running"}}


class FakeApi(BaseHTTPRequestHandler):
    """GET pods and nodes from `objects`; POST .../proxy/checkpoint/... answers `checkpoint` (status, body)."""

    objects: ClassVar[dict[str, dict[str, Any]]] = {}
    checkpoint: ClassVar[tuple[int, str]] = (200, '{"items":["/var/lib/kubelet/checkpoints/x.tar"]}')
    seen: ClassVar[list[str]] = []
    created: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: str, kind: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(f"GET {self.path} {self.headers.get('Authorization', '')}")
        path = self.path.split("?")[0]
        if path in self.objects:
            self._send(200, json.dumps(self.objects[path]))
        else:
            name = path.rsplit("/", 1)[-1]
            self._send(404, json.dumps({"kind": "Status", "status": "Failure", "reason": "NotFound",
                                        "message": f'pods "{name}" not found', "code": 404}))

    def do_POST(self) -> None:  # noqa: N802
        self.seen.append(f"POST {self.path}")
        if self.path.endswith("/pods"):  # a created pod runs at once
            pod = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.created.append(pod)
            name = pod["metadata"]["name"]
            self.objects[f"{self.path}/{name}"] = {**pod, "status": {"phase": "Running", "containerStatuses": [
                {"name": c["name"], "state": {"running": {}}} for c in pod["spec"]["containers"]]}}
            self._send(201, json.dumps(pod))
            return
        status, body = self.checkpoint
        self._send(status, body, "application/json" if body.startswith("{") else "text/plain")


    def do_DELETE(self) -> None:  # noqa: N802
        self.seen.append(f"DELETE {self.path}")
        gone = self.objects.pop(self.path, None)
        self._send(200 if gone else 404, json.dumps(gone or {"kind": "Status", "code": 404}))


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    FakeApi.objects = {"/api/v1/namespaces/shop/pods/web": POD, "/api/v1/namespaces/default/pods/web": POD,
                       "/api/v1/nodes/node-1": {"metadata": {"name": "node-1"}}}
    FakeApi.checkpoint = (200, '{"items":["/var/lib/kubelet/checkpoints/x.tar"]}')
    FakeApi.seen = []
    FakeApi.created = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "admin",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "admin", "user": {"token": "admin-token"}}, {"name": "dev", "user": {"token": "dev-token"}}],
        "contexts": [{"name": "admin", "context": {"cluster": "c", "user": "admin"}},
                     {"name": "dev", "context": {"cluster": "c", "user": "dev", "namespace": "shop"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv(cli.REGISTRY_ENV, raising=False)
    try:
        yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()


def test_checkpoint_asks_the_node_proxy_and_prints_the_path(api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["web", "-c", "app"]) == 0
    assert capsys.readouterr().out == "/var/lib/kubelet/checkpoints/x.tar\n"
    assert FakeApi.seen[0] == "GET /api/v1/namespaces/default/pods/web Bearer admin-token"
    assert FakeApi.seen[1] == "POST /api/v1/nodes/node-1/proxy/checkpoint/default/web/app?timeout=120"


def test_the_context_gives_user_and_namespace(api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pod/web", "-c", "side", "--context", "dev", "--timeout", "7"]) == 0
    assert FakeApi.seen[0] == "GET /api/v1/namespaces/shop/pods/web Bearer dev-token"
    assert FakeApi.seen[1] == "POST /api/v1/nodes/node-1/proxy/checkpoint/shop/web/side?timeout=7"


@pytest.mark.parametrize(("status", "body", "expected"), [
    (403, json.dumps({"kind": "Status", "message": 'nodes "node-1" is forbidden: User "dev" cannot create resource '
                      '"nodes/proxy"', "code": 403}),
     'forbidden by RBAC (HTTP 403): nodes "node-1" is forbidden: User "dev" cannot create resource "nodes/proxy" '
     "(checkpointing needs the `create` verb on `nodes/proxy` for node node-1)"),
    (500, "checkpointing of default/web/app failed (rpc error: code = Unknown desc = CRIU binary not found)",
     "the kubelet on node node-1 answered HTTP 500: checkpointing of default/web/app failed (rpc error: code = "
     "Unknown desc = CRIU binary not found)"),
    (404, "404 page not found", "answered HTTP 404: 404 page not found (is the ContainerCheckpoint feature gate"),
    (404, "pod does not exist", "the kubelet on node node-1 answered HTTP 404: pod does not exist"),
    (200, '{"items": []}', "not {\"items\": [PATH]}"),
])
def test_kubelet_and_rbac_errors_are_shown_as_given(api: Path, capsys: pytest.CaptureFixture[str], status: int,
                                                    body: str, expected: str) -> None:
    FakeApi.checkpoint = (status, body)
    assert cli.main(["web", "-c", "app"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint of container app of pod web in namespace default") or status == 200
    assert expected in err and "Traceback" not in err


def test_refusals_before_the_kubelet_call_checkpoint_nothing(api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["nope"]) == 1
    assert 'pod nope in namespace default: not found (HTTP 404): pods "nope" not found' in capsys.readouterr().err
    assert cli.main(["web"]) == 1
    assert "pod web has 2 containers: choose one with -c: [app side]" in capsys.readouterr().err
    assert cli.main(["web", "-c", "nope"]) == 1
    assert "container nope is not valid for pod web: choose one of: [app side]" in capsys.readouterr().err
    assert cli.main(["deploy/web"]) == 1
    assert "only pods can be checkpointed" in capsys.readouterr().err
    assert cli.main(["Bad_Name"]) == 1
    assert "invalid pod name" in capsys.readouterr().err
    assert cli.main(["restore", "web", "-c", "app"]) == 1
    assert "Pass --registry HOST[:PORT] or set KUBECTL_CHECKPOINT_REGISTRY" in capsys.readouterr().err
    assert cli.main(["migrate", "web", "-c", "app", "--to-node", "node-9", "--registry", "r.example"]) == 1
    assert 'node node-9: not found (HTTP 404): pods "node-9" not found' in capsys.readouterr().err
    assert cli.main(["restore", "web", "-c", "app", "--from", "no-registry:1"]) == 1
    assert "must name its registry" in capsys.readouterr().err
    # A registry or repository that could never name an image, and a --name taken, are refused before the
    # kubelet is asked: no archive on the node, no pod.
    for flags, text in ((["--registry", "bad host!"], "invalid registry 'bad host!': HOST[:PORT]"),
                        (["--registry", "http://r.example"], "invalid registry 'http://r.example'"),
                        (["--registry", "r.example", "--repository", "Up/Case"], "invalid repository 'Up/Case'"),
                        (["--registry", "r.example", "--repository", "a//b"], "invalid repository 'a//b'"),
                        (["--registry", "r.example", "-n", "shop", "--name", "web"],
                         "pod web already exists in namespace shop: choose another --name"),
                        (["--registry", "r.example", "--name", "Bad_Name"], "invalid pod name 'Bad_Name'")):
        assert cli.main(["restore", "web", "-c", "app", *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and "Traceback" not in err, (flags, err)
    assert cli.main(["restore", "web", "-c", "app", "--registry", "r.example", "--from", "checkpoint-x.tar"]) == 1
    assert "'checkpoint-x.tar' is not a kubelet checkpoint archive name" in capsys.readouterr().err
    for flag, value in (("--timeout", "0"), ("--timeout", "-5"), ("--timeout", "x"), ("--wait-timeout", "nan"),
                        ("--wait-timeout", "inf"), ("--wait-timeout", "-1")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["restore", "web", "-c", "app", "--registry", "r.example", flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err
    assert not [s for s in FakeApi.seen if s.startswith("POST")] and not FakeApi.created


def test_json_output_is_json_whatever_the_path(api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FakeApi.checkpoint = (200, json.dumps({"items": ['/var/lib/kubelet/checkpoints/a "b"\\c.tar']}))
    assert cli.main(["web", "-c", "app", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"items": ['/var/lib/kubelet/checkpoints/a "b"\\c.tar']}


def test_restore_from_an_archive_path_names_the_image_the_node_published(
        api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = "/var/lib/kubelet/checkpoints/checkpoint-web_shop-app-2026-12-05T00:41:02Z.tar"
    assert cli.main(["restore", "web", "-c", "app", "-n", "shop", "--from", archive, "--registry", "r.example:5000",
                     "--no-verify", "--node", "node-1"]) == 0
    image = "r.example:5000/criu-shim/checkpoints/web_shop-app:2026-12-05T00-41-02Z"
    out = capsys.readouterr().out
    assert f"image: {image}" in out and "pod/web-20261205t004102z running" in out
    (pod,) = FakeApi.created
    assert pod["metadata"]["name"] == "web-20261205t004102z" and pod["spec"]["nodeName"] == "node-1"
    assert pod["spec"]["containers"][0]["image"] == image
    assert not [s for s in FakeApi.seen if "/proxy/checkpoint/" in s]  # an archive given: no new checkpoint


def test_migrate_checkpoints_restores_and_then_deletes_the_source(
        api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = "/var/lib/kubelet/checkpoints/checkpoint-web_shop-app-2026-12-05T00:41:02Z.tar"
    FakeApi.checkpoint = (200, json.dumps({"items": [archive]}))
    assert cli.main(["migrate", "web", "-c", "app", "-n", "shop", "--to-node", "node-1", "--registry",
                     "r.example:5000", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {archive} (node node-1)" in out and "pod/web deleted" in out
    (pod,) = FakeApi.created
    assert pod["metadata"]["name"] == "web-20261205t004102z"
    assert pod["spec"]["containers"][0]["image"] == \
        "r.example:5000/criu-shim/checkpoints/web_shop-app:2026-12-05T00-41-02Z"
    posts = [s for s in FakeApi.seen if s.startswith(("POST", "DELETE"))]
    assert posts == ["POST /api/v1/nodes/node-1/proxy/checkpoint/shop/web/app?timeout=120",
                     "POST /api/v1/namespaces/shop/pods", "DELETE /api/v1/namespaces/shop/pods/web"]


def test_missing_flags_and_help(api: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["migrate", "web"])
    assert exit_.value.code == 2 and "--to-node" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "examples:" in out and "kubectl checkpoint migrate web --to-node" in out
    assert "[export] registry" in out


def test_an_unreachable_server_or_kubeconfig_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert cli.main(["web"]) == 1
    assert f"error: cannot load kubeconfig {tmp_path / 'missing'}" in capsys.readouterr().err
    config = tmp_path / "config"
    config.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "x",
                                  "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                                  "users": [{"name": "u", "user": {"token": "t"}}],
                                  "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert cli.main(["web"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the API server http://127.0.0.1:1") and err.count("\n") == 1
    assert cli.main(["web", "--context", "nope"]) == 1
    assert "cannot load kubeconfig" in capsys.readouterr().err


def test_tls_to_a_plain_http_server_is_one_line(api: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads(api.read_text())
    config["clusters"][0]["cluster"] = {"server": config["clusters"][0]["cluster"]["server"].replace("http:", "https:"),
                                        "insecure-skip-tls-verify": True}
    api.write_text(json.dumps(config))
    assert cli.main(["web"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the API server https://127.0.0.1:") and err.count("\n") == 1, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- pure parts

def test_restore_pod_copies_spec_and_annotations_not_labels() -> None:
    pod = plan.restore_pod(POD, "app", "r.example/c:1@sha256:" + "a" * 64, "web-copy", "node-2")
    assert pod["metadata"] == {"name": "web-copy", "namespace": "shop", "annotations": {
        "checkpoint.criu-shim.io/tcp-established": "true", annotations.RESTORED_FROM: "shop/web/app",
        annotations.RESTORED_IMAGE: "r.example/c:1@sha256:" + "a" * 64}}
    assert pod["spec"]["nodeName"] == "node-2" and "hostname" not in pod["spec"]
    assert pod["spec"]["containers"][0]["image"].startswith("r.example/c:1@")
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    assert pod["spec"]["containers"][1] == {"name": "side", "image": "x/side:1"}
    assert POD["spec"]["containers"][0]["image"] == "x/app:1"  # type: ignore[index]  # the source is untouched
    labelled = plan.restore_pod(POD, "app", "i", "c", None, copy_labels=True)
    assert labelled["metadata"]["labels"] == {"app": "web"} and "nodeName" not in labelled["spec"]
    with pytest.raises(InvalidArgument, match="invalid pod name"):
        plan.restore_pod(POD, "app", "i", "-bad", None)


def test_container_choice_and_node() -> None:
    single = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "only"}]}}
    assert plan.choose_container(single, None) == "only"
    default = {"metadata": {"name": "p", "annotations": {plan.DEFAULT_CONTAINER: "b"}},
               "spec": {"containers": [{"name": "a"}, {"name": "b"}]}}
    assert plan.choose_container(default, None) == "b"
    with pytest.raises(FailedPrecondition, match="is not on a node yet"):
        plan.node_of({"metadata": {"name": "p", "namespace": "n"}, "spec": {}})


def test_container_states_and_status_messages() -> None:
    def pod(state: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
        return {"status": {"phase": phase, "containerStatuses": [{"name": "c", "state": state}]}}

    assert container_state(pod({"running": {}}), "c")[0] == "running"
    refused = pod({"waiting": {"reason": "CreateContainerError", "message": "restore refused by rule x"}})
    assert container_state(refused, "c") == ("waiting", "container c waiting: CreateContainerError: restore "
                                             "refused by rule x", True)
    assert container_state(pod({"waiting": {"reason": "ContainerCreating"}}), "c")[2] is False
    assert container_state(pod({}, "Failed"), "c")[2] is True
    assert status_message(b'{"kind":"Status","message":"m"}') == "m"
    assert status_message(b"plain text\n") == "plain text"
