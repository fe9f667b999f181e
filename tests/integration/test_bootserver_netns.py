"""cerana-bootserver end to end: two daemons and twenty real DHCP clients on a bridge of network namespaces.

Layout (all created here and removed afterwards; nothing leaves the bridge):

    br-cbt 10.99.0.1/24 (root namespace; a Consul agent listens there and on 127.0.0.1)
      ├── cbt-s1 eth0 10.99.0.2   cerana-bootserver
      ├── cbt-s2 eth0 10.99.0.3   cerana-bootserver
      └── cbt-c1 .. cbt-c20 eth0  busybox udhcpc (18) and ISC dhclient (2), with their own scripts
                                  (the stock ones would rewrite the host's /etc/resolv.conf)

Needs root, ``ip``, ``busybox`` and ``dhclient`` (Debian: iproute2 busybox isc-dhcp-client).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cerana_cli.consul_agent import ConsulAgent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BRIDGE = "br-cbt"
HOST_IP = "10.99.0.1"
SERVERS = {"cbt-s1": "10.99.0.2", "cbt-s2": "10.99.0.3"}
CLIENTS = ["cbt-c%d" % i for i in range(1, 21)]
PREFIX = "cbt"
NEEDS = [shutil.which("ip"), shutil.which("busybox"), shutil.which("dhclient")]

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event script for the tests: configure the namespace's eth0, log the event; never touch resolv.conf.
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
echo "$1 ip=$ip serverid=$serverid lease=$lease" >> "$CBT_LOG"
"""

DHCLIENT_SCRIPT = """#!/bin/sh
# dhclient-script stand-in for the tests (same rules as the udhcpc script).
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr flush dev "$interface"; ip addr add "$new_ip_address/24" dev "$interface" ;;
  RELEASE|EXPIRE|FAIL|STOP) ip addr flush dev "$interface" ;;
esac
echo "$reason ip=$new_ip_address serverid=$new_dhcp_server_identifier" >> "$CBT_LOG"
"""


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns_mac(i):
    return "52:54:00:99:00:%02x" % i


def teardown_lab():
    for ns in [*SERVERS, *CLIENTS]:
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


class BridgeConsul(ConsulAgent):
    """A dev agent that also listens on the bridge address, so daemons inside namespaces reach it."""

    def command(self, http_port):
        return [
            ("-client=127.0.0.1 %s" % HOST_IP) if a.startswith("-client=") else a for a in super().command(http_port)
        ]

    @property
    def bridge_addr(self):
        return "http://%s:%d" % (HOST_IP, self.http_port)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0 or not all(NEEDS):
        pytest.skip("needs root, ip, busybox and dhclient")
    teardown_lab()
    work = tmp_path_factory.mktemp("cbt")
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", HOST_IP + "/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    try:
        for i, ns in enumerate([*SERVERS, *CLIENTS], start=1):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", ns + "v", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", ns + "v", "master", BRIDGE, "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "address", ns_mac(i))
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            if ns in SERVERS:
                sh("ip", "-n", ns, "addr", "add", SERVERS[ns] + "/24", "dev", "eth0")
        for name, text in (("udhcpc.sh", UDHCPC_SCRIPT), ("dhclient.sh", DHCLIENT_SCRIPT)):
            (work / name).write_text(text)
            (work / name).chmod(0o755)
        agent = BridgeConsul().start()
        try:
            yield work, agent
        finally:
            agent.stop()
    finally:
        teardown_lab()


