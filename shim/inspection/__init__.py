"""`criu-shim inspect`: what a checkpoint archive holds, signed or encrypted (what checkpointctl shows)."""
