"""Published ports and port filters (_portmap) loaded with the real nft into network namespaces.

    root ns: cpm-host 10.236.x.1/30 (a Consul dev agent listens there)
      │
    cpm-node (the "node"): up0 192.168.231.1/24, cpm-h 10.236.x.2/30, bridge cerana0 10.240.0.1/16
      ├── cpm-i1 eth0 10.240.0.2   bundle web   (HTTP on 80 and 5432: "<name> <port> <client address>")
      ├── cpm-i2 eth0 10.240.0.3   bundle web
      ├── cpm-i3 eth0 10.240.0.4   bundle front (connected to web's port 5432)
      └── cpm-i4 eth0 10.240.0.5   bundle other (not connected)
    cpm-cli eth0 192.168.231.2 (a client outside the node)
    cpm-node2 (a second node): underlay 192.168.232.2 to cpm-node's 192.168.232.1, bridge cerana0
      │         10.240.0.9/16 with a vxlan port (VNI 42) to cpm-node's bridge
      └── cpm-i5 eth0 10.240.0.6   bundle web

The rendered ruleset is applied in cpm-node with ``nft`` through ``_portmap.apply_ruleset``
itself (run in the namespace). The last test runs cerana-node-tick in cpm-node against the
Consul agent: it reads the network record, health-checks the instance on its own address
and in its namespace, and loads the rules; an instance failing its check leaves the rotation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _bundle_net, _instances, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _portmap as pm
from cerana_cli.consul_agent import ConsulAgent

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
]

NODE_NS, CLIENT_NS = "cpm-node", "cpm-cli"
NODE_UP, CLIENT_IP = "192.168.231.1", "192.168.231.2"
GATEWAY = "10.240.0.1"
INSTANCES = {  # netns: (bundle, address)
    "cpm-i1": ("web", "10.240.0.2"),
    "cpm-i2": ("web", "10.240.0.3"),
    "cpm-i3": ("front", "10.240.0.4"),
    "cpm-i4": ("other", "10.240.0.5"),
}
NODE2_NS, NODE2_GATEWAY = "cpm-node2", "10.240.0.9"
REMOTE = {"cpm-i5": ("web", "10.240.0.6")}  # on cpm-node2
ALL_NS = [NODE_NS, CLIENT_NS, NODE2_NS, *INSTANCES, *REMOTE]
HOST_LINK = "cpm-host"
NODE_ID = "c0ffee00c0ffee00c0ffee00c0ffee00"
OTHER_NODE = "beef0000beef0000beef0000beef0000"

WEB = m.Bundle.from_dict(
    {
        "id": "web",
        "ports": {
            80: {"port": 80, "public": True, "external_port": 8080},
            5432: {"port": 5432, "connected_bundles": ["front"]},
        },
    }
)
FRONT = m.Bundle.from_dict({"id": "front"})
OTHER = m.Bundle.from_dict({"id": "other"})

# An instance: HTTP on 80 and 5432 answering "<name> <port> <client address>"; /health is 503
# while <flag dir>/<name>.sick exists. No HTTPServer: its getfqdn() would wait for DNS.
SERVER = r"""
import http.server, os, socketserver, sys, threading
name, flags, ports = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sick = os.path.exists(os.path.join(flags, name + ".sick"))
        status = 503 if self.path == "/health" and sick else 200
        body = ("%s %d %s" % (name, self.server.server_address[1], self.client_address[0])).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
servers = [S(("0.0.0.0", p), H) for p in ports]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
servers[0].serve_forever()
"""

# Requests from inside a namespace: one new connection each; prints a JSON list of answers
# (the body, or "refused" / "timeout" / the error).
CLIENT = r"""
import json, socket, sys
host, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out = []
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        out.append(data.split(b"\r\n\r\n", 1)[1].decode())
    except ConnectionRefusedError:
        out.append("refused")
    except (TimeoutError, socket.timeout):
        out.append("timeout")
    except OSError as e:
        out.append("error: %s" % e)
