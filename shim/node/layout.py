"""Names and paths of one local node, all derived from its directory (pure).

Sockets live under /run/criu-shim/<tag>/ rather than in DIR because a unix
socket path may not exceed 107 bytes and test directories are long. The tag
also names the CNI bridge and network, so two nodes never share anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

RUN_ROOT = Path("/run/criu-shim")


@dataclass(frozen=True)
class NodeLayout:
    dir: Path

    @property
    def tag(self) -> str:
        return hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:8]

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.tag

    @property
    def containerd_socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def cri_socket(self) -> Path:
        return self.run_dir / "cri.sock"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def state(self) -> Path:
        return self.run_dir / "state"

    @property
    def config_file(self) -> Path:
        return self.dir / "containerd.toml"

    @property
    def proxy_config_file(self) -> Path:
        return self.dir / "criu-shim.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.dir / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.dir / "cni" / "ipam"

    @property
    def checkpoints_dir(self) -> Path:
        """Where the node's proxy accepts archives to restore from (restore.allowed_dirs)."""
        return self.dir / "checkpoints"

    @property
    def bin_dir(self) -> Path:
        """Put first on containerd's PATH: holds containerd-shim-criu-v2."""
        return self.dir / "bin"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.dir / "pids"

    @property
    def bridge(self) -> str:
        return f"cs{self.tag}"  # at most 15 bytes, the kernel's limit for link names

    @property
    def network_name(self) -> str:
        return f"criu-shim-{self.tag}"

    @property
    def subnet_claim(self) -> Path:
        """The pod subnet `node up` chose for this node (a host node: see `subnet_candidates`)."""
        return self.run_dir / "subnet"

    @property
    def subnet(self) -> str:
        try:
            return self.subnet_claim.read_text().strip()
        except OSError:
            return self.subnet_candidates()[0]

    def subnet_candidates(self) -> list[str]:
        """10.234.0.0/16 split into /24s, starting at the one the tag picks: the first is the node's
        unless another live node has claimed it (a test session keeps a dozen nodes up, and 250
        subnets picked by hash then collide one session in four)."""
        first = int(self.tag, 16) % 250
        return [f"10.234.{(first + i) % 250 + 1}.0/24" for i in range(250)]
