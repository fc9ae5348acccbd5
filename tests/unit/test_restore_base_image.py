"""The original image a checkpoint names is pulled only from a registry the restore policy allows."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shim.api.cri.v1 import api_pb2 as cri
from shim.config import Config, RestoreSettings
from shim.errors import PermissionDenied
from shim.restore.base_image import resolve_base_image


class Containerd:
    def __init__(self) -> None:
        self.pulled: list[str] = []

    async def image_status(self, image: str) -> cri.Image | None:
        return cri.Image(id="sha256:abc") if image in self.pulled else None

    async def pull_image(self, image: str) -> None:
        self.pulled.append(image)


def _resolve(tmp_path: Path, registries: tuple[str, ...], config: dict[str, Any]) -> tuple[Containerd, str]:
    containerd = Containerd()
    settings = replace(Config(state_dir=tmp_path), restore=RestoreSettings(allowed_registries=registries))
    resolved = resolve_base_image(containerd, config, settings.restore.allowed_registries)  # type: ignore[arg-type]
    return containerd, asyncio.run(resolved)


@pytest.mark.parametrize("ref", ["evil.example.com/app@sha256:" + "0" * 64, "busybox:1", "localhost:5000/app:1"])
def test_an_image_from_a_registry_not_allowed_is_never_pulled(tmp_path: Path, ref: str) -> None:
    with pytest.raises(PermissionDenied, match=r"rule restore\.allowed_registries.*not contacted") as caught:
        _resolve(tmp_path, ("localhost",), {"rootfsImageName": ref})
    assert ref in caught.value.message


def test_an_image_from_an_allowed_registry_is_pulled(tmp_path: Path) -> None:
    containerd, image = _resolve(tmp_path, ("registry.example.com",), {"rootfsImageName": "registry.example.com/a:1"})
    assert containerd.pulled == ["registry.example.com/a:1"] and image == "sha256:abc"
