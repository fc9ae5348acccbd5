"""Support shared by the test layers (fakes, builders, the ttrpc client only tests use)."""
