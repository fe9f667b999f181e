"""Tests on one 3-node lab deployed by site.yml (the package-scoped fixture in conftest.py)."""
