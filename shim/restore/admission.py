"""Who may restore what, where: the rules of shim.policy applied to one CreateContainer.

The rules themselves are pure (shim.policy). This is where their facts come
from: the new pod's from containerd (never from the request, which the caller
wrote), the archive's real path from the filesystem, the checkpoint's own
namespace from its spec once unpacked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shim import policy
from shim.api.cri.v1 import api_pb2 as cri
from shim.config import Config
from shim.containerd import Containerd
from shim.restore.image import CheckpointImage


class RestoreAdmission:
    def __init__(self, containerd: Containerd, config: Config) -> None:
        self._containerd = containerd
        self._config = config

    def require_enabled(self, image: str) -> None:
        policy.require_restore_enabled(self._config.restore.enabled, image)

    async def pod(self, request: cri.CreateContainerRequest) -> None:
        """The new pod may receive a restore; its facts come from containerd, not the request."""
        sandbox = await self._containerd.sandbox_status(request.pod_sandbox_id)
        facts = policy.PodFacts(sandbox.metadata.namespace, sandbox.metadata.name, sandbox.runtime_handler,
                                dict(sandbox.annotations))
        policy.admit_restore_into(self._config.admission, facts, request.config.image.image)

    async def origin(self, request: cri.CreateContainerRequest, spec: dict[str, Any], image: str) -> None:
        """The checkpoint's own namespace against the new pod's, once the archive is read."""
        sandbox = await self._containerd.sandbox_status(request.pod_sandbox_id)
        facts = policy.PodFacts(sandbox.metadata.namespace, sandbox.metadata.name, sandbox.runtime_handler)
        policy.admit_origin(self._config.admission, facts, policy.origin_namespace(spec), image)

    def source(self, source: Path | CheckpointImage) -> Path | CheckpointImage:
        """The archive's real path if it lies in an allowed directory; an image from an allowed registry."""
        if isinstance(source, CheckpointImage):
            policy.admit_registry(source.name, self._config.restore.allowed_registries)
            return source
        real = source.resolve()
        allowed = [d.resolve() for d in self._config.restore.allowed_dirs]
        return policy.admit_archive(source, real, real.is_file(), allowed)