def kv(agent, key, value=None):
    url = "%s/v1/kv/%s/%s" % (agent.http_addr, PREFIX, key)
    if value is not None:
        urllib.request.urlopen(urllib.request.Request(url, data=value.encode(), method="PUT"), timeout=5).read()
        return None
    try:
        with urllib.request.urlopen(url + "?recurse=true", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise


def leases(agent):
    import base64

    out = {}
    for item in kv(agent, "dhcp/leases/"):
        data = json.loads(base64.b64decode(item["Value"]))
        out[item["Key"].rsplit("/", 1)[1]] = data
    return out


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


@pytest.fixture(scope="module")
def servers(lab):
    work, agent = lab
    kv(agent, "dhcp/config", json.dumps({
        "net": "10.99.0.0/24", "gateway": HOST_IP, "dns": [HOST_IP], "lease_duration": 600,
        "excluded": [{"start": "10.99.0.1", "end": "10.99.0.9"}],
    }))  # fmt: skip
    env = dict(os.environ, CONSUL_HTTP_ADDR=agent.bridge_addr, CERANA_KV_PREFIX=PREFIX,
               CERANA_BOOTSERVER_INTERFACE="eth0", CERANA_BOOTSERVER_LOG_LEVEL="DEBUG",
               CERANA_BOOTSERVER_MEDIA="off")  # fmt: skip
    procs = {}
    for ns in SERVERS:
        log = open(work / (ns + ".log"), "w")  # noqa: SIM115 - closed with the process
        procs[ns] = (subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cerana_bootserver"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT), log)  # fmt: skip
    for ns in SERVERS:
        wait_for(lambda ns=ns: "listening on" in (work / (ns + ".log")).read_text(), 30, ns + " to listen")
    yield procs
    for proc, log in procs.values():
        if proc.poll() is None:
            proc.kill()
        log.close()


def events(path):
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def fields(event):
    return dict(part.split("=", 1) for part in event[1:] if "=" in part)


def test_two_servers_twenty_clients(lab, servers):
    work, agent = lab
    procs = {}
    one_shot = CLIENTS[:17]
    keeper = CLIENTS[17]  # udhcpc that stays: renew with SIGUSR1, release with SIGTERM (-R)
    dh = CLIENTS[18:]  # ISC dhclient
    start = time.monotonic()
    try:
        for ns in [*one_shot, keeper]:
            env = dict(os.environ, CBT_LOG=str(work / (ns + ".events")))
            argv = ["ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-t", "10", "-T", "2",
                    "-s", str(work / "udhcpc.sh")]  # fmt: skip
            argv += ["-R"] if ns == keeper else ["-q", "-n"]
            procs[ns] = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for ns in dh:
            env = dict(os.environ)  # dhclient hands its script only what -e defines
            argv = ["ip", "netns", "exec", ns, "dhclient", "-1", "-d", "-sf", str(work / "dhclient.sh"),
                    "-e", "CBT_LOG=%s" % (work / (ns + ".events")),
                    "-pf", str(work / (ns + ".pid")), "-lf", str(work / (ns + ".leases")), "eth0"]  # fmt: skip
            procs[ns] = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def bound():
            got = {}
            for ns in CLIENTS:
                for ev in events(work / (ns + ".events")):
                    if ev[0] in ("bound", "BOUND"):
                        got[ns] = fields(ev)
            return got if len(got) == len(CLIENTS) else None

        got = wait_for(bound, 60, "20 clients to get a lease")
        took = time.monotonic() - start
        ips = {ns: f["ip"] for ns, f in got.items()}
        assert len(set(ips.values())) == 20, ips
        assert all(ip.startswith("10.99.0.") and int(ip.rsplit(".", 1)[1]) >= 10 for ip in ips.values())
        used = {f.get("serverid") for f in got.values()}
        assert used <= set(SERVERS.values())
        table = wait_for(lambda: (lambda t: t if len([v for v in t.values() if v["state"] == "bound"]) == 20 else None)(
            leases(agent)), 10, "20 bound leases in Consul")  # fmt: skip
        bound_ips = {ip for ip, v in table.items() if v["state"] == "bound"}
        assert bound_ips == set(ips.values())
        macs = {v["mac"] for ip, v in table.items() if v["state"] == "bound"}
        assert macs == {ns_mac(2 + i) for i in range(1, 21)}
        print("\n20 leases in %.1f s; servers chosen: %s" % (took, sorted(used)))

        # renew keeps the address (udhcpc: SIGUSR1 -> unicast REQUEST from ciaddr, RENEWING)
        before = table[ips[keeper]]["expires"]
        time.sleep(1.1)
        procs[keeper].send_signal(signal.SIGUSR1)
        renewed = wait_for(lambda: [e for e in events(work / (keeper + ".events")) if e[0] == "renew"], 15, "renew")
        assert fields(renewed[-1])["ip"] == ips[keeper]
        assert leases(agent)[ips[keeper]]["expires"] > before
        # release frees it (udhcpc -R sends DHCPRELEASE on SIGTERM; dhclient -r)
        procs[keeper].send_signal(signal.SIGTERM)
        procs[keeper].wait(10)
        wait_for(lambda: ips[keeper] not in leases(agent), 10, "udhcpc's lease to be released")
        files = ["-pf", str(work / (dh[0] + ".pid")), "-lf", str(work / (dh[0] + ".leases"))]
        log = "CBT_LOG=%s" % (work / (dh[0] + ".events"))
        rel = sh("ip", "netns", "exec", dh[0], "dhclient", "-r", "-sf", str(work / "dhclient.sh"), "-e", log, *files,
                 "eth0", check=False)  # fmt: skip
        assert rel.returncode == 0, rel.stderr
        wait_for(lambda: ips[dh[0]] not in leases(agent), 10, "dhclient's lease to be released")
        assert len(leases(agent)) == 18
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # SIGTERM stops both daemons cleanly
    for ns, (proc, _) in servers.items():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, ns
        assert "DHCP server stopped" in (work / (ns + ".log")).read_text()
