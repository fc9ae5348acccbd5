"""Live migration between nodes: `criu-shim migrate` (source) and `criu-shim migrate-receiver` (target)."""
