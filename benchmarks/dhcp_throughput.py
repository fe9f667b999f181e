"""Benchmark: DHCP exchanges per second and latency of cerana-bootserver against dnsmasq and Kea, with perfdhcp.

Run on demand as root (not a test):  .venv/bin/python benchmarks/dhcp_throughput.py [--record]

Needs ``perfdhcp`` (Debian kea-admin), ``dnsmasq`` (dnsmasq-base is enough) and ``kea-dhcp4``
(kea-dhcp4-server), and a Consul binary (scripts/ensure-consul.sh). No service is started:
dnsmasq and Kea run by hand with their state in a temporary directory.

One bridge of network namespaces (``br-cpb``, 10.96.0.0/20; helpers in ``tests/netlab.py``):
three server namespaces (10.96.0.2-4) and one client namespace running perfdhcp
(10.96.0.10; perfdhcp acts as a relay, so the answers come back to it unicast). A Consul dev
agent in the root namespace listens on the bridge address. In the same run, each server
setup gets a fresh lease state and two perfdhcp runs with full DORA exchanges:

* throughput: ``--clients`` simulated clients, offered ``--rate`` exchanges/s (far above what
  any of them sustains) for ``--duration`` s; the rate of *completed* DORA exchanges counts;
* latency: the same clients at ``--latency-rate`` exchanges/s, which all of them sustain;
  the average DISCOVER-OFFER and REQUEST-ACK delays count.

Setups: cerana-bootserver alone; three cerana-bootservers sharing one range (the same
Consul table; each DISCOVER is answered by the one server its MAC hashes to among the live
ones, see docs/bootserver.md; the run starts once every server sees the other two);
dnsmasq (``--no-ping``: its ICMP probe of every new address would measure ping, not DHCP);
Kea with its memfile backend. For cerana, the lease table is checked afterwards: no MAC
may hold two live leases, and no address may have gone to two MACs (perfdhcp's ``-x l``
list of received leases).

``--repeat N`` runs the setups N times, interleaved (cerana x1, x3, dnsmasq, Kea, then again),
and reports the median of each and of the ratios of each round, so that a burst of load from
other jobs on the machine hits every setup alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import netlab  # noqa: E402

BRIDGE = "br-cpb"
HOST_IP = "10.96.0.1"
NET = "10.96.0.0/20"
SERVERS = {"cpb-s1": "10.96.0.2", "cpb-s2": "10.96.0.3", "cpb-s3": "10.96.0.4"}
CLIENT_NS, CLIENT_IP = "cpb-p", "10.96.0.10"
RANGE = ("10.96.1.0", "10.96.15.254")
LEASE = 3600


# -- perfdhcp ------------------------------------------------------------------------------


def perfdhcp(rate, clients, duration, *, leases=False):
    """Run perfdhcp in the client namespace; returns the parsed report (and ``leases``: [(mac, ip)])."""
    argv = ["perfdhcp", "-4", "-l", "eth0", "-r", str(rate), "-R", str(clients), "-p", str(duration), "-d", "2",
            "-W", "2000000"]  # fmt: skip
    if leases:
        argv += ["-x", "l"]
    res = netlab.in_ns(CLIENT_NS, *argv, check=False, timeout=duration + 60)
    return parse_report(res.stdout, res.returncode) | ({"leases": parse_leases(res.stdout)} if leases else {})


def parse_report(text, returncode):
    out = {"exit": returncode, "rate": 0.0}
    got = re.search(r"Rate: ([\d.]+) 4-way exchanges/second", text)
    if got:
        out["rate"] = float(got.group(1))
    for block, name in (("DISCOVER-OFFER", "do"), ("REQUEST-ACK", "ra")):
        part = text.split("Statistics for: %s" % block, 1)[-1] if "Statistics for: %s" % block in text else ""
        for key, pattern in (("sent", r"sent packets: (\d+)"), ("received", r"received packets: (\d+)"),
                             ("drops", r"drops: (\d+)"), ("avg_ms", r"avg delay: ([\d.]+) ms")):  # fmt: skip
            m = re.search(pattern, part)
            out["%s_%s" % (name, key)] = float(m.group(1)) if m else None
    return out


def parse_leases(text):
    """The addresses of every ACK perfdhcp received (``-x l`` lists them, without the client's MAC)."""
    part = text.split("***Leases for REQUEST-ACK***", 1)[-1] if "***Leases for REQUEST-ACK***" in text else ""
    return re.findall(r"^[^,\n]*,(\d+\.\d+\.\d+\.\d+),", part, re.M)


# -- the servers ---------------------------------------------------------------------------


class Cerana:
    def __init__(self, agent, work, names, prefix, **settings):
        self.agent, self.prefix = agent, prefix
        netlab.kv_put(agent, prefix, "dhcp/config", json.dumps({
            "net": NET, "gateway": HOST_IP, "dns": [HOST_IP], "lease_duration": LEASE,
            "excluded": [{"start": "10.96.0.1", "end": "10.96.0.255"}],
        }))  # fmt: skip
        env = netlab.bootserver_env(agent, prefix, **({"log_level": "INFO"} | settings))
        self.procs = [netlab.Bootserver(ns, env, work / ("%s-%s.log" % (prefix, ns))) for ns in names]
        for proc in self.procs:
            proc.wait_listening()
        if len(names) > 1:  # steady state: every server sees the others (they beat every second)
            ips = [SERVERS[ns] for ns in names]
            for proc in self.procs:
                netlab.wait_for(lambda proc=proc: any(
                    line.startswith("live bootservers: " + ", ".join(ips)) for line in _peer_lines(proc.log())),
                    15, proc.ns + " to see its peers")  # fmt: skip

    def check(self, acked):
        """No MAC holds two live leases; every address perfdhcp was ACKed is bound in the table, and
        there are no more bound addresses than clients (one address per client: none went to two)."""
        table = netlab.leases(self.agent, self.prefix)
        dup_macs = netlab.duplicates(table)
        bound = {ip for ip, v in table.items() if v["state"] == "bound"}
        macs = {v["mac"] for v in table.values() if v["state"] == "bound"}
        missing = set(acked) - bound
        return {"acks": len(acked), "acked_ips": len(set(acked)), "bound": len(bound), "bound_macs": len(macs),
                "dup_macs": len(dup_macs), "acked_not_bound": len(missing),
                "dups": len(dup_macs) + len(missing) + len(bound) - len(macs)}  # fmt: skip

    def stop(self):
        for proc in self.procs:
            proc.stop()


def _peer_lines(log):
    marker = "cerana_bootserver.peers: "
    return [line.split(marker, 1)[1] for line in log.splitlines() if marker in line]


class Daemon:
    """dnsmasq or kea-dhcp4 in the first server namespace, state in ``work``."""

    def __init__(self, argv, work, name, env=None):
        self.log = open(work / (name + ".out"), "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["ip", "netns", "exec", next(iter(SERVERS)), *argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)  # fmt: skip
        time.sleep(1.5)
        if self.proc.poll() is not None:
            raise RuntimeError("%s exited: %s" % (name, (work / (name + ".out")).read_text()))

    def check(self, received):
        return {}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def dnsmasq(work):
    d = work / "dnsmasq"
    d.mkdir(parents=True)
    argv = [shutil.which("dnsmasq"), "--keep-in-foreground", "--port=0", "--no-resolv", "--no-hosts", "--no-ping",
            "--conf-file=/dev/null", "--interface=eth0", "--dhcp-authoritative",
            "--dhcp-range=%s,%s,255.255.240.0,%d" % (RANGE[0], RANGE[1], LEASE),
            "--dhcp-lease-max=10000", "--dhcp-leasefile=%s" % (d / "leases"), "--pid-file=%s" % (d / "pid"),
            "--log-facility=%s" % (d / "log"), "--user=root", "--group=root"]  # fmt: skip
    return Daemon(argv, work, "dnsmasq")


def kea(work):
    d = work / "kea"
    d.mkdir(parents=True)
    conf = {"Dhcp4": {
        "interfaces-config": {"interfaces": ["eth0"]},
        "lease-database": {"type": "memfile", "persist": True, "name": str(d / "leases.csv"), "lfc-interval": 0},
        "valid-lifetime": LEASE,
        "subnet4": [{"id": 1, "subnet": NET, "pools": [{"pool": "%s - %s" % RANGE}]}],
        "loggers": [{"name": "kea-dhcp4", "severity": "WARN", "output_options": [{"output": str(d / "kea.log")}]}],
    }}  # fmt: skip
    (d / "kea-dhcp4.conf").write_text(json.dumps(conf, indent=1))
    env = dict(os.environ, KEA_PIDFILE_DIR=str(d), KEA_LOCKFILE_DIR=str(d), KEA_LOGGER_DESTINATION=str(d / "kea.log"))
    return Daemon([shutil.which("kea-dhcp4"), "-c", str(d / "kea-dhcp4.conf")], work, "kea", env)


# -- the run -------------------------------------------------------------------------------


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": netlab.sh("nproc").stdout.strip(),
        "free": netlab.sh("free", "-h").stdout.splitlines()[1].split()[1],
        "cpu": cpu,
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


def record(info, args, res, rounds=1, ratios=None):
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text()
    if "\n## DHCP" not in text:
        raise SystemExit("docs/benchmarks.md has no '## DHCP' section to append to")
    d, c1, c3, k = res["dnsmasq"], res["cerana x1"], res["cerana x3"], res["kea"]
    run = "%d clients, %d s" % (args.clients, args.duration) + (", median of %d" % rounds if rounds > 1 else "")
    x1, x3 = (ratios["cerana x1"], ratios["cerana x3"]) if ratios else (c1["rate"] / d["rate"], c3["rate"] / d["rate"])
    row = ("| %s | %s | %s | %s | %s | %s | %.0f | %.0f | %.0f | %.0f | %.2f | %.2f | "
           "%.1f / %.1f / %.1f / %.1f | %d |") % (
        info["date"], info["nproc"], info["free"], info["cpu"], info["load"], run,
        c1["rate"], c3["rate"], d["rate"], k["rate"], x1, x3,
        c1["lat_ms"], c3["lat_ms"], d["lat_ms"], k["lat_ms"], c1["dups"] + c3["dups"],
    )  # fmt: skip
    rows = text.splitlines()
    start = next(i for i, line in enumerate(rows) if line.startswith("## DHCP"))
    end = start + 1
    while end < len(rows) and not rows[end].startswith("|"):
        end += 1
    while end < len(rows) and rows[end].startswith("|"):
        end += 1
    doc.write_text("\n".join([*rows[:end], row, *rows[end:]]).rstrip("\n") + "\n")


def median_of(rounds):
    """The median of every figure over the rounds (dups: the sum), per setup."""
    out = {}
    for label in rounds[0]:
        runs = [r[label] for r in rounds if label in r]
        out[label] = {key: statistics.median(run[key] for run in runs) for key in ("rate", "lat_ms", "lat_drops")}
        out[label]["dups"] = sum(run["dups"] for run in runs)
        out[label]["rates"] = [run["rate"] for run in runs]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="simulated clients (perfdhcp -R)")
    parser.add_argument("--rate", type=int, default=3000, help="offered exchanges/s of the throughput run")
    parser.add_argument("--duration", type=int, default=10, help="seconds of each perfdhcp run")
    parser.add_argument("--latency-rate", type=int, default=20, help="exchanges/s of the latency run")
    parser.add_argument("--only", action="append", help="run only these setups (cerana1, cerana3, dnsmasq, kea)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a cerana-bootserver setting, e.g. workers=8 (default: the defaults)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all setups, interleaved (medians reported)")
    parser.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md (DHCP)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    for tool, pkg in (("perfdhcp", "kea-admin"), ("dnsmasq", "dnsmasq-base"), ("kea-dhcp4", "kea-dhcp4-server")):
        if not shutil.which(tool):
            print("needs %s: apt-get install %s" % (tool, pkg), file=sys.stderr)
            return 2
    setups = [("cerana x1", "cerana1"), ("cerana x3", "cerana3"), ("dnsmasq", "dnsmasq"), ("kea", "kea")]
    if args.only:
        setups = [s for s in setups if s[1] in args.only]
    work = Path(tempfile.mkdtemp(prefix="cerana-dhcp-bench-"))
    rounds = []
    lab = netlab.Lab(BRIDGE, HOST_IP, [*SERVERS, CLIENT_NS], prefixlen=20)
    try:
        with lab:
            for i, (ns, ip) in enumerate(SERVERS.items(), start=2):
                lab.add(ns, "52:54:00:96:00:%02x" % i, ip)
            lab.add(CLIENT_NS, "52:54:00:96:00:0a", CLIENT_IP)
            agent = netlab.BridgeConsul(HOST_IP).start()
            try:
                n = 0
                for round_no in range(max(1, args.repeat)):
                    results = {}
                    for label, key in setups:
                        n += 1
                        results[label] = run_setup(agent, work, key, "bench%d" % n, args)
                        res = results[label]
                        print("[%d] %-10s %8.1f DORA/s   latency %6.1f ms (DO %.1f + RA %.1f) at %d/s, %d drops  %s" % (
                            round_no + 1, label, res["rate"], res["lat_ms"], res["lat_do_ms"] or 0,
                            res["lat_ra_ms"] or 0, args.latency_rate, res["lat_drops"], res["check"] or ""),
                            flush=True)  # fmt: skip
                    rounds.append(results)
            finally:
                agent.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    results = rounds[0] if len(rounds) == 1 else median_of(rounds)
    ratios = {}
    if "dnsmasq" in results:
        for label in results:
            per_round = [r[label]["rate"] / r["dnsmasq"]["rate"] for r in rounds if r["dnsmasq"]["rate"]]
            ratios[label] = statistics.median(per_round) if per_round else float("nan")
            print("%-10s %.2f x dnsmasq's rate (median of the rounds' ratios; rounds: %s)" % (
                label, ratios[label], ", ".join("%.2f" % x for x in per_round)))  # fmt: skip
    print(json.dumps(info))
    print(json.dumps({"result": results, "rounds": rounds} if len(rounds) > 1 else results, indent=1))
    bad = [label for label, res in results.items() if res["dups"]]
    if bad:
        print("DUPLICATE ADDRESSES in %s" % ", ".join(bad), file=sys.stderr)
    if args.record and len(results) == 4:
        record(info, args, results, len(rounds), ratios)
    return 1 if bad else 0


def run_setup(agent, work, key, prefix, args):
    """One setup from an empty lease state: the throughput run, the latency run, the duplicate check."""
    if key.startswith("cerana"):
        names = list(SERVERS)[: 3 if key == "cerana3" else 1]
        server = Cerana(agent, work, names, prefix, **dict(s.split("=", 1) for s in args.set))
    else:
        server = dnsmasq(work / prefix) if key == "dnsmasq" else kea(work / prefix)
    try:
        tput = perfdhcp(args.rate, args.clients, args.duration, leases=True)
        lat = perfdhcp(args.latency_rate, args.clients, args.duration, leases=True)
        check = server.check(tput["leases"] + lat["leases"])
    finally:
        server.stop()
    return {"rate": tput["rate"], "lat_ms": (lat["do_avg_ms"] or 0) + (lat["ra_avg_ms"] or 0),
            "lat_do_ms": lat["do_avg_ms"], "lat_ra_ms": lat["ra_avg_ms"],
            "lat_drops": (lat["do_drops"] or 0) + (lat["ra_drops"] or 0), "lat_rate": lat["rate"],
            "tput": {k: v for k, v in tput.items() if k != "leases"}, "check": check,
            "dups": check.get("dups", 0)}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
