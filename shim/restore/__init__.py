"""Restoring a container from a checkpoint at CRI CreateContainer."""
