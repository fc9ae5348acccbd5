"""`criu-shim install` / `uninstall`: wire criu-shim into an existing node's containerd and kubelet.

containerd_config: merge the `criu` runtime handler into containerd's config (tomlkit, comments kept).
files:             what an installation writes (unit, launcher, drop-ins, merged config), computed, not written.
state:             write them with the originals kept (0600, under criu-shim's state dir); put them back.
"""
