"""`criu-shim migrate --mode registry --image REF`: argument checks with garbage, the exact error texts, and
that a refusal comes before anything is contacted (the CLI never reaches the node's criu-shim)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from shim import cli
from shim.errors import InvalidArgument, PermissionDenied
from shim.migrate import registry_mode, registry_restore

HOST = "registry.example:5000"
DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("mode", "image", "expected"), [
    ("registry", None, "--mode registry needs --image REGISTRY[:PORT]/REPOSITORY[:TAG]: where the checkpoint image "
                       "is pushed (the target node pulls it from there)"),
    ("eager", f"{HOST}/a", "--image is for --mode registry; --mode eager sends the checkpoint to the target directly"),
    ("lazy", "garbage", "--image is for --mode registry; --mode lazy sends the checkpoint to the target directly"),
    ("registry", "x:1", "image reference 'x:1' must name its registry: HOST[:PORT]/REPOSITORY[:TAG]"),
    ("registry", "", "image reference '' must name its registry: HOST[:PORT]/REPOSITORY[:TAG]"),
    ("registry", "\x01/\xff", "image reference '\\x01/ÿ' must name its registry: HOST[:PORT]/REPOSITORY[:TAG]"),
    ("registry", f"{HOST}/UP", f"invalid repository name 'UP' in {HOST}/UP"),
    ("registry", f"{HOST}//a", f"invalid repository name '/a' in {HOST}//a"),
    ("registry", f"{HOST}/a:bad tag", f"invalid tag 'bad tag' in {HOST}/a:bad tag"),
    ("registry", f"{HOST}/a:" + "t" * 129, "invalid tag '" + "t" * 129),
    ("registry", f"{HOST}/a@{DIGEST}", f"push to a tag, not a digest: {HOST}/a@{DIGEST}"),
    ("registry", f"{HOST}/a@sha256:zz", f"invalid digest 'sha256:zz' in {HOST}/a@sha256:zz (sha256:<64 hex digits>)"),
    ("registry", f"{HOST}/a@", f"image reference '{HOST}/a@': empty digest"),
])
def test_image_target_refuses_garbage_with_exact_texts(mode: str, image: str | None, expected: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        registry_mode.image_target(mode, image)
    assert refused.value.message.startswith(expected)


def test_no_image_target_for_the_direct_modes() -> None:
    assert registry_mode.image_target("eager", None) is None and registry_mode.image_target("lazy", None) is None


def test_a_tag_is_kept_and_a_missing_one_names_the_container_and_the_time() -> None:
    tagged = registry_mode.image_target("registry", f"{HOST}/team/web:v1")
    assert tagged is not None and str(tagged.for_container("0123456789abcdef")) == f"{HOST}/team/web:v1"
    untagged = registry_mode.image_target("registry", f"{HOST}/team/web")
    assert untagged is not None
    assert re.fullmatch(rf"{re.escape(HOST)}/team/web:migrate-0123456789ab-\d{{8}}T\d{{6}}",
                        str(untagged.for_container("0123456789abcdef")))
    # a port in the registry part is no tag
    assert not registry_mode.image_target("registry", "localhost:5000/web").tag_given  # type: ignore[union-attr]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["migrate", "0123abcd", "--to", "10.0.0.2:7543", "--to-pod", "shop/web",
                     "--runtime-endpoint", "unix:///nonexistent/criu-shim/cri.sock", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "expected"), [
    (["--mode", "registry"], "criu-shim: --mode registry needs --image"),
    (["--mode", "registry", "--image", "web:1"], "criu-shim: image reference 'web:1' must name its registry"),
    (["--mode", "registry", "--image", f"{HOST}/web@{DIGEST}"], "criu-shim: push to a tag, not a digest"),
    (["--image", f"{HOST}/web"], "criu-shim: --image is for --mode registry; --mode eager"),
])
def test_the_cli_refuses_before_it_reaches_the_node(capsys: pytest.CaptureFixture[str], args: list[str],
                                                    expected: str) -> None:
    code, err = _cli(capsys, *args)
    # The runtime endpoint does not exist: any attempt to reach it would have said so instead.
    assert code == 1 and err.startswith(expected) and "nonexistent" not in err, err


def test_an_unknown_mode_is_argparse_s_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["migrate", "c", "--to", "h:1", "--to-pod", "p", "--mode", "via-registry"])
    assert exited.value.code == 2
    assert "argument --mode: invalid choice: 'via-registry' (choose from" in capsys.readouterr().err


def test_registry_down_is_refused_saying_nothing_was_stopped(tmp_path: Path) -> None:
    target = registry_mode.image_target("registry", "127.0.0.1:1/migrations/web", docker_config=tmp_path / "none.json")
    assert target is not None
    with pytest.raises(Exception) as refused:
        registry_mode.check(target)
    message = getattr(refused.value, "message", "")
    assert message.startswith("registry 127.0.0.1:1 is not reachable: ") and message.endswith("; nothing was stopped")


def test_a_signing_key_that_does_not_load_is_refused_before_the_registry_is_asked(tmp_path: Path) -> None:
    target = registry_mode.image_target("registry", "127.0.0.1:1/migrations/web", signing_key=tmp_path / "no.key")
    assert target is not None
    with pytest.raises(Exception) as refused:
        registry_mode.check(target)
    message = getattr(refused.value, "message", "")
    assert str(tmp_path / "no.key") in message and "not reachable" not in message, message


@pytest.mark.parametrize(("message", "expected"), [
    ({}, "migration message field 'image': expected str, got None"),
    ({"image": 7}, "migration message field 'image': expected str, got 7"),
    ({"image": "web:1"}, "image reference 'web:1' must name its registry"),
    ({"image": f"{HOST}/UP"}, "invalid repository name 'UP'"),
])
def test_the_receiver_refuses_a_garbage_image_at_preflight(message: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        registry_restore.check_preflight(message, (HOST,))
    assert expected in refused.value.message


def test_the_receiver_admits_only_its_proxy_s_registries() -> None:
    registry_restore.check_preflight({"image": f"{HOST}/migrations"}, (HOST,))
    registry_restore.check_preflight({"image": f"{HOST}/migrations"}, None)  # not told: its proxy decides
    with pytest.raises(PermissionDenied) as refused:
        registry_restore.check_preflight({"image": "other.example:5000/migrations"}, ("localhost", HOST))
    assert refused.value.message == (
        "restore from checkpoint image other.example:5000/migrations:latest refused by rule "
        "restore.allowed_registries: registry 'other.example:5000' is not in restore.allowed_registries "
        f"['localhost', '{HOST}']")


def test_the_receiver_restores_only_an_image_pinned_by_digest() -> None:
    with pytest.raises(InvalidArgument) as refused:
        registry_restore.pinned_image({"image": f"{HOST}/migrations/web:1"})
    assert refused.value.message == f"checkpoint image {HOST}/migrations/web:1 is not pinned by digest (REF@sha256:...)"
    assert registry_restore.pinned_image({"image": f"{HOST}/m/web:1@{DIGEST}"}).digest == DIGEST


def test_the_restore_refuses_a_registry_it_does_not_admit_before_any_cri_call() -> None:
    """A peer may name another image at restore than at preflight: checked again, before anything is pulled."""
    class NoRuntime:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the runtime was used: {name}")

    async def claim(pod: object) -> None:
        raise AssertionError("claimed")

    message = {"image": f"other.example:5000/m/web:1@{DIGEST}"}
    with pytest.raises(PermissionDenied) as refused:
        asyncio.run(registry_restore.restore(NoRuntime(), None, "web", message, 5.0, claim,  # type: ignore[arg-type]
                                             (HOST,)))
    assert "refused by rule restore.allowed_registries" in refused.value.message
