"""cerana-bootserver at scale: three daemons, fifty real clients, a server killed mid-run, and perfdhcp.

Layout (created here, removed afterwards; nothing leaves the bridge; helpers in ``tests/netlab.py``):

    br-cpf 10.97.0.1/24 (root namespace; a Consul agent listens there and on 127.0.0.1)
      ├── cpf-s1 .. cpf-s3 eth0 10.97.0.2-4   cerana-bootserver (a fresh KV prefix for each test)
      ├── cpf-p eth0 10.97.0.5                perfdhcp (Debian kea-admin; it acts as a relay)
      └── cpf-c1 .. cpf-c50 eth0              busybox udhcpc, started in batches of 10

Every test checks both sides for duplicates: the addresses the clients got, and the lease
table in Consul (one bound lease per client, no MAC with two live leases).

Needs root, ``ip`` and ``busybox``; the perfdhcp test also ``perfdhcp`` (skipped without it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import netlab
from netlab import events, fields, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BRIDGE = "br-cpf"
HOST_IP = "10.97.0.1"
SERVERS = {"cpf-s1": "10.97.0.2", "cpf-s2": "10.97.0.3", "cpf-s3": "10.97.0.4"}
PERF_NS, PERF_IP = "cpf-p", "10.97.0.5"
CLIENTS = ["cpf-c%d" % i for i in range(1, 51)]
BATCH = 10
PERFDHCP = shutil.which("perfdhcp") or next((p for p in ("/usr/sbin/perfdhcp",) if os.path.exists(p)), None)


def ns_mac(ns):
    """52:54:00:97:<kind>:<n>: kind 0 for servers and perfdhcp, 1 for clients."""
    if ns in CLIENTS:
        return "52:54:00:97:01:%02x" % (CLIENTS.index(ns) + 1)
    return "52:54:00:97:00:%02x" % ([*SERVERS, PERF_NS].index(ns) + 2)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("busybox"):
        pytest.skip("needs root, ip and busybox")
    work = tmp_path_factory.mktemp("cpf")
    with netlab.Lab(BRIDGE, HOST_IP, [*SERVERS, PERF_NS, *CLIENTS]) as lab:
        for ns in [*SERVERS, PERF_NS, *CLIENTS]:
            lab.add(ns, ns_mac(ns), SERVERS.get(ns) or (PERF_IP if ns == PERF_NS else None))
        netlab.write_scripts(work)
        agent = netlab.BridgeConsul(HOST_IP).start()
        try:
            yield work, agent
        finally:
            agent.stop()


@pytest.fixture
def trio(lab, request):
    """Three bootservers sharing a fresh lease table (KV prefix named after the test)."""
    work, agent = lab
    prefix = "cpf-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    netlab.kv_put(agent, prefix, "dhcp/config", json.dumps({
        "net": "10.97.0.0/24", "gateway": HOST_IP, "dns": [HOST_IP], "lease_duration": 600,
        "excluded": [{"start": "10.97.0.1", "end": "10.97.0.9"}],
    }))  # fmt: skip
    env = netlab.bootserver_env(agent, prefix)
    servers = {ns: netlab.Bootserver(ns, env, work / ("%s-%s.log" % (prefix, ns))) for ns in SERVERS}
    try:
        for server in servers.values():
            server.wait_listening()
        yield prefix, servers
    finally:
        for server in servers.values():
            server.stop()


def run_clients(work, tag, names, *, keep=(), between=None):
    """udhcpc in every namespace of ``names``, BATCH at a time (each batch runs concurrently and
    exits once bound). ``keep`` stay running (returned); ``between(batch_number)`` runs after each
    batch started. Returns ({ns: bound fields}, {ns: Popen of the kept clients})."""
    kept = {}
    for b in range(0, len(names), BATCH):
        batch = names[b : b + BATCH]
        procs = {ns: netlab.udhcpc(ns, work / "udhcpc.sh", work / ("%s-%s.events" % (tag, ns)), keep=ns in keep)
                 for ns in batch}  # fmt: skip
        if between is not None:
            between(b // BATCH)
        for ns, proc in procs.items():
            if ns in keep:
                kept[ns] = proc
                wait_for(lambda ns=ns: netlab.bound(work / ("%s-%s.events" % (tag, ns))), 60, ns + " to bind")
            else:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    got = {ns: netlab.bound(work / ("%s-%s.events" % (tag, ns))) for ns in names}
    return got, kept


def check_table(agent, prefix, ips):
    """The lease table holds exactly one bound lease per client, at the client's address and MAC."""
    table = netlab.leases(agent, prefix)
    bound = {ip: v["mac"] for ip, v in table.items() if v["state"] == "bound"}
    assert netlab.duplicates(table) == {}
    assert bound == {ip: ns_mac(ns) for ns, ip in ips.items()}
    return table


