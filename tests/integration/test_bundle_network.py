"""``cerana.platform.bundle_network`` on a 2-node nspawn lab: namespaces, veth pairs, leases and the vxlan overlay.

Real pieces: two ``cerana lab`` nspawn machines (systemd, own network namespaces, on one lab
bridge), a Consul dev agent that also answers on the lab bridge, and the module run through
``ansible-playbook`` with the lab inventory (the nspawn connection). The machines'
``/usr/bin/python3`` runs the module with no third-party package at all (on real nodes the
module would run with the node tick's venv): the store talks HTTP with the standard library,
and the network goes through iproute2's ``ip`` and ``bridge``. The nodes' ``nodes/<id>`` entries are written by
the test (as the node tick would), so each node knows the other as its overlay peer.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

import netlab
from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net as bn
from ansible_collections.cerana.platform.plugins.module_utils import _models as m

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if os.geteuid() != 0 or not all(
    shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter", "apt-get", "dpkg-deb")
):
    pytest.skip("needs root, iproute2, systemd-container, debootstrap and apt-get", allow_module_level=True)

BIN = Path(sys.executable).parent
NODES = ("node1", "node2")
PORT = 7000
LISTENER = (  # python3 -c LISTENER <port> <name>: answers "hello <client address> from <name>"
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
    "while True:\n"
    "    c, peer = s.accept(); c.sendall(('hello %s from %s\\n' % (peer[0], sys.argv[2])).encode()); c.close()\n"
)
CLIENT = (  # python3 -c CLIENT <address> <port>: prints what the listener says
    "import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).recv(99).decode())"
)
HTTP_GET = "import sys, urllib.request as u; print(u.urlopen(f'http://{sys.argv[1]}:8080/', timeout=3).read().decode())"
DEB_CACHE = Path("/var/cache/cerana/test-debs")  # shared with test_service_instance.py


def busybox_dataset(work: Path) -> Path:
    """A busybox-static root serving /www (the service of bundle a), from Debian's package."""
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(DEB_CACHE.glob("busybox-static_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "download", "busybox-static"], cwd=DEB_CACHE, check=True, capture_output=True)
        debs = sorted(DEB_CACHE.glob("busybox-static_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(work / "bb")], check=True)
    root = work / "web-root"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    shutil.copy2(work / "bb" / "bin" / "busybox", root / "bin" / "busybox")
    (root / "www" / "index.html").write_text("hello from a's web\n")
    for path in (root, root / "bin", root / "www"):
        path.chmod(0o755)
    return root


def free_subnet() -> str:
    used = netlab_networks()
    for third in range(3, 250, 11):
        net = IPv4Network(f"10.236.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free 10.236.x.0/24 subnet")


def netlab_networks() -> list[IPv4Network]:
    nets = []
    for args in (["-4", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        for item in json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout):
            nets += [IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False) for a in item.get("addr_info", [])]
            if item.get("dst") not in (None, "default"):
                try:
                    nets.append(IPv4Network(item["dst"], strict=False))
                except ValueError:
                    pass
    return [n for n in nets if n.prefixlen > 0]


def lab_cli(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "cerana_lab", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@dataclass
class Lab:
    name: str
    work: Path
    consul: netlab.BridgeConsul
    prefix: str
    nodes: dict  # name -> {"leader_pid", "machine_id", "address", "netns"}
    first: dict | None = None  # the results of the first present run

    def sh(self, node: str, script: str, check: bool = True, input: bytes | None = None) -> str:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.nodes[node]["leader_pid"]), "-a", "/bin/sh", "-c", script],
            input=input, capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"{node}: {script}: {proc.stderr.decode()}"
        return proc.stdout.decode().strip()

    def put_tree(self, node: str, src: Path, dest: str) -> None:
        tar = subprocess.run(["tar", "-C", str(src), "-c", "."], capture_output=True, check=True).stdout
        self.sh(node, f"mkdir -p {dest} && tar -C {dest} -x --no-same-owner", input=tar)

    def kv_put(self, key: str, value: bytes) -> None:
        netlab.kv_put(self.consul, self.prefix, key, value.decode())

    def keys(self, below: str) -> list[str]:
        return sorted(e["Key"][len(self.prefix) + 1 :] for e in netlab.kv_list(self.consul, self.prefix, below))

    def leases(self) -> dict:
        return netlab.leases(self.consul, self.prefix, pool=bn.POOL)

    def play(self, tasks: list[dict], hosts: tuple[str, ...] = NODES, *flags: str) -> dict:
        """Run the tasks (bundle_network args, ``_check`` for check mode, ``_host`` for one host only,
        ``_module`` for another module of the collection; errors ignored) on ``hosts``.

        Returns {(host, task name ``t<i>``): result with ``failed``}.
        """
        tag = uuid.uuid4().hex[:6]
        body = []
        for i, args in enumerate(tasks):
            args = {"consul_url": self.consul.bridge_addr, "kv_prefix": self.prefix, **args}
            task = {"name": f"t{i}", "ignore_errors": True, "check_mode": args.pop("_check", False)}
            if "_host" in args:
                task["when"] = "inventory_hostname == %s" % json.dumps(args.pop("_host"))
            module = "cerana.platform." + args.pop("_module", "bundle_network")
            body.append(dict(task, **{module: args}))
        play = self.work / f"play-{tag}.yml"
        play.write_text(json.dumps([{"hosts": ",".join(hosts), "gather_facts": False, "tasks": body}]))
        record = self.work / f"play-{tag}.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_", "ANSIBLE_"))}
        env.update(
            ANSIBLE_NOCOLOR="1", ANSIBLE_PIPELINING="1", ANSIBLE_CALLBACKS_ENABLED="record_results",
            CERANA_TEST_RECORD=str(record),
            ANSIBLE_CALLBACK_PLUGINS=str(Path(__file__).parent / "playbooks" / "callback_plugins"),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}",
        )  # fmt: skip
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.work / "inventory.json"), str(play), *flags],
            capture_output=True, text=True, env=env, timeout=180,
        )  # fmt: skip
        lines = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        out = {
            (r["host"], r["task"]): dict(r["result"], failed=r["status"] == "failed", skipped=r["status"] == "skipped")
            for r in lines
        }
        assert len(out) == len(tasks) * len(hosts), f"missing results:\n{proc.stdout}\n{proc.stderr}"
        return out

    def forwarding(self, node: str, on: bool = True) -> None:
        """net.ipv4.ip_forward in the machine's network namespace, set from the host (its /proc/sys is read-only)."""
        setting = "net.ipv4.ip_forward=%d" % on
        subprocess.run(["ip", "netns", "exec", self.nodes[node]["netns"], "sysctl", "-qw", setting],
                       check=True, capture_output=True)  # fmt: skip

    def state(self, node: str, bundle: str) -> dict:
        """What is on the node for ``bundle``: namespace file, host veth, record, and the node's own devices."""
        veth = bn.host_veth_name(bundle)
        return {
            "netns": self.sh(node, f"test -e /run/netns/cerana-{bundle} && echo yes || echo no") == "yes",
            "veth": self.sh(node, f"ip link show {veth} >/dev/null 2>&1 && echo yes || echo no") == "yes",
            "record": self.sh(node, f"cat /run/cerana/networks/{bundle}.json 2>/dev/null || true") or None,
            "bridge": self.sh(node, "ip link show cerana0 >/dev/null 2>&1 && echo yes || echo no") == "yes",
            "vxlan": self.sh(node, "ip link show cerana-vx >/dev/null 2>&1 && echo yes || echo no") == "yes",
        }


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = "bn" + uuid.uuid4().hex[:5]
    subnet = free_subnet()
    bridge_ip = str(IPv4Network(subnet).network_address + 1)
    work = tmp_path_factory.mktemp("bnlab")
    consul = None
    try:
        lab_cli("up", "--name", name, "--nodes", str(len(NODES)), "--kind", "nspawn", "--subnet", subnet)
        (work / "inventory.json").write_text(lab_cli("inventory", "--name", name, "--format", "json"))
        state = json.loads(Path(f"/run/cerana-lab/{name}/state.json").read_text())
        nodes = {n["name"]: dict(n, address=n["address"].split("/")[0]) for n in state["nodes"]}
        consul = netlab.BridgeConsul(bridge_ip).start()
        the_lab = Lab(name, work, consul, "bnlab-" + uuid.uuid4().hex[:6], nodes)
        for node in NODES:
            # the node tick's entry, so that the other node is a peer of the overlay
            entry = m.Node.from_dict({
                "id": nodes[node]["machine_id"], "hostname": node, "heartbeat": m.format_time(m.utc_now()),
                "addresses": [nodes[node]["address"]],
            })  # fmt: skip
            the_lab.kv_put(m.node_key(entry.id), entry.to_bytes())
        for node in NODES:
            the_lab.forwarding(node)  # as the lab sets it; one test switches it off on node2
        the_lab.put_tree("node1", busybox_dataset(work), "/var/lib/cerana/datasets/web-root")
        declared = [
            m.Dataset.from_dict({"id": "web-root", "read_only": True}),
            m.Service.from_dict({"id": "web", "dataset": "web-root",
                                 "cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]}),
            m.Bundle.from_dict({"id": "a", "services": {"web": {}}, "ports": {"8080": {"port": 8080}}}),
            m.Bundle.from_dict({"id": "b"}),
            m.Bundle.from_dict({"id": "v"}),
        ]  # fmt: skip
        for obj in declared:
            the_lab.kv_put(m.object_key(obj.KIND, obj.id), obj.to_bytes())
        yield the_lab
    finally:
        if consul is not None:
            consul.stop()
        lab_cli("down", "--name", name)


NOTHING = {"netns": False, "veth": False, "record": None, "bridge": False, "vxlan": False}


def test_check_mode_bad_input_and_failures_change_nothing(lab):
    # node1: check mode, an undeclared bundle, a bad option, a failure at the last step (a read-only records
    # directory) after the leases were taken and the bridge, vxlan, namespace and veth pair were made, and an
    # unreachable Consul.
    # node2: forwarding off, which an nspawn machine cannot change (its /proc/sys is read-only): a failure
    # before any change.
    records = "/run/cerana/networks"
    lab.sh("node1", f"mkdir -p {records} && mount --bind {records} {records} && mount -o remount,bind,ro {records}")
    lab.forwarding("node2", False)
    try:
        out = lab.play([
            {"bundle": "a", "_check": True, "_host": "node1"}, {"bundle": "nope", "_host": "node1"},
            {"bundle": "a", "vni": 1 << 24, "_host": "node1"}, {"bundle": "b", "_host": "node1"},
            {"bundle": "b", "_host": "node2"}, {"bundle": "a", "consul_url": "http://127.0.0.1:1", "_host": "node1"},
        ])  # fmt: skip
    finally:
        lab.sh("node1", f"umount {records}")
        lab.forwarding("node2")
    check = out[("node1", "t0")]
    assert not check["failed"] and check["changed"], check
    assert check["address"] is None and check["netns"] == "cerana-a"
    assert check["peers"] == [lab.nodes["node2"]["address"]]
    assert "create bridge cerana0" in check["actions"] and "create network namespace cerana-a" in check["actions"]
    assert out[("node1", "t1")]["failed"] and out[("node1", "t1")]["msg"] == "bundle nope is not declared"
    assert out[("node1", "t2")]["failed"] and out[("node1", "t2")]["msg"].startswith("vni: must be 1-16777215")
    assert out[("node1", "t2")]["field"] == "vni"
    res = out[("node1", "t3")]
    assert res["failed"] and res["msg"] == f"write {records}/b.json failed: Read-only file system", res
    res = out[("node2", "t4")]
    assert res["failed"] and res["msg"].startswith("net.ipv4.ip_forward is 0 on this node and cannot be set"), res
    res = out[("node1", "t5")]
    assert res["failed"] and res["msg"].startswith("cannot reach Consul at http://127.0.0.1:1"), res
    for node in NODES:
        for bundle in ("a", "b", "nope"):
            assert lab.state(node, bundle) == NOTHING, (node, bundle)
    assert lab.keys("service/") == []  # the leases node1 took, and their MAC index entries, are gone


def test_present_connects_bundles_across_nodes(lab):
    # node1 itself listens on 8080, the port of bundle a's service: no clash inside a's namespace
    lab.sh("node1", f"systemd-run --unit=bn-node-8080 /usr/bin/python3 -c {shlex.quote(LISTENER)} 8080 node1")
    out = lab.play([{"bundle": "a"}, {"bundle": "b"}, {"bundle": "v", "namespace": False, "_host": "node1"},
                    {"_module": "service_instance", "bundle": "a", "service": "web", "_host": "node1"}])  # fmt: skip
    results = {}
    for node in NODES:
        for task, bundle in (("t0", "a"), ("t1", "b")):
            res = out[(node, task)]
            assert not res["failed"] and res["changed"], res
            results[(node, bundle)] = res
            record = json.loads(lab.state(node, bundle)["record"])
            assert record == res["record"] == {
                "bundle": bundle, "netns": f"cerana-{bundle}", "address": res["address"], "prefix_len": 16,
                "gateway": res["gateway"], "mac": bn.bundle_mac(bundle, lab.nodes[node]["machine_id"]),
                "host_veth": bn.host_veth_name(bundle),
            }  # fmt: skip
            assert IPv4Address(res["address"]) in IPv4Network("10.240.0.0/16")
            inside = lab.sh(node, f"ip -n cerana-{bundle} -4 -o addr show dev eth0; ip -n cerana-{bundle} route")
            assert f"inet {res['address']}/16" in inside and f"default via {res['gateway']} dev eth0" in inside
        ports = lab.sh(node, "ip -o link show master cerana0 | cut -d: -f2 | cut -d@ -f1 | tr -d ' ' | sort")
        assert ports.split() == sorted(["cerana-vx", bn.host_veth_name("a"), bn.host_veth_name("b")])
        other = lab.nodes["node2" if node == "node1" else "node1"]["address"]
        assert lab.sh(node, "bridge fdb show dev cerana-vx | grep ^00:00:00:00:00:00") == (
            f"00:00:00:00:00:00 dst {other} self permanent")  # fmt: skip
    # one gateway per node, the same for both bundles; every address distinct; all leased in Consul
    gateways = {n: {results[(n, b)]["gateway"] for b in "ab"} for n in NODES}
    assert all(len(g) == 1 for g in gateways.values()) and gateways["node1"] != gateways["node2"]
    # bundle v (namespace: false, as for a VM): lease and record, but no namespace and no veth
    v = out[("node1", "t2")]
    assert not v["failed"] and v["changed"] and v["netns"] is None and v["host_veth"] is None, v
    assert json.loads(lab.state("node1", "v")["record"])["address"] == v["address"]
    assert lab.state("node1", "v") == dict(NOTHING, bridge=True, vxlan=True, record=lab.state("node1", "v")["record"])
    addresses = [r["address"] for r in results.values()] + [g.pop() for g in gateways.values()] + [v["address"]]
    assert len(set(addresses)) == 7
    leases = lab.leases()
    assert sorted(leases) == sorted(addresses) and all(v["state"] == "bound" for v in leases.values())

    # bundle b on node2 listens; bundle a on node1 connects to it over the vxlan
    lab.sh("node2", "systemd-run --unit=bn-listen -p NetworkNamespacePath=/run/netns/cerana-b "
                    f"/usr/bin/python3 -c {shlex.quote(LISTENER)} {PORT} b")  # fmt: skip
    try:
        b_addr, a_addr = results[("node2", "b")]["address"], results[("node1", "a")]["address"]
        connect = f"ip netns exec cerana-a python3 -c {shlex.quote(CLIENT)} {b_addr} {PORT}"
        got = netlab.wait_for(lambda: lab.sh("node1", connect, check=False), 30, "a connection from a@node1 to b@node2")
        assert got == f"hello {a_addr} from b"  # no NAT: b sees a's own address
        # the listener is in b's namespace only: not on node2's own addresses
        node2_ip = lab.nodes["node2"]["address"]
        refused = lab.sh("node1", f"python3 -c {shlex.quote(CLIENT)} {node2_ip} {PORT} 2>&1", check=False)
        assert "refused" in refused.lower(), refused
    finally:
        lab.sh("node2", "systemctl stop bn-listen", check=False)

    # bundle a's service (service_instance) runs in a's namespace: b on node2 reaches it on a's address
    web = out[("node1", "t3")]
    assert not web["failed"] and web["active"], web
    assert "NetworkNamespacePath=/run/netns/cerana-a" in lab.sh("node1", f"cat {web['unit_path']}")
    get = f"ip netns exec cerana-b python3 -c {shlex.quote(HTTP_GET)} {a_addr}"
    assert netlab.wait_for(lambda: lab.sh("node2", get, check=False), 30, "a's web from b") == "hello from a's web"
    node1_ip = lab.nodes["node1"]["address"]
    got = lab.sh("node2", f"python3 -c {shlex.quote(CLIENT)} {node1_ip} 8080")
    assert got == f"hello {lab.nodes['node2']['address']} from node1"  # the node's own 8080 is another socket
    lab.sh("node1", "systemctl stop bn-node-8080")
    lab.first = out


def test_second_run_changes_nothing_and_absent_leaves_nothing(lab):
    out = lab.play([
        {"bundle": "a", "state": "absent", "_host": "node1"},
        {"_module": "service_instance", "bundle": "a", "service": "web", "state": "absent", "_host": "node1"},
        {"bundle": "a"}, {"bundle": "b"}, {"bundle": "v", "namespace": False, "_host": "node1"},
        {"bundle": "a", "state": "absent", "_check": True}, {"bundle": "a", "state": "absent"},
        {"bundle": "b", "state": "absent"}, {"bundle": "v", "state": "absent", "_host": "node1"},
        {"bundle": "a", "state": "absent"}, {"bundle": "b", "state": "absent"},
    ])  # fmt: skip
    # the network of a bundle whose instances run on the node is not removed under them
    refused = out[("node1", "t0")]
    assert refused["failed"] and refused["msg"] == (
        "bundle a still runs on this node (services web); remove its service instances first"), refused  # fmt: skip
    assert not out[("node1", "t1")]["failed"] and out[("node1", "t1")]["changed"]
    for node in NODES:
        for task, first in (("t2", "t0"), ("t3", "t1"), ("t4", "t2")):
            res = out[(node, task)]
            if res["skipped"]:
                continue
            assert not res["failed"] and not res["changed"] and res["actions"] == [], res
            assert res["address"] == lab.first[(node, first)]["address"]
        # the check-mode removal predicted the actions and did nothing: the real one still had them to do
        check, real = out[(node, "t5")], out[(node, "t6")]
        assert check["changed"] and real["changed"] and check["actions"] == real["actions"], (check, real)
        assert real["actions"][:2] == [f"delete {bn.host_veth_name('a')}", "delete network namespace cerana-a"]
        assert not out[(node, "t7")]["failed"] and out[(node, "t7")]["changed"]
        for task in ("t9", "t10"):  # absent again: nothing to do
            assert not out[(node, task)]["failed"] and not out[(node, task)]["changed"], out[(node, task)]
    v = out[("node1", "t8")]
    assert not v["failed"] and v["changed"] and v["actions"][0] == "remove /run/cerana/networks/v.json", v
    for node in NODES:
        for bundle in "abv":
            assert lab.state(node, bundle) == dict(NOTHING, bridge=True, vxlan=True)  # the node's devices stay
        assert lab.sh(node, "ip -o link show master cerana0 | cut -d: -f2 | cut -d@ -f1 | tr -d ' '") == "cerana-vx"
        assert lab.sh(node, "ls /run/netns 2>/dev/null || true") == ""
    # only the two bridges' leases (and their MAC index entries) remain
    bridge_macs = sorted(bn.bridge_mac(lab.nodes[n]["machine_id"]) for n in NODES)
    assert sorted(v["mac"] for v in lab.leases().values()) == bridge_macs
    assert [k.rsplit("/", 1)[1] for k in lab.keys("service/macs/")] == bridge_macs
