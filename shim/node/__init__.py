"""A local containerd node for development, tests, the demo and benchmarks."""