def test_three_servers_fifty_clients(lab, trio):
    work, agent = lab
    prefix, _servers = trio
    keeper = CLIENTS[-1]  # stays: renew with SIGUSR1, release with SIGTERM (-R)
    start = time.monotonic()
    got, kept = run_clients(work, "fifty", CLIENTS, keep={keeper})
    took = time.monotonic() - start
    try:
        assert all(got.values()), sorted(ns for ns, f in got.items() if not f)
        ips = {ns: f["ip"] for ns, f in got.items()}
        assert len(set(ips.values())) == 50, ips
        assert all(ip.startswith("10.97.0.") and int(ip.rsplit(".", 1)[1]) >= 10 for ip in ips.values())
        chosen = {f["serverid"] for f in got.values()}
        assert chosen <= set(SERVERS.values())
        table = wait_for(lambda: check_table(agent, prefix, ips), 10, "50 bound leases in Consul")
        print("\n50 leases in %.1f s (batches of %d); servers chosen: %s" % (took, BATCH, sorted(chosen)))

        # renew keeps the address (SIGUSR1: a unicast REQUEST from ciaddr, RENEWING)
        log = work / ("fifty-%s.events" % keeper)
        before = table[ips[keeper]]["expires"]
        time.sleep(1.1)
        kept[keeper].send_signal(signal.SIGUSR1)
        renewed = wait_for(lambda: [e for e in events(log) if e[0] == "renew"], 15, "renew")
        assert fields(renewed[-1])["ip"] == ips[keeper]
        wait_for(lambda: netlab.leases(agent, prefix)[ips[keeper]]["expires"] > before, 10, "a later expiry")
        # release frees it (udhcpc -R sends DHCPRELEASE on SIGTERM)
        kept[keeper].send_signal(signal.SIGTERM)
        kept[keeper].wait(10)
        wait_for(lambda: ips[keeper] not in netlab.leases(agent, prefix), 10, "the lease to be released")
        del ips[keeper]
        check_table(agent, prefix, ips)
    finally:
        for proc in kept.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_server_killed_mid_run(lab, trio):
    """SIGKILL one of three servers while clients acquire: the other two serve everybody, no duplicates."""
    work, agent = lab
    prefix, servers = trio
    victim = servers["cpf-s2"]

    def kill_when_busy(batch):
        if batch == 1:  # the second batch is in flight, the first done: kill once it answered someone
            wait_for(lambda: "-> OFFER" in victim.log(), 10, "cpf-s2 to make an offer")
            victim.proc.send_signal(signal.SIGKILL)

    start = time.monotonic()
    got, _ = run_clients(work, "kill", CLIENTS, between=kill_when_busy)
    took = time.monotonic() - start
    assert victim.proc.wait(5) == -signal.SIGKILL
    # A client that cpf-s2 made an offer to just before it died asks cpf-s2 for that address
    # (a REQUEST naming its server id, which the others must leave alone), gets no answer, and
    # busybox's `udhcpc -n` gives up where a client would start over: start those once more.
    failed = sorted(ns for ns, f in got.items() if not f)
    offers = [line for line in victim.log().splitlines() if "-> OFFER" in line]
    assert all(any(f"mac={ns_mac(ns)} " in line for line in offers) for ns in failed), failed
    if failed:
        again, _ = run_clients(work, "kill-again", failed)
        got.update(again)
    assert all(got.values()), sorted(ns for ns, f in got.items() if not f)
    ips = {ns: f["ip"] for ns, f in got.items()}
    assert len(set(ips.values())) == 50, ips
    wait_for(lambda: check_table(agent, prefix, ips), 10, "50 bound leases in Consul")
    after = [f["serverid"] for ns, f in got.items() if CLIENTS.index(ns) >= 2 * BATCH]
    assert SERVERS["cpf-s2"] not in after  # the batches started after the kill: served by the survivors
    by_server = {sid: [f["serverid"] for f in got.values()].count(sid) for sid in SERVERS.values()}
    print("\n50 leases in %.1f s with cpf-s2 killed during batch 2; leases per server: %s" % (took, by_server))


@pytest.mark.skipif(PERFDHCP is None, reason="needs perfdhcp (Debian package kea-admin)")
def test_perfdhcp_full_exchanges(lab, trio):
    """perfdhcp's DORA exchanges against the three servers: no drops, no duplicate in the table."""
    work, agent = lab
    prefix, _servers = trio
    # 200 simulated clients, 20 DORA/s for 8 s; answers later than 4 s count as drops; wait 3 s at the end
    res = netlab.in_ns(PERF_NS, PERFDHCP, "-4", "-l", "eth0", "-r", "20", "-R", "200", "-p", "8", "-d", "4",
                       "-W", "3000000", "-x", "l", check=False, timeout=60)  # fmt: skip
    out = res.stdout
    (work / "perfdhcp.out").write_text(out + res.stderr)
    stats = {}
    for block in ("DISCOVER-OFFER", "REQUEST-ACK"):
        part = out.split("Statistics for: %s***" % block, 1)[1].split("***", 1)[0]
        stats[block] = {k: int(re.search(r"^%s: (\d+)" % k, part, re.M).group(1))
                        for k in ("sent packets", "received packets", "drops")}  # fmt: skip
    print("\n" + "\n".join(line for line in out.splitlines() if line.startswith(("Rate", "avg delay"))), stats)
    assert res.returncode == 0, (res.returncode, out[-2000:], res.stderr[-2000:])
    assert stats["DISCOVER-OFFER"]["sent packets"] >= 100
    assert stats["DISCOVER-OFFER"]["drops"] == 0 and stats["REQUEST-ACK"]["drops"] == 0, stats
    # Every address perfdhcp was ACKed is bound in the table, and no client holds two.
    acked = set(re.findall(r"^[^,\n]*,(\d+\.\d+\.\d+\.\d+),", out.split("***Leases for REQUEST-ACK***", 1)[1], re.M))
    table = netlab.leases(agent, prefix)
    bound = {ip: v["mac"] for ip, v in table.items() if v["state"] == "bound"}
    assert acked and acked <= set(bound), sorted(acked - set(bound))
    assert netlab.duplicates(table) == {}
    assert len(set(bound.values())) == len(bound) <= 200
