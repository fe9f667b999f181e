"""cerana lab: a local cluster of network-namespace or systemd-nspawn nodes on one bridge."""

__version__ = "0.1.0"
