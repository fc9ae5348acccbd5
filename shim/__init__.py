"""criu-shim: checkpoint/restore for Kubernetes nodes on containerd 1.6/1.7."""

__version__ = "0.1.0"
