"""containerd-shim-criu-v2: the runtime shim that restores containers from checkpoints.

For a container that is not being restored the launcher script execs
containerd-shim-runc-v2 at `start`, so the stock shim serves it directly and
we cost nothing. For a restore, `start` starts the stock shim as usual and puts
a small ttrpc relay in front of it for this task: the relay adds the
checkpoint path to the task's Create (the runc shim then runs `runc restore`
at Start instead of `runc create`/`start`), and applies the checkpoint's
rootfs diff to the freshly mounted rootfs just before Start.
"""
