"""`migrate --mode registry`'s registry check against real docker-registry (distribution): what a migration
learns before it stops anything. A push is accepted or refused with the push command's own words (the
credentials of the docker config; none, wrong), and the check itself leaves no upload behind."""

from __future__ import annotations

import base64
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.errors import ShimError
from shim.migrate import registry_mode
from tests.adapters.test_push_token import TokenService, token_registry  # noqa: F401 (a fixture)
from tests.support import registries

with warnings.catch_warnings():  # crypt (deprecated, in 3.11 still): bcrypt for distribution's htpasswd
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt

pytestmark = pytest.mark.skipif(not os.access(registries.REGISTRY_BIN, os.X_OK),
                                reason=f"{registries.REGISTRY_BIN} missing")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("plain-registry")
    with registries.plain(directory) as host:
        yield host, directory / "storage"


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("basic-registry")
    (directory / "htpasswd").write_text(f"ckpt:{crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    auth = f"  htpasswd:\n    realm: test\n    path: {registries.yaml_string(str(directory / 'htpasswd'))}"
    with registries.with_auth(directory, auth, "Basic") as host:
        yield host


def _config(directory: Path, host: str, user: str, password: str) -> Path:
    directory.mkdir(exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return directory / "config.json"


def _check(image: str, docker_config: Path) -> None:
    target = registry_mode.image_target("registry", image, docker_config=docker_config)
    assert target is not None
    registry_mode.check(target)


def test_a_plain_registry_passes_and_keeps_no_upload(plain: tuple[str, Path], tmp_path: Path) -> None:
    host, storage = plain
    _check(f"{host}/migrations/web", tmp_path / "none.json")
    # An open upload has its data and start time; a cancelled one keeps at most distribution's hash state.
    uploads = [p for p in storage.rglob("_uploads/*/*") if p.name in ("data", "startedat")]
    assert list(storage.rglob("_uploads/*")) and not uploads, f"the check left an upload open: {uploads}"


def test_credentials_of_the_docker_config_are_checked_before_anything_stops(basic: str, tmp_path: Path) -> None:
    _check(f"{basic}/migrations/web", _config(tmp_path / "good", basic, "ckpt", "s3cret"))

    with pytest.raises(ShimError) as wrong:
        _check(f"{basic}/migrations/web", _config(tmp_path / "bad", basic, "ckpt", "wrong"))
    assert "HTTP 401" in wrong.value.message and wrong.value.message.endswith("; nothing was stopped")
    assert "wrong" not in wrong.value.message.replace("(none there for it, or wrong)", "")  # never the password

    missing = tmp_path / "empty" / "config.json"
    with pytest.raises(ShimError) as none:
        _check(f"{basic}/migrations/web", missing)
    assert none.value.message == (f"registry {basic} asks for a user name and password (Basic) and {missing} has none "
                                  "for it; nothing was stopped")


def test_a_token_service_grants_the_push_scope_before_anything_stops(
        token_registry: str, tmp_path: Path) -> None:  # noqa: F811 (the fixture imported above)
    """Docker Hub's, GHCR's, Harbor's way: the check's upload asks for (and gets) pull,push on the repository;
    a wrong password is the token service's refusal, with push's words."""
    TokenService.granted.clear()
    _check(f"{token_registry}/migrations/web", _config(tmp_path / "good", token_registry, "ckpt", "s3cret"))
    scopes = [(scope.rsplit(":", 1)[0], set(scope.rsplit(":", 1)[1].split(","))) for scope in TokenService.granted]
    assert ("repository:migrations/web", {"pull", "push"}) in scopes, TokenService.granted

    bad = _config(tmp_path / "bad", token_registry, "ckpt", "wrong")
    with pytest.raises(ShimError) as refused:
        _check(f"{token_registry}/migrations/web", bad)
    assert f"refused the credentials of {bad}" in refused.value.message
    assert refused.value.message.endswith("; nothing was stopped")
