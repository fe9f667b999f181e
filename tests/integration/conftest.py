"""Fixtures shared by integration test modules."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from cerana_lab import sample
from platform_lab import Platform, platform_lab, usable


@pytest.fixture(scope="session")
def services_platform(tmp_path_factory) -> Iterator[Platform]:
    """One 3-node lab with the whole platform (site.yml: Consul, node tick, data server, cluster
    tick), the sample app dataset imported (``pyapp``, on node1 and node2), for the services and
    the cluster tick modules (test_lab_services.py, then test_lab_tick.py). Each module leaves
    nothing declared behind. The cluster ticks are stopped before the dataset is imported and
    stay stopped while the services module drives the node-level modules itself; the tick
    module starts them."""
    if not usable():
        pytest.skip("needs root, iproute2, systemd-container and debootstrap")
    extra = {"cluster_tick_extra_settings": {"lock_delay": "1s", "resync": "20s", "log_level": "DEBUG"}}
    with platform_lab(tmp_path_factory, extra_vars=extra, prefix="ts") as plat:
        # No tick may act while the dataset is put in place by hand: with one copy of two
        # imported, it would add one where it sees fit, and with three, remove one.
        for node in ("node1", "node2", "node3"):
            plat.run_in(node, "systemctl", "stop", "cerana-cluster-tick.service")
        src = sample.build_sample(plat.workdir / "pyapp")
        play = {
            "hosts": "localhost", "connection": "local", "gather_facts": False,
            "module_defaults": {"group/cerana.platform.platform": {
                "consul_url": f"http://{plat.ip('node1')}:8500", "consul_token": plat.token}},
            "tasks": [
                {"cerana.platform.dataset_import": {"src": str(src), "id": "pyapp", "redundancy": 2,
                                                    "node": "node1"}},
                {"cerana.platform.dataset_replica": {"id": "pyapp", "node": "node2", "state": "present"}},
            ],
        }  # fmt: skip
        path = plat.workdir / "import.json"
        path.write_text(json.dumps([play]))
        plat.playbook(path)
        yield plat
