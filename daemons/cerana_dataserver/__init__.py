"""cerana-dataserver: serves a node's datasets over HTTP and receives imports and replicas."""

__version__ = "0.1.0"