print(json.dumps(out))
"""

APPLY = r"""
import sys
from ansible_collections.cerana.platform.plugins.module_utils import _portmap
_portmap.apply_ruleset(sys.stdin.read())
"""


def sh(*args, check=True, input=None, timeout=60):
    proc = subprocess.run(args, capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_ns(ns, *args, **kw):
    return sh("ip", "netns", "exec", ns, *args, **kw)


def wait_for(predicate, timeout, what, step=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_host_net() -> ipaddress.IPv4Network:
    """A /30 in 10.236.0.0/16 that no address of the root namespace overlaps."""
    out = sh("ip", "-j", "-4", "addr").stdout
    used = [
        ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in json.loads(out)
        for a in link["addr_info"]
    ]
    for net in ipaddress.IPv4Network("10.236.0.0/16").subnets(new_prefix=30):
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /30 in 10.236.0.0/16")


def teardown():
    sh("ip", "link", "del", HOST_LINK, check=False)
    for ns in ALL_NS:
        sh("ip", "netns", "del", ns, check=False)


class Lab:
    def __init__(self, work: Path):
        self.work = work
        self.flags = work / "flags"
        self.servers: dict[str, subprocess.Popen] = {}

    def up(self):
        teardown()
        self.flags.mkdir()
        for ns in ALL_NS:
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        node = ("ip", "-n", NODE_NS)
        sh(*node, "link", "add", "cerana0", "type", "bridge")
        sh(*node, "addr", "add", f"{GATEWAY}/16", "dev", "cerana0")
        sh(*node, "link", "set", "cerana0", "up")
        in_ns(NODE_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # the client's link
        sh(*node, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", CLIENT_NS)
        sh(*node, "addr", "add", f"{NODE_UP}/24", "dev", "up0")
        sh(*node, "link", "set", "up0", "up")
        sh("ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        sh("ip", "-n", CLIENT_NS, "link", "set", "eth0", "up")
        sh("ip", "-n", CLIENT_NS, "route", "add", "default", "via", NODE_UP)
        # the link to the root namespace, for Consul
        net = free_host_net()
        self.host_ip, self.node_host_ip = (str(a) for a in list(net.hosts())[:2])
        sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "cpm-h", "netns", NODE_NS)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", HOST_LINK)
        sh("ip", "link", "set", HOST_LINK, "up")
        sh(*node, "addr", "add", f"{self.node_host_ip}/30", "dev", "cpm-h")
        sh(*node, "link", "set", "cpm-h", "up")
        # the instances, and a server in each
        for ns, (_, address) in INSTANCES.items():
            sh(*node, "link", "add", ns + "v", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(*node, "link", "set", ns + "v", "master", "cerana0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY)
        # the second node, joined to the first by a vxlan port on each bridge
        node2 = ("ip", "-n", NODE2_NS)
        sh(*node, "link", "add", "under0", "type", "veth", "peer", "name", "under0", "netns", NODE2_NS)
        for cmd, ip, gateway in ((node, "192.168.232.1", GATEWAY), (node2, "192.168.232.2", NODE2_GATEWAY)):
            peer = "192.168.232.2" if ip.endswith(".1") else "192.168.232.1"
            sh(*cmd, "addr", "add", f"{ip}/30", "dev", "under0")
            sh(*cmd, "link", "set", "under0", "up")
            sh(*cmd, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "local", ip, "dev", "under0")
            sh(*cmd, "link", "set", "vx0", "mtu", "1450")
            sh("bridge", "-n", cmd[2], "fdb", "append", "00:00:00:00:00:00", "dev", "vx0", "dst", peer)
            if cmd is node2:
                sh(*cmd, "link", "add", "cerana0", "type", "bridge")
                sh(*cmd, "addr", "add", f"{gateway}/16", "dev", "cerana0")
                sh(*cmd, "link", "set", "cerana0", "up")
            sh(*cmd, "link", "set", "vx0", "master", "cerana0", "up")
        for ns, (_, address) in REMOTE.items():
            sh(*node2, "link", "add", ns + "v", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(*node2, "link", "set", ns + "v", "master", "cerana0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "mtu", "1450", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", NODE2_GATEWAY)
        # the node itself listens on the published port: the rules, not an empty port, must decide
        for ns, ports in [*((ns, "80,5432") for ns in [*INSTANCES, *REMOTE]), (NODE_NS, "8080")]:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, ns, str(self.flags), ports],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self.servers[ns] = proc
        for ns, proc in self.servers.items():
            assert proc.stdout.readline().strip() == "ready", f"the server in {ns} did not start"
        return self

    def down(self):
        for proc in self.servers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        teardown()

    def apply(self, text):
        """Load ``text`` in the node with _portmap.apply_ruleset (nft -f, one transaction)."""
        in_ns(NODE_NS, sys.executable, "-c", APPLY, input=text)

    def tables(self):
        return in_ns(NODE_NS, "nft", "list", "tables").stdout.split()

    def requests(self, ns, host, port, count=6, timeout=3.0):
        out = in_ns(ns, sys.executable, "-c", CLIENT, host, str(port), str(count), str(timeout))
        return json.loads(out.stdout)

    def names(self, ns, host, port, count=6, timeout=3.0):
        """The instance names that answered ``count`` requests (an error text where one failed)."""
        return [a.split()[0] for a in self.requests(ns, host, port, count, timeout)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("portmap"))
    try:
        yield lab.up()
    finally:
        lab.down()


def hb(ns, *errors, node=None):
    bundle, address = {**INSTANCES, **REMOTE}[ns]
    return m.BundleHeartbeat(
        bundle=bundle,
        node=node or ns,
        time="2026-11-30T03:04:05Z",
        address=address,
        services={"svc": {"state": "running", "health": {f"c{i}": e for i, e in enumerate(errors)}}},
    )


def render(*heartbeats):
    ruleset = pm.render([WEB, FRONT, OTHER], heartbeats, "cerana0", trusted=[GATEWAY])
    assert ruleset.problems == ()
    return ruleset.text


def test_published_port_rotates_over_the_healthy_instances(lab):
    lab.apply(render(hb("cpm-i1"), hb("cpm-i2"), hb("cpm-i3"), hb("cpm-i4")))
    assert "cerana" in lab.tables()

    answers = lab.requests(CLIENT_NS, NODE_UP, 8080)
    assert sorted({a.split()[0] for a in answers}) == ["cpm-i1", "cpm-i2"]
    assert all(a.split()[1] == "80" for a in answers)
    # masqueraded: the instances see the node's bridge address, so the replies come back through it
    assert {a.split()[2] for a in answers} == {GATEWAY}
    # from the node itself, and from an instance through the node (hairpin)
    assert set(lab.names(NODE_NS, GATEWAY, 8080)) == {"cpm-i1", "cpm-i2"}
    assert set(lab.names("cpm-i3", GATEWAY, 8080)) == {"cpm-i1", "cpm-i2"}

    # one instance unhealthy: everything goes to the other one
    lab.apply(render(hb("cpm-i1"), hb("cpm-i2", "GET http://10.240.0.3:80/health: status 503"), hb("cpm-i3")))
    assert lab.names(CLIENT_NS, NODE_UP, 8080) == ["cpm-i1"] * 6
    # healthy again: back in the rotation
    lab.apply(render(hb("cpm-i1"), hb("cpm-i2"), hb("cpm-i3")))
    assert set(lab.names(CLIENT_NS, NODE_UP, 8080)) == {"cpm-i1", "cpm-i2"}

    # none healthy: refused (a TCP reset), even though a process of the node listens on 8080
    lab.apply(render(hb("cpm-i1", "not checked yet"), hb("cpm-i2", "service is not running")))
    assert lab.requests(CLIENT_NS, NODE_UP, 8080, count=2, timeout=5) == ["refused", "refused"]
    lab.apply("")
    assert lab.names(CLIENT_NS, NODE_UP, 8080, count=1) == [NODE_NS]  # without the rules it answers


def test_non_public_port_only_from_the_bundle_connected_ones_and_the_node(lab):
    lab.apply(render(hb("cpm-i1"), hb("cpm-i2", "unhealthy does not matter here"), hb("cpm-i3"), hb("cpm-i4")))
    target = INSTANCES["cpm-i1"][1]
    assert lab.names("cpm-i3", target, 5432, count=2) == ["cpm-i1"] * 2  # front: connected
    assert lab.names("cpm-i2", target, 5432, count=2) == ["cpm-i1"] * 2  # web itself
    assert lab.names(NODE_NS, target, 5432, count=2) == ["cpm-i1"] * 2  # the node
    assert lab.requests("cpm-i4", target, 5432, count=1, timeout=1.5) == ["timeout"]  # other: dropped
    # the public port of the same instance is open to everyone, the non-public one is not published
    assert lab.names("cpm-i4", target, 80, count=1) == ["cpm-i1"]
    assert lab.requests(CLIENT_NS, NODE_UP, 5432, count=1, timeout=3)[0] in ("refused", "timeout")


def test_published_port_reaches_an_instance_on_another_node(lab):
    """DNAT on one node to an instance behind the other node's bridge, over the vxlan port; masquerade brings
    the replies back; the port filter holds across nodes too."""
    lab.apply(render(hb("cpm-i1", "failing"), hb("cpm-i5"), hb("cpm-i3"), hb("cpm-i4")))
    answers = lab.requests(CLIENT_NS, NODE_UP, 8080, count=4)
    assert answers == [f"cpm-i5 80 {GATEWAY}"] * 4  # the instance saw the first node's bridge address
    lab.apply(render(hb("cpm-i1"), hb("cpm-i5"), hb("cpm-i3"), hb("cpm-i4")))
    assert set(lab.names(CLIENT_NS, NODE_UP, 8080)) == {"cpm-i1", "cpm-i5"}
    remote = REMOTE["cpm-i5"][1]
    assert lab.names("cpm-i3", remote, 5432, count=1) == ["cpm-i5"]  # front is connected to web's 5432
    assert lab.requests("cpm-i4", remote, 5432, count=1, timeout=1.5) == ["timeout"]  # other is not
    assert lab.names("cpm-i4", remote, 80, count=1) == ["cpm-i5"]  # a public port is open


def test_removing_everything_removes_the_tables(lab):
    lab.apply(render(hb("cpm-i1"), hb("cpm-i4")))
    assert lab.tables().count("cerana") == 2  # ip and bridge
    lab.apply(pm.render([], [hb("cpm-i1")], "cerana0").text)
    assert "cerana" not in lab.tables()
    assert lab.requests("cpm-i4", INSTANCES["cpm-i1"][1], 5432, count=1) == [f"cpm-i1 5432 {INSTANCES['cpm-i4'][1]}"]
    lab.apply("")  # nothing to remove: still fine
    assert "cerana" not in lab.tables()


# -- the node tick -----------------------------------------------------------------------------


class BridgeConsul(ConsulAgent):
    """A dev agent that also listens on the root end of the node's link."""

    def __init__(self, host_ip):
        super().__init__()
        self.host_ip = host_ip

    def command(self, http_port):
        args = super().command(http_port)
        return [f"-client=127.0.0.1 {self.host_ip}" if a.startswith("-client=") else a for a in args]


