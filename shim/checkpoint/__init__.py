"""Checkpoint archives in the layout the kubelet, checkpointctl and containerd 2.x expect."""
