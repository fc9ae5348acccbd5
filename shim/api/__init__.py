"""Generated protobuf modules (CRI v1, containerd API); made by `make protos`, never edited."""
