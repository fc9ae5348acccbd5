"""CRI methods the proxy answers itself: one module per verb, each a thin adapter."""
