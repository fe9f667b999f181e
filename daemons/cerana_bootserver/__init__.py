"""cerana-bootserver: DHCP (and PXE hand-off) for the cluster boot network."""

__version__ = "0.1.0"
