"""cerana-bootserver end to end: two daemons and twenty real DHCP clients on a bridge of network namespaces.

Layout (all created here and removed afterwards; nothing leaves the bridge; helpers in ``tests/netlab.py``):

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
import time

import pytest

import netlab
from netlab import events, fields, sh, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BRIDGE = "br-cbt"
HOST_IP = "10.99.0.1"
SERVERS = {"cbt-s1": "10.99.0.2", "cbt-s2": "10.99.0.3"}
CLIENTS = ["cbt-c%d" % i for i in range(1, 21)]
PREFIX = "cbt"
NEEDS = [shutil.which("ip"), shutil.which("busybox"), shutil.which("dhclient")]


def ns_mac(i):
    return "52:54:00:99:00:%02x" % i


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0 or not all(NEEDS):
        pytest.skip("needs root, ip, busybox and dhclient")
    work = tmp_path_factory.mktemp("cbt")
    with netlab.Lab(BRIDGE, HOST_IP, [*SERVERS, *CLIENTS]) as lab:
        for i, ns in enumerate([*SERVERS, *CLIENTS], start=1):
            lab.add(ns, ns_mac(i), SERVERS.get(ns))
        netlab.write_scripts(work)
        agent = netlab.BridgeConsul(HOST_IP).start()
        try:
            yield work, agent
        finally:
            agent.stop()


def leases(agent):
    return netlab.leases(agent, PREFIX)


@pytest.fixture(scope="module")
def servers(lab):
    work, agent = lab
    netlab.kv_put(agent, PREFIX, "dhcp/config", json.dumps({
        "net": "10.99.0.0/24", "gateway": HOST_IP, "dns": [HOST_IP], "lease_duration": 600,
        "excluded": [{"start": "10.99.0.1", "end": "10.99.0.9"}],
    }))  # fmt: skip
    env = netlab.bootserver_env(agent, PREFIX)
    procs = {ns: netlab.Bootserver(ns, env, work / (ns + ".log")) for ns in SERVERS}
    for server in procs.values():
        server.wait_listening()
    yield procs
    for server in procs.values():
        server.stop()


def test_two_servers_twenty_clients(lab, servers):
    work, agent = lab
    procs = {}
    one_shot = CLIENTS[:17]
    keeper = CLIENTS[17]  # udhcpc that stays: renew with SIGUSR1, release with SIGTERM (-R)
    dh = CLIENTS[18:]  # ISC dhclient
    start = time.monotonic()
    try:
        for ns in [*one_shot, keeper]:
            procs[ns] = netlab.udhcpc(ns, work / "udhcpc.sh", work / (ns + ".events"), keep=ns == keeper)
        for ns in dh:
            env = dict(os.environ)  # dhclient hands its script only what -e defines
            argv = ["ip", "netns", "exec", ns, "dhclient", "-1", "-d", "-sf", str(work / "dhclient.sh"),
                    "-e", "NETLAB_LOG=%s" % (work / (ns + ".events")),
                    "-pf", str(work / (ns + ".pid")), "-lf", str(work / (ns + ".leases")), "eth0"]  # fmt: skip
            procs[ns] = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def bound():
            got = {ns: netlab.bound(work / (ns + ".events")) for ns in CLIENTS}
            return got if all(got.values()) else None

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
        log = "NETLAB_LOG=%s" % (work / (dh[0] + ".events"))
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
    for ns, server in servers.items():
        assert server.stop(signal.SIGTERM) == 0, ns
        assert "DHCP server stopped" in server.log()
