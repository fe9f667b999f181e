"""``_iproute2.IpRoute2`` and the observe/apply layer of ``_bundle_netio`` against the real
``ip`` and ``bridge``, inside network namespaces this test makes (nothing on the host's own
network is touched)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio
from ansible_collections.cerana.platform.plugins.module_utils import _iproute2 as ipr2

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]


@pytest.fixture
def netns():
    names = []

    def make():
        name = "cip-" + uuid.uuid4().hex[:8]
        ipr2.create_netns(name)
        names.append(name)
        return name

    yield make
    for name in names:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        assert not os.path.exists("/run/netns/" + name)


def test_links_changes_and_errors_in_a_namespace(netns):
    ns = netns()
    ipr = ipr2.IpRoute2(netns=ns)
    assert set(ipr.links()) == {"lo"}
    ipr.add_link("cbr-t", "bridge", mtu=1400, mac="02:00:00:00:00:01")
    link = bnio._find(ipr, "cbr-t")  # the change dropped the cached read
    assert (link.kind, link.mtu, link.mac, link.up, link.addresses) == ("bridge", 1400, "02:00:00:00:00:01", False, ())
    with pytest.raises(ipr2.IpError, match="File exists"):
        ipr.add_link("cbr-t", "bridge", mtu=1400)
    ipr.set_link("cbr-t", state="up", mtu=1300)
    ipr.address("add", "cbr-t", "10.250.0.1/24")
    link = bnio._find(ipr, "cbr-t")
    assert (link.up, link.mtu, link.addresses) == (True, 1300, ("10.250.0.1/24",))
    assert bnio._own_addresses(ipr) == ("10.250.0.1",)  # lo is down in a new namespace: no 127.0.0.1
    ipr.delete_link("cbr-t")
    ipr.delete_link("cbr-t")  # absent: nothing to do
    assert bnio._find(ipr, "cbr-t") is None
    with pytest.raises(ipr2.IpError, match=r"Cannot find device|does not exist"):
        ipr.set_link("nope0", state="up")


def test_bundle_network_inside_a_node_namespace(netns):
    """The node side (bridge, vxlan, flood entries) and a bundle (its namespace, veth pair,
    address, default route) planned, applied, observed again: nothing left to do; then removed."""
    node = netns()
    script = r"""
import json, sys
from ansible_collections.cerana.platform.plugins.module_utils import _bundle_netio as bnio
from ansible_collections.cerana.platform.plugins.module_utils import _iproute2 as ipr2
bundle, = sys.argv[1:]
ipr = ipr2.IpRoute2()
node_want = bnio.NodeWant(node_id="n1", address="10.251.0.1/16", peers=("192.0.2.7",))
bundle_want = bnio.BundleWant(bundle=bundle, node_id="n1", address="10.251.3.4/16", gateway="10.251.0.1")
changes = bnio.Changes()
applier = bnio.Applier(ipr, changes)
node_have = bnio.observe_node(ipr)
bundle_have = bnio.observe_bundle(ipr, bundle)
applier.apply(bnio.plan_node(node_have, node_want) + bnio.plan_bundle(bundle_have, bundle_want))
node_after, bundle_after = bnio.observe_node(ipr), bnio.observe_bundle(ipr, bundle)
out = {
    "actions": changes.actions,
    "again": [s.describe() for s in bnio.plan_node(node_after, node_want)]
    + [s.describe() for s in bnio.plan_bundle(bundle_after, bundle_want)],
    "fdb": list(node_after.fdb), "vni": node_after.vxlan.vni, "master": node_after.vxlan.master,
    "eth0": list(bundle_after.eth0.addresses), "gateway": bundle_after.gateway,
    "veth_master": bundle_after.host_veth.master,
}
applier.apply(bnio.plan_absent(bundle_after, bundle))
out["gone"] = bnio.observe_bundle(ipr, bundle).host_veth is None and not bnio.observe_bundle(ipr, bundle).netns
print(json.dumps(out))
"""
    bundle = "t" + uuid.uuid4().hex[:6]
    path = [str(Path(__file__).resolve().parents[2] / "collections"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", script, bundle],
                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
    try:
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
    finally:
        subprocess.run(["ip", "netns", "delete", "cerana-" + bundle], capture_output=True, check=False)
    assert out["again"] == [], out
    assert any(a.startswith("create bridge") for a in out["actions"])
    assert (out["fdb"], out["vni"], out["master"]) == (["192.0.2.7"], 10240, "cerana0")
    assert (out["eth0"], out["gateway"], out["veth_master"]) == (["10.251.3.4/16"], "10.251.0.1", "cerana0")
    assert out["gone"] is True
