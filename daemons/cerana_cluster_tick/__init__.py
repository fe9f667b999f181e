"""cerana-cluster-tick: the leader-elected reconcile loop that converges the nodes to the declared state."""

__version__ = "0.1.0"
