"""The lab the modules of this package share."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from cerana_lab import sample
from platform_lab import NODES, Platform, platform_lab, usable, wait_for


@pytest.fixture(scope="package")
def site_platform(tmp_path_factory) -> Iterator[Platform]:
    """One 3-node lab with the whole platform (site.yml: Consul servers with ACLs, node tick every
    1 s, data server, cluster tick), the sample app dataset imported (``pyapp``, on node1 and
    node2), for every module of this package, in file order:

    1. test_lab_services.py drives the node-level modules itself: the cluster ticks are stopped
       before the dataset is imported and stay stopped through it;
    2. test_lab_tick.py starts them and tests the reconcile loop;
    3. test_platform_lab.py: the cluster, the live node list, a second site.yml run, and last the
       crash tests (a node, then the Consul leader's machine), which leave the lab degraded.

    Each module leaves nothing declared behind. Package scope: the lab goes as soon as the
    package's last test is done, not at the end of the session (its machines would keep a core
    busy through the rest of the suite). ``live_after``: seconds from the end of the first
    site.yml run until every node was in the live list (test_platform_lab.py checks the bound).
    """
    if not usable():
        pytest.skip("needs root, iproute2, systemd-container and debootstrap")
    extra = {"cluster_tick_extra_settings": {"lock_delay": "1s", "resync": "20s", "log_level": "DEBUG"}}
    with platform_lab(tmp_path_factory, extra_vars=extra, prefix="ts") as plat:
        ids = {plat.machine_id(n) for n in NODES}
        wait_for(lambda: plat.live_ids("node2") == ids, 60, what="three live nodes")
        plat.live_after = time.monotonic() - plat.site_done
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