@contextlib.contextmanager
def node_tick(lab, address, prefix):
    work = lab.work / "tick"
    (work / "data").mkdir(parents=True)
    (work / "machine-id").write_text(NODE_ID + "\n")
    log_path = work / "node-tick.log"
    args = [
        "ip", "netns", "exec", NODE_NS, sys.executable, "-m", "cerana_nodetick",
        "--machine-id-file", str(work / "machine-id"), "--data-dir", str(work / "data"),
        "--run-dir", str(work / "run"), "--interval", "300ms", "--consul-timeout", "2s",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_"))}
    env.update(CONSUL_HTTP_ADDR=address, CERANA_KV_PREFIX=prefix)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield work / "run", log_path
    finally:
        proc.kill()
        proc.wait()


def test_node_tick_checks_on_the_bundle_network_and_publishes(lab):
    agent = BridgeConsul(lab.host_ip).start()
    try:
        store = _store.Store(_store.ConnectionSettings(address=agent.http_addr, prefix="cpm"))
        store.put("datasets/web-data/config", m.Dataset(id="web-data").to_bytes())
        connect = "import socket; socket.create_connection(('127.0.0.1', 80), 1)"
        checks = {
            # default host: must go to the instance's address (nothing listens on the node's 127.0.0.1:80)
            "http": {"kind": "http", "args": {"port": 80, "path": "/health"}, "interval": 1, "timeout": 1},
            # 127.0.0.1:80 answers only inside the instance's namespace
            "inside": {
                "kind": "command",
                "args": {"cmd": [sys.executable, "-c", connect]},
                "interval": 1,
                "timeout": 1,
            },
        }
        service = m.Service.from_dict({"id": "svc", "dataset": "web-data", "cmd": ["web"], "health_checks": checks})
        store.put("services/svc/config", service.to_bytes())
        web = m.Bundle.from_dict({**WEB.to_dict(), "services": {"svc": {"id": "svc"}}})
        store.put("bundles/web/config", web.to_bytes())
        # the second instance runs "on another node": its heartbeat is there, healthy
        store.put(m.bundle_heartbeat_key("web", OTHER_NODE), hb("cpm-i2", node=OTHER_NODE).to_bytes())

        with node_tick(lab, f"http://{lab.host_ip}:{agent.http_port}", "cpm") as (run_dir, log_path):
            started = m.format_time(m.utc_now())
            pid = lab.servers["cpm-i1"].pid
            _instances.write_instance(str(run_dir), _instances.Instance("web", "svc", pid, started, ("web-data",)))
            record = _bundle_net.NetworkRecord(
                bundle="web", netns="cpm-i1", address=INSTANCES["cpm-i1"][1], prefix_len=16,
                gateway=GATEWAY, mac="02:00:00:00:00:02", host_veth="cpm-i1v",
            )  # fmt: skip
            _bundle_net.write_network(str(run_dir), record)

            def own_heartbeat(healthy):
                entry = store.get(m.bundle_heartbeat_key("web", NODE_ID))
                beat = m.BundleHeartbeat.from_json(entry.text) if entry else None
                return beat if beat and beat.healthy() == healthy else None

            beat = wait_for(lambda: own_heartbeat(True), 30, "a healthy heartbeat of web on the node")
            assert beat.address == INSTANCES["cpm-i1"][1]
            assert beat.services["svc"]["health"] == {"http": None, "inside": None}

            def rotation(expected):
                names = lab.names(CLIENT_NS, NODE_UP, 8080, count=4, timeout=2)
                return set(names) == expected and names

            wait_for(lambda: rotation({"cpm-i1", "cpm-i2"}), 30, "both instances behind the published port")

            (lab.flags / "cpm-i1.sick").touch()  # its /health answers 503 from now on
            beat = wait_for(lambda: own_heartbeat(False), 30, "the failing check in the heartbeat")
            assert "status 503" in beat.services["svc"]["health"]["http"]
            wait_for(lambda: rotation({"cpm-i2"}), 30, "the unhealthy instance out of the rotation")
            assert lab.names(CLIENT_NS, NODE_UP, 8080) == ["cpm-i2"] * 6

            (lab.flags / "cpm-i1.sick").unlink()
            wait_for(lambda: rotation({"cpm-i1", "cpm-i2"}), 30, "the instance back in the rotation")

            store.delete("bundles/web/config")  # nothing declared with ports: the tables go
            wait_for(lambda: "cerana" not in lab.tables(), 30, "the tables removed")
            log = log_path.read_text()
            assert "Traceback" not in log
            assert "published ports: ruleset loaded" in log
    finally:
        agent.stop()
