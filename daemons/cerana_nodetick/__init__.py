"""cerana-node-tick: the per-node heartbeat daemon (node, dataset and bundle heartbeats)."""

__version__ = "0.1.0"
