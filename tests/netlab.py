"""Network-namespace labs for the bootserver tests and the DHCP benchmark.

A lab is one Linux bridge in the root namespace with an address on it, and any number of
namespaces, each joined to the bridge by a veth pair whose inner end is ``eth0``. A Consul
dev agent that also listens on the bridge address serves the namespaces (they cannot reach
the host's 127.0.0.1). Nothing leaves the bridge: it has no uplink and no routing.

Used by ``tests/integration/test_bootserver_netns.py``, ``test_bootserver_scale_netns.py``
and ``benchmarks/dhcp_throughput.py`` (which puts ``tests/`` on ``sys.path``). Needs root
and iproute2.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cerana_cli.consul_agent import ConsulAgent

UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event script for the tests: configure the namespace's eth0, log the event; never touch resolv.conf.
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface" ;;
esac
echo "$1 ip=$ip serverid=$serverid lease=$lease" >> "$NETLAB_LOG"
"""

DHCLIENT_SCRIPT = """#!/bin/sh
# dhclient-script stand-in for the tests (same rules as the udhcpc script).
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr flush dev "$interface"; ip addr add "$new_ip_address/24" dev "$interface" ;;
  RELEASE|EXPIRE|FAIL|STOP) ip addr flush dev "$interface" ;;
esac
echo "$reason ip=$new_ip_address serverid=$new_dhcp_server_identifier" >> "$NETLAB_LOG"
"""


def sh(*args, check=True, timeout=60):
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


def in_ns(ns, *args, check=True, timeout=60):
    return sh("ip", "netns", "exec", ns, *args, check=check, timeout=timeout)


def wait_for(predicate, timeout, what, interval=0.1):
    """The first truthy result of ``predicate()``; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


class Lab:
    """A bridge with ``host_ip/prefixlen`` and namespaces on it. Use as a context manager.

    ``names`` lists every namespace the lab may create, so that :meth:`down` (also run
    before :meth:`up`) removes the leftovers of an interrupted run.
    """

    def __init__(self, bridge, host_ip, names, prefixlen=24):
        self.bridge = bridge
        self.host_ip = host_ip
        self.prefixlen = prefixlen
        self.names = list(names)

    def up(self):
        self.down()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", "%s/%d" % (self.host_ip, self.prefixlen), "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add(self, ns, mac, ip=None):
        """Namespace ``ns`` with ``eth0`` (MAC ``mac``, address ``ip`` if given) on the bridge."""
        if ns not in self.names:
            self.names.append(ns)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", ns + "v", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", ns + "v", "master", self.bridge, "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        if ip is not None:
            sh("ip", "-n", ns, "addr", "add", "%s/%d" % (ip, self.prefixlen), "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def down(self):
        for ns in self.names:
            # Delete the root end of the veth too: a namespace outlives `ip netns del` while
            # anything still references it, and its veth would block the next `ip link add`.
            sh("ip", "link", "del", ns + "v", check=False)
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()


class BridgeConsul(ConsulAgent):
    """A dev agent that also listens on the bridge address, so daemons inside namespaces reach it."""

    def __init__(self, host_ip, **kwargs):
        super().__init__(**kwargs)
        self.host_ip = host_ip

    def command(self, http_port):
        return [
            ("-client=127.0.0.1 %s" % self.host_ip) if a.startswith("-client=") else a
            for a in super().command(http_port)
        ]

    @property
    def bridge_addr(self):
        return "http://%s:%d" % (self.host_ip, self.http_port)


# -- Consul KV (plain HTTP, independent of the code under test) ------------------------------


def kv_put(agent, prefix, key, value):
    url = "%s/v1/kv/%s/%s" % (agent.http_addr, prefix, key)
    urllib.request.urlopen(urllib.request.Request(url, data=value.encode(), method="PUT"), timeout=5).read()


def kv_list(agent, prefix, key):
    """The raw entries below ``prefix/key`` (Consul's JSON), [] when there are none."""
    url = "%s/v1/kv/%s/%s?recurse=true" % (agent.http_addr, prefix, key)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return []
        raise


def leases(agent, prefix, pool="dhcp"):
    """{ip: lease value} of the lease table under ``prefix/pool/leases/``."""
    out = {}
    for item in kv_list(agent, prefix, pool + "/leases/"):
        out[item["Key"].rsplit("/", 1)[1]] = json.loads(base64.b64decode(item["Value"]))
    return out


def duplicates(table):
    """MACs holding more than one live (offered or bound) lease: {mac: [ip, ...]}; {} when none."""
    by_mac = {}
    for ip, lease in table.items():
        if lease["state"] in ("offered", "bound"):
            by_mac.setdefault(lease["mac"], []).append(ip)
    return {mac: ips for mac, ips in by_mac.items() if len(ips) > 1}


# -- bootservers and clients ---------------------------------------------------------------


def bootserver_env(agent, prefix, **settings):
    """Environment for a bootserver in a namespace: Consul through the bridge, DHCP only."""
    env = dict(os.environ, CONSUL_HTTP_ADDR=agent.bridge_addr, CERANA_KV_PREFIX=prefix,
               CERANA_BOOTSERVER_INTERFACE="eth0", CERANA_BOOTSERVER_LOG_LEVEL="DEBUG",
               CERANA_BOOTSERVER_MEDIA="off")  # fmt: skip
    env.update({"CERANA_BOOTSERVER_" + k.upper(): str(v) for k, v in settings.items()})
    return env


class Bootserver:
    """``python -m cerana_bootserver`` in namespace ``ns``, logging to ``log_path``."""

    def __init__(self, ns, env, log_path):
        self.ns = ns
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "cerana_bootserver"],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)  # fmt: skip

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout=30):
        wait_for(lambda: "listening on" in self.log() or self.proc.poll() is not None, timeout, self.ns + " to listen")
        assert self.proc.poll() is None, self.log()
        return self

    def stop(self, sig=None):
        """Stop (SIGKILL unless ``sig``); returns the exit status."""
        if self.proc.poll() is None:
            if sig is None:
                self.proc.kill()
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        finally:
            self._log.close()


def write_scripts(work):
    """udhcpc.sh and dhclient.sh in ``work``; returns their paths."""
    paths = []
    for name, text in (("udhcpc.sh", UDHCPC_SCRIPT), ("dhclient.sh", DHCLIENT_SCRIPT)):
        (work / name).write_text(text)
        (work / name).chmod(0o755)
        paths.append(work / name)
    return paths


def udhcpc(ns, script, events_path, *, keep=False, tries=10, timeout=2):
    """busybox udhcpc in ``ns``: one lease and exit (``-q -n``), or stay (``keep``: SIGUSR1 renews,
    SIGTERM releases)."""
    env = dict(os.environ, NETLAB_LOG=str(events_path))
    argv = ["ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-t", str(tries), "-T", str(timeout),
            "-s", str(script)]  # fmt: skip
    argv += ["-R"] if keep else ["-q", "-n"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def events(path):
    """The lines a client script logged, split into words ([] before the first)."""
    path = Path(path)
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def fields(event):
    return dict(part.split("=", 1) for part in event[1:] if "=" in part)


def bound(path):
    """The fields of the last ``bound``/``BOUND`` event logged at ``path``, or None."""
    got = None
    for ev in events(path):
        if ev[0] in ("bound", "BOUND"):
            got = fields(ev)
    return got
