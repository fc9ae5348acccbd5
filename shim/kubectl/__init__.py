"""`kubectl checkpoint`, the kubectl plugin (console script `kubectl-checkpoint`): cli (arguments, the three
commands), cluster (the API server through the Kubernetes Python client), plan (pure: container choice,
the restore pod)."""
