"""The typed objects of module_utils/_models.py: strict validation, canonical JSON, overlay.

Rejections are table driven: every row names the exact field path the ValidationError must
carry and a fragment of its reason. Property tests build *valid* objects of every kind and
check that they survive ``to_dict``/``to_json`` round trips byte for byte (the original lost
bundle ports and bundle dataset type/quota on every decode, spec 3.3).
"""

from __future__ import annotations

import copy
import ipaddress
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.cerana.platform.plugins.module_utils import _models as m

MIB = 1 << 20


def canonical(data) -> str:
    """The canonical form, written independently of the module under test."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def changed(base: dict, *edits: tuple) -> dict:
    """A deep copy of ``base`` with ``(("a", "b"), value)`` edits; ``DROP`` removes the field."""
    out = copy.deepcopy(base)
    for where, value in edits:
        node = out
        for part in where[:-1]:
            node = node[part]
        if value is DROP:
            node.pop(where[-1], None)
        else:
            node[where[-1]] = value
    return out


DROP = object()


def edit(base: dict, **fields) -> dict:
    """``base`` with top-level fields replaced (``DROP`` removes one)."""
    return changed(base, *(((name,), value) for name, value in fields.items()))


def at(base: dict, dotted: str, value) -> dict:
    """``base`` with the nested field ``a.b.c`` replaced (``DROP`` removes it)."""
    return changed(base, (tuple(dotted.split(".")), value))


# ---------------------------------------------------------------------------
# Valid baselines (each must itself be accepted; see test_baselines_are_valid)

DATASET = {"id": "web-data", "quota": 10 * MIB, "redundancy": 2}
SERVICE = {"id": "web", "dataset": "web-data", "cmd": ["/bin/web", "--port", "8080"]}
HTTP_CHECK = {"id": "hc", "kind": "http", "args": {"port": 8080}}
BUNDLE = {
    "id": "shop",
    "redundancy": 2,
    "datasets": {
        "data": {"name": "data", "id": "web-data", "type": "rw", "quota": 5 * MIB},
        "scratch": {"name": "scratch", "type": "ramdisk", "quota": MIB},
    },
    "services": {
        "web": {
            "id": "web",
            "datasets": {
                "data": {"name": "data", "mount_point": "/data"},
                "scratch": {"name": "scratch", "mount_point": "/tmp/scratch"},
            },
        }
    },
    "ports": {"80": {"port": 80, "public": True, "external_port": 8080}, "9000": {"port": 9000}},
}
CLUSTER = {"node_ttl": 30}
DHCP = {
    "net": "10.0.0.0/24",
    "gateway": "10.0.0.1",
    "dns": ["10.0.0.2"],
    "lease_duration": 3600,
    "excluded": [{"start": "10.0.0.1", "end": "10.0.0.9"}],
    "reservations": {"52:54:00:12:34:56": "10.0.0.50"},
}
NODE = {"id": "node-1", "hostname": "node-1.example", "heartbeat": "2026-11-30T03:04:05Z"}
DATASET_HB = {"dataset": "web-data", "node": "node-1", "in_use": True, "time": "2026-11-30T03:04:05Z"}
BUNDLE_HB = {
    "bundle": "shop",
    "node": "node-1",
    "time": "2026-11-30T03:04:05Z",
    "services": {"web": {"state": "running", "health": {"hc": None}}},
}


def service_with_check(check: dict) -> dict:
    return changed(SERVICE, (("health_checks",), {"hc": check}))


def check_args(kind: str, args: dict, **extra) -> dict:
    return service_with_check({"id": "hc", "kind": kind, "args": args, **extra})


HC = "service.health_checks.hc"

# {model: [(data, field path, reason fragment), ...]}
REJECTIONS = {
    m.Dataset: [
        (edit(DATASET, id="Web"), "dataset.id", "lowercase DNS label"),
        (edit(DATASET, id="a" * 64), "dataset.id", "1-63 characters"),
        (edit(DATASET, id="-web"), "dataset.id", "no leading"),
        (edit(DATASET, id="web-"), "dataset.id", "trailing '-'"),
        (edit(DATASET, id="web_data"), "dataset.id", "DNS label"),
        (edit(DATASET, id=""), "dataset.id", "must not be empty"),
        (edit(DATASET, id=DROP), "dataset.id", "is required"),
        (edit(DATASET, id=5), "dataset.id", "must be a string, got 5"),
        (edit(DATASET, redundancy=0), "dataset.redundancy", "must be 1-1000, got 0"),
        (edit(DATASET, redundancy=True), "dataset.redundancy", "must be an integer, got True"),
        (edit(DATASET, redundancy="2"), "dataset.redundancy", 'must be an integer, got "2"'),
        (edit(DATASET, redundancy=2.0), "dataset.redundancy", "must be an integer"),
        (edit(DATASET, quota=0), "dataset.quota", "must be >= 1, got 0"),
        (edit(DATASET, quota=-5), "dataset.quota", "must be >= 1, got -5"),
        (edit(DATASET, quota=False), "dataset.quota", "must be an integer, got False"),
        (edit(DATASET, size=3), "dataset.size", "unknown field"),
        (edit(DATASET, readOnly=True), "dataset.readOnly", "unknown field"),
        (edit(DATASET, read_only="yes"), "dataset.read_only", "must be true or false"),
        (edit(DATASET, nfs=1), "dataset.nfs", "must be true or false, got 1"),
        (edit(DATASET, parent="web-data"), "dataset.parent", "its own parent"),
        (edit(DATASET, parent="Base"), "dataset.parent", "DNS label"),
        (edit(DATASET, parent_same_node=True), "dataset.parent_same_node", "needs a parent"),
        (["web-data"], "dataset", "must be a mapping, got list"),
        (changed(DATASET, ((7,), "x")), "dataset.7", "unknown field"),
    ],
    m.Service: [
        (edit(SERVICE, id="WEB"), "service.id", "DNS label"),
        (edit(SERVICE, dataset=DROP), "service.dataset", "is required"),
        (edit(SERVICE, dataset="-x"), "service.dataset", "DNS label"),
        (edit(SERVICE, image="nginx"), "service.image", "unknown field"),
        (edit(SERVICE, kind="pod"), "service.kind", "must be one of container, vm"),
        (edit(SERVICE, cmd=DROP), "service.cmd", "required for a container"),
        (edit(SERVICE, cmd=[]), "service.cmd", "required for a container"),
        (edit(SERVICE, cmd="/bin/web"), "service.cmd", "must be a list of strings"),
        (edit(SERVICE, cmd=["/bin/web", 8080]), "service.cmd[1]", "must be a string, got 8080"),
        (edit(SERVICE, cmd=["", "x"]), "service.cmd[0]", "must not be empty"),
        (edit(SERVICE, env={"1X": "a"}), "service.env.1X", "not a valid environment variable name"),
        (edit(SERVICE, env={"A-B": "a"}), "service.env.A-B", "not a valid environment variable name"),
        (edit(SERVICE, env={"A": ["x"]}), "service.env.A", "must be a string"),
        (edit(SERVICE, env={"A": True}), "service.env.A", "must be a string, got True"),
        (edit(SERVICE, env=["A=1"]), "service.env", "must be a mapping of NAME: value"),
        (edit(SERVICE, limits={"cpu": 0}), "service.limits.cpu", "must be > 0, got 0"),
        (edit(SERVICE, limits={"cpu": -0.5}), "service.limits.cpu", "must be > 0"),
        (edit(SERVICE, limits={"cpu": True}), "service.limits.cpu", "must be a number, got True"),
        (edit(SERVICE, limits={"cpu": float("nan")}), "service.limits.cpu", "must be a finite number"),
        (edit(SERVICE, limits={"cpu": float("inf")}), "service.limits.cpu", "must be a finite number"),
        (edit(SERVICE, limits={"memory": 1000}), "service.limits.memory", "must be >= 1048576, got 1000"),
        (edit(SERVICE, limits={"memory": 2.5e6}), "service.limits.memory", "must be an integer"),
        (edit(SERVICE, limits={"processes": 0}), "service.limits.processes", "must be 1-4194304, got 0"),
        (edit(SERVICE, limits={"disk": 1}), "service.limits.disk", "unknown field"),
        (edit(SERVICE, health_checks="http"), "service.health_checks", "must be a mapping or a list"),
        (
            service_with_check({"id": "hc", "kind": "ping", "args": {}}),
            HC + ".kind",
            "must be one of http, tcp, command, file, uptime",
        ),
        (service_with_check({"id": "hc", "args": {}}), HC + ".kind", "is required"),
        (service_with_check(dict(HTTP_CHECK, retries=3)), HC + ".retries", "unknown field"),
        (service_with_check(dict(HTTP_CHECK, id="other")), HC + ".id", 'must equal its key "hc"'),
        (edit(SERVICE, health_checks={"HC": dict(HTTP_CHECK, id="HC")}), "service.health_checks.HC.id", "DNS label"),
        (
            edit(SERVICE, health_checks=[{"kind": "tcp", "args": {"port": 1}}]),
            "service.health_checks[0].id",
            "is required",
        ),
        (edit(SERVICE, health_checks=[HTTP_CHECK, HTTP_CHECK]), HC, "is declared twice"),
        (service_with_check({"id": "hc", "kind": "http", "args": [8080]}), HC + ".args", "must be a mapping"),
        (check_args("http", {"path": "/health"}), HC + ".args.port", "is required for a http check"),
        (check_args("http", {"port": 0}), HC + ".args.port", "must be 1-65535, got 0"),
        (check_args("http", {"port": 70000}), HC + ".args.port", "must be 1-65535, got 70000"),
        (check_args("http", {"port": "80"}), HC + ".args.port", 'must be an integer, got "80"'),
        (check_args("http", {"port": 80, "url": "http://x/"}), HC + ".args.url", "unknown field"),
        (
            check_args("http", {"port": 80, "body_regex": "(ok"}),
            HC + ".args.body_regex",
            "not a valid regular expression",
        ),
        (check_args("http", {"port": 80, "scheme": "ftp"}), HC + ".args.scheme", "must be one of http, https"),
        (check_args("http", {"port": 80, "path": "health"}), HC + ".args.path", "must be an absolute path"),
        (check_args("http", {"port": 80, "expect_status": 99}), HC + ".args.expect_status", "must be 100-599, got 99"),
        (check_args("http", {"port": 80, "host": ""}), HC + ".args.host", "must not be empty"),
        (check_args("tcp", {"send": "PING"}), HC + ".args.port", "is required for a tcp check"),
        (
            check_args("tcp", {"port": 6379, "expect_regex": "[+"}),
            HC + ".args.expect_regex",
            "not a valid regular expression",
        ),
        (check_args("tcp", {"port": 6379, "path": "/"}), HC + ".args.path", "unknown field"),
        (check_args("command", {}), HC + ".args.cmd", "is required for a command check"),
        (check_args("command", {"cmd": []}), HC + ".args.cmd", "must not be empty"),
        (check_args("command", {"cmd": "true"}), HC + ".args.cmd", "must be a list of strings"),
        (check_args("command", {"cmd": ["true"], "shell": True}), HC + ".args.shell", "unknown field"),
        (check_args("file", {"exists": True}), HC + ".args.path", "is required for a file check"),
        (check_args("file", {"path": "run/ok"}), HC + ".args.path", "must be an absolute path"),
        (check_args("file", {"path": "/run/../etc"}), HC + ".args.path", "without '..'"),
        (check_args("file", {"path": "/run/ok", "mode": "999"}), HC + ".args.mode", "octal mode string"),
        (check_args("file", {"path": "/run/ok", "mode": 644}), HC + ".args.mode", "octal mode string"),
        (
            check_args("file", {"path": "/run/ok", "min_size": 10, "max_size": 5}),
            HC + ".args.min_size",
            "is larger than max_size",
        ),
        (check_args("file", {"path": "/run/ok", "min_size": -1}), HC + ".args.min_size", "must be >= 0, got -1"),
        (check_args("file", {"path": "/run/ok", "exists": "no"}), HC + ".args.exists", "must be true or false"),
        (check_args("uptime", {}), HC + ".args.min_uptime", "is required for a uptime check"),
        (check_args("uptime", {"min_uptime": "forever"}), HC + ".args.min_uptime", "must be a duration"),
        (check_args("uptime", {"min_uptime": 5, "max": 9}), HC + ".args.max", "unknown field"),
        (
            check_args("tcp", {"port": 22}, interval=10, timeout=20),
            HC + ".timeout",
            "must not exceed the interval (10s), got 20",
        ),
        (
            check_args("tcp", {"port": 22}, interval="30s", timeout="1m"),
            HC + ".timeout",
            "must not exceed the interval (30s), got 60",
        ),
        (check_args("tcp", {"port": 22}, interval=0), HC + ".interval", "must be 1-86400, got 0"),
        (check_args("tcp", {"port": 22}, interval="often"), HC + ".interval", "must be a duration"),
        (check_args("tcp", {"port": 22}, timeout=0), HC + ".timeout", "must be 1-3600, got 0"),
    ],
    m.Bundle: [
        (edit(BUNDLE, id="Shop"), "bundle.id", "DNS label"),
        (edit(BUNDLE, id=42), "bundle.id", "must be a string, got 42"),
        (edit(BUNDLE, redundancy=0), "bundle.redundancy", "must be 1-1000, got 0"),
        (edit(BUNDLE, modIndex=3), "bundle.modIndex", "unknown field"),
        (edit(BUNDLE, ports={"0": {"port": 0}}), "bundle.ports.0", "must be 1-65535, got 0"),
        (edit(BUNDLE, ports={"70000": {}}), "bundle.ports.70000", "must be 1-65535, got 70000"),
        (edit(BUNDLE, ports=[{"port": 70000}]), "bundle.ports[0].port", "must be 1-65535, got 70000"),
        (edit(BUNDLE, ports=[{"public": True}]), "bundle.ports[0].port", "is required"),
        (edit(BUNDLE, ports={"http": {}}), "bundle.ports.http", 'must be an integer, got "http"'),
        (edit(BUNDLE, ports={"80": {"port": 81}}), "bundle.ports.80.port", 'must equal its key "80"'),
        (edit(BUNDLE, ports=[{"port": True}]), "bundle.ports[0].port", "must be an integer, got True"),
        (edit(BUNDLE, ports=[{"port": 80}, {"port": 80}]), "bundle.ports.80", "is declared twice"),
        (at(BUNDLE, "ports.80.external_port", 70000), "bundle.ports.80.external_port", "must be 1-65535, got 70000"),
        (at(BUNDLE, "ports.80.external_port", 0), "bundle.ports.80.external_port", "must be 1-65535, got 0"),
        (at(BUNDLE, "ports.80.public", False), "bundle.ports.80.external_port", "needs public: true"),
        (at(BUNDLE, "ports.80.public", DROP), "bundle.ports.80.external_port", "needs public: true"),
        (at(BUNDLE, "ports.80.public", "yes"), "bundle.ports.80.public", "must be true or false"),
        (
            at(BUNDLE, "ports.443", {"port": 443, "public": True, "external_port": 8080}),
            "bundle.ports.443.external_port",
            "8080 is already published for port 80",
        ),
        (
            at(BUNDLE, "ports.9000.connected_bundles", ["db", "DB"]),
            "bundle.ports.9000.connected_bundles[1]",
            "DNS label",
        ),
        (at(BUNDLE, "ports.9000.protocol", "udp"), "bundle.ports.9000.protocol", "unknown field"),
        (edit(BUNDLE, ports="80"), "bundle.ports", "must be a mapping or a list of ports"),
        (at(BUNDLE, "datasets.data.type", "nfs"), "bundle.datasets.data.type", "must be one of rw, temp, ramdisk"),
        (at(BUNDLE, "datasets.data.type", 0), "bundle.datasets.data.type", "must be one of rw, temp, ramdisk, got 0"),
        (at(BUNDLE, "datasets.data.quota", 0), "bundle.datasets.data.quota", "must be >= 1, got 0"),
        (at(BUNDLE, "datasets.data.quota", -1), "bundle.datasets.data.quota", "must be >= 1, got -1"),
        (at(BUNDLE, "datasets.data.id", "Web"), "bundle.datasets.data.id", "DNS label"),
        (at(BUNDLE, "datasets.data.name", "other"), "bundle.datasets.data.name", 'must equal its key "data"'),
        (at(BUNDLE, "datasets.data.mount_point", "/x"), "bundle.datasets.data.mount_point", "unknown field"),
        (at(BUNDLE, "datasets.scratch.id", "web-data"), "bundle.datasets.scratch.id", "a ramdisk starts empty"),
        (at(BUNDLE, "datasets.scratch.quota", DROP), "bundle.datasets.scratch.quota", "is required for a ramdisk"),
        (edit(BUNDLE, datasets="data"), "bundle.datasets", "must be a mapping or a list of datasets"),
        (
            at(BUNDLE, "services.web.datasets.logs", {"mount_point": "/logs"}),
            "bundle.services.web.datasets.logs",
            'no bundle dataset named "logs"',
        ),
        (
            at(BUNDLE, "services.web.datasets.scratch.mount_point", "/data/"),
            "bundle.services.web.datasets.scratch.mount_point",
            "/data is also used by data",
        ),
        (
            at(
                BUNDLE,
                "services.web.datasets",
                [{"name": "data", "mount_point": "/a"}, {"name": "data", "mount_point": "/b"}],
            ),
            "bundle.services.web.datasets.data",
            "is mounted twice",
        ),
        (
            at(BUNDLE, "services.web.datasets.data.mount_point", "data"),
            "bundle.services.web.datasets.data.mount_point",
            "must be an absolute path",
        ),
        (
            at(BUNDLE, "services.web.datasets.data.mount_point", "/"),
            "bundle.services.web.datasets.data.mount_point",
            "cannot be the root directory",
        ),
        (
            at(BUNDLE, "services.web.datasets.data.mount_point", "/srv/../etc"),
            "bundle.services.web.datasets.data.mount_point",
            "without '..'",
        ),
        (
            at(BUNDLE, "services.web.datasets.data.mount_point", DROP),
            "bundle.services.web.datasets.data.mount_point",
            "is required",
        ),
        (
            at(BUNDLE, "services.web.datasets.data.read_only", "true"),
            "bundle.services.web.datasets.data.read_only",
            "must be true or false",
        ),
        (
            at(BUNDLE, "services.web.datasets", "data"),
            "bundle.services.web.datasets",
            "must be a mapping or a list of mounts",
        ),
        (at(BUNDLE, "services.web.id", "api"), "bundle.services.web.id", 'must equal its key "web"'),
        (at(BUNDLE, "services.web.cmd", []), "bundle.services.web.cmd", "must not be empty"),
        (at(BUNDLE, "services.web.replicas", 2), "bundle.services.web.replicas", "unknown field"),
        (
            at(BUNDLE, "services.web.limits", {"memory": 0}),
            "bundle.services.web.limits.memory",
            "must be >= 1048576, got 0",
        ),
        (
            at(BUNDLE, "services.web.health_checks", {"hc": dict(HTTP_CHECK, interval=5, timeout=6)}),
            "bundle.services.web.health_checks.hc.timeout",
            "must not exceed the interval (5s), got 6",
        ),
    ],
    m.ClusterConfig: [
        ({"node_ttl": 0}, "cluster_config.node_ttl", "must be 1-86400, got 0"),
        ({"dataset_ttl": "0s"}, "cluster_config.dataset_ttl", "must be 1-86400, got 0"),
        ({"bundle_ttl": "2d"}, "cluster_config.bundle_ttl", "must be 1-86400, got 172800"),
        ({"node_ttl": "soon"}, "cluster_config.node_ttl", "must be a duration"),
        ({"node_ttl": "1m30s"}, "cluster_config.node_ttl", "must be a duration"),
        ({"node_ttl": True}, "cluster_config.node_ttl", "must be an integer, got True"),
        ({"history_retention": -1}, "cluster_config.history_retention", "must be >= 0, got -1"),
        ({"service_network": "10.240.0.1/16"}, "cluster_config.service_network", "did you mean 10.240.0.0/16?"),
        ({"service_network": "10.240.0.0/29"}, "cluster_config.service_network", "at most /28"),
        ({"nodeTTL": 3}, "cluster_config.nodeTTL", "unknown field"),
    ],
    m.DHCPConfig: [
        (edit(DHCP, net=DROP), "dhcp_config.net", "is required"),
        ({"net": "172.16.10.2/16"}, "dhcp_config.net", "has host bits set; did you mean 172.16.0.0/16?"),
        ({"net": "0.0.0.0/0"}, "dhcp_config.net", "must not be 0.0.0.0/0"),
        ({"net": "0.0.0.0/8"}, "dhcp_config.net", "must not be 0.0.0.0/8"),
        ({"net": "fd00::/64"}, "dhcp_config.net", "must be an IPv4 network"),
        ({"net": "10.0.0.0/31"}, "dhcp_config.net", "prefix /31 is too small; at most /30"),
        ({"net": "10.0.0.1/32"}, "dhcp_config.net", "at most /30"),
        ({"net": "10.100.10.0/33"}, "dhcp_config.net", "must be an IPv4 network"),
        ({"net": "10.0.0.0"}, "dhcp_config.net", "needs a prefix length"),
        ({"net": 167772160}, "dhcp_config.net", "must be a string"),
        (edit(DHCP, gateway="10.0.1.1"), "dhcp_config.gateway", "gateway 10.0.1.1 is outside 10.0.0.0/24"),
        (edit(DHCP, gateway="10.0.0.0"), "dhcp_config.gateway", "10.0.0.0 is the network or broadcast address"),
        (edit(DHCP, gateway="10.0.0.255"), "dhcp_config.gateway", "10.0.0.255 is the network or broadcast address"),
        (edit(DHCP, gateway="router"), "dhcp_config.gateway", 'must be an IPv4 address, got "router"'),
        (edit(DHCP, gateway="fd00::1"), "dhcp_config.gateway", "must be an IPv4 address"),
        # the original checked DNS entries only when a gateway was given ([quirk] 3.7): always now
        ({"net": "10.0.0.0/24", "dns": ["8.8.8"]}, "dhcp_config.dns[0]", 'must be an IPv4 address, got "8.8.8"'),
        (edit(DHCP, dns=["10.0.0.2", "dns.example"]), "dhcp_config.dns[1]", "must be an IPv4 address"),
        (edit(DHCP, dns=[8]), "dhcp_config.dns[0]", "must be a string, got 8"),
        (edit(DHCP, dns="10.0.0.2"), "dhcp_config.dns", "must be a list of strings"),
        (edit(DHCP, lease_duration=59), "dhcp_config.lease_duration", "must be 60-604800, got 59"),
        (edit(DHCP, lease_duration=0), "dhcp_config.lease_duration", "must be 60-604800, got 0"),
        (edit(DHCP, lease_duration="8d"), "dhcp_config.lease_duration", "must be 60-604800, got 691200"),
        (edit(DHCP, lease_duration=604801), "dhcp_config.lease_duration", "got 604801"),
        (edit(DHCP, lease_duration="1h30m"), "dhcp_config.lease_duration", "must be a duration"),
        (edit(DHCP, duration="1h"), "dhcp_config.duration", "unknown field"),
        (
            edit(DHCP, excluded=[{"start": "10.0.0.20", "end": "10.0.0.10"}]),
            "dhcp_config.excluded[0]",
            "end 10.0.0.10 is before start 10.0.0.20",
        ),
        (
            edit(DHCP, excluded=[{"start": "10.0.1.5"}]),
            "dhcp_config.excluded[0].start",
            "address 10.0.1.5 is outside 10.0.0.0/24",
        ),
        (
            edit(DHCP, excluded=[{"start": "10.0.0.1", "end": "10.0.0.9"}, {"start": "10.0.0.200", "end": "10.0.1.5"}]),
            "dhcp_config.excluded[1].end",
            "address 10.0.1.5 is outside",
        ),
        (edit(DHCP, excluded=[{"end": "10.0.0.5"}]), "dhcp_config.excluded[0].start", "is required"),
        (
            edit(DHCP, excluded=[{"start": "10.0.0.5", "stop": "10.0.0.6"}]),
            "dhcp_config.excluded[0].stop",
            "unknown field",
        ),
        (edit(DHCP, excluded="10.0.0.5"), "dhcp_config.excluded", "must be a list"),
        (
            edit(DHCP, reservations={"52:54:00:12:34": "10.0.0.50"}),
            "dhcp_config.reservations.52:54:00:12:34",
            "must be a MAC address",
        ),
        (
            edit(DHCP, reservations={"zz:54:00:12:34:56": "10.0.0.50"}),
            "dhcp_config.reservations.zz:54:00:12:34:56",
            "must be a MAC address",
        ),
        (
            edit(DHCP, reservations={"52:54:00:12:34:56": "10.0.1.50"}),
            "dhcp_config.reservations.52:54:00:12:34:56",
            "address 10.0.1.50 is outside 10.0.0.0/24",
        ),
        (
            edit(DHCP, reservations={"52:54:00:12:34:56": "10.0.0.255"}),
            "dhcp_config.reservations.52:54:00:12:34:56",
            "network or broadcast",
        ),
        (
            edit(DHCP, reservations={"52:54:00:12:34:56": "host-a"}),
            "dhcp_config.reservations.52:54:00:12:34:56",
            "must be an IPv4 address",
        ),
        (
            edit(DHCP, reservations={"52:54:00:12:34:56": "10.0.0.50", "52:54:00:aa:bb:cc": "10.0.0.50"}),
            "dhcp_config.reservations.52:54:00:aa:bb:cc",
            "10.0.0.50 is already reserved for 52:54:00:12:34:56",
        ),
        (
            edit(DHCP, reservations={"52:54:00:12:34:56": "10.0.0.50", "52-54-00-12-34-56": "10.0.0.51"}),
            "dhcp_config.reservations.52:54:00:12:34:56",
            "is declared twice",
        ),
        (
            edit(DHCP, reservations={"52:54:00:12:34:56": "10.0.0.1"}),
            "dhcp_config.reservations.52:54:00:12:34:56",
            "10.0.0.1 is the gateway",
        ),
        (
            edit(DHCP, reservations=["52:54:00:12:34:56"]),
            "dhcp_config.reservations",
            "must be a mapping of MAC address",
        ),
    ],
    m.Node: [
        (edit(NODE, id="Node_1"), "node.id", "DNS label"),
        (edit(NODE, hostname=DROP), "node.hostname", "is required"),
        (edit(NODE, heartbeat="yesterday"), "node.heartbeat", "must be an RFC 3339 time"),
        (edit(NODE, heartbeat="2026-11-30T03:04:05"), "node.heartbeat", "must carry a time zone"),
        (edit(NODE, heartbeat="0001-01-01T00:00:00+01:00"), "node.heartbeat", "must be an RFC 3339 time"),
        (
            edit(NODE, addresses=["10.0.0.1", "10.0.0.300"]),
            "node.addresses[1]",
            'must be an IP address, got "10.0.0.300"',
        ),
        (edit(NODE, load=[0.1, 0.2]), "node.load", "must be [load1, load5, load15]"),
        (edit(NODE, load=[0.1, "x", 0.3]), "node.load[1]", "must be a number"),
        (edit(NODE, load=[0.1, 0.2, float("nan")]), "node.load[2]", "must be a finite number"),
        (edit(NODE, cpu_count=-1), "node.cpu_count", "must be >= 0, got -1"),
        (edit(NODE, memory_free=True), "node.memory_free", "must be an integer, got True"),
        (edit(NODE, labels={"rack": 3}), "node.labels", "must be a mapping of strings"),
        (edit(NODE, ip="10.0.0.1"), "node.ip", "unknown field"),
    ],
    m.DatasetHeartbeat: [
        (edit(DATASET_HB, in_use="true"), "dataset_heartbeat.in_use", "must be true or false"),
        (edit(DATASET_HB, node="10.0.0.1"), "dataset_heartbeat.node", "DNS label"),
        (edit(DATASET_HB, time=DROP), "dataset_heartbeat.time", "is required"),
    ],
    m.BundleHeartbeat: [
        (at(BUNDLE_HB, "services.web.state", DROP), "bundle_heartbeat.services.web.state", "is required"),
        (at(BUNDLE_HB, "services.web.health", {"hc": 1}), "bundle_heartbeat.services.web.health", "must map check ids"),
        (edit(BUNDLE_HB, services={"Web": {"state": "running"}}), "bundle_heartbeat.services.Web", "DNS label"),
        (edit(BUNDLE_HB, healthErrors={}), "bundle_heartbeat.healthErrors", "unknown field"),
    ],
}


def rejection_params():
    seen = {}
    for model, rows in REJECTIONS.items():
        for data, path, reason in rows:
            n = seen[path] = seen.get(path, 0) + 1
            yield pytest.param(model, data, path, reason, id=path if n == 1 else "%s#%d" % (path, n))


@pytest.mark.parametrize(("model", "data", "path", "reason"), list(rejection_params()))
def test_rejects(model, data, path, reason):
    with pytest.raises(m.ValidationError) as info:
        model.from_dict(data)
    err = info.value
    assert err.path == path, str(err)
    assert reason in err.reason, str(err)
    assert str(err) == "%s: %s" % (path, err.reason)


def test_error_message_matches_the_documented_example():
    with pytest.raises(m.ValidationError) as info:
        m.Bundle.from_dict(changed(BUNDLE, (("ports", "80", "external_port"), 70000)))
    assert str(info.value) == "bundle.ports.80.external_port: must be 1-65535, got 70000"


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (m.Dataset, DATASET),
        (m.Service, SERVICE),
        (m.Bundle, BUNDLE),
        (m.ClusterConfig, CLUSTER),
        (m.DHCPConfig, DHCP),
        (m.Node, NODE),
        (m.DatasetHeartbeat, DATASET_HB),
        (m.BundleHeartbeat, BUNDLE_HB),
    ],
)
def test_baselines_are_valid(model, data):
    """The rejection rows change one thing in these; they must be accepted as they are."""
    obj = model.from_dict(copy.deepcopy(data))
    assert model.from_dict(obj.to_dict()) == obj


def test_every_health_check_kind_has_a_valid_form():
    checks = {
        "h": {"kind": "http", "args": {"port": 80, "path": "/healthz", "body_regex": "^ok$"}},
        "t": {"kind": "tcp", "args": {"port": 6379, "send": "PING\r\n", "expect_regex": "PONG"}},
        "c": {"kind": "command", "args": {"cmd": ["/bin/true"]}},
        "f": {"kind": "file", "args": {"path": "/run/ready", "mode": "644", "min_size": 1, "max_size": 9}},
        "u": {"kind": "uptime", "args": {"min_uptime": "5m"}, "interval": "1m", "timeout": "30s"},
    }
    svc = m.Service.from_dict(changed(SERVICE, (("health_checks",), checks)))
    assert svc.health_checks["h"].args == {
        "port": 80,
        "path": "/healthz",
        "scheme": "http",
        "host": "127.0.0.1",
        "expect_status": 200,
        "body_regex": "^ok$",
    }
    assert svc.health_checks["f"].args["mode"] == "0644"
    assert svc.health_checks["u"].args == {"min_uptime": 300}
    assert (svc.health_checks["u"].interval, svc.health_checks["u"].timeout) == (60, 30)
    assert (svc.health_checks["c"].interval, svc.health_checks["c"].timeout) == (10, 5)
    # the list form is the same object
    as_list = [dict(check, id=key) for key, check in checks.items()]
    assert m.Service.from_dict(changed(SERVICE, (("health_checks",), as_list))) == svc


@pytest.mark.parametrize(("given", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), (45, 45), ("90", 90)])
def test_cluster_config_durations(given, seconds):
    cfg = m.ClusterConfig.from_dict({"node_ttl": given, "dataset_ttl": given, "bundle_ttl": given})
    assert (cfg.node_ttl, cfg.dataset_ttl, cfg.bundle_ttl) == (seconds, seconds, seconds)
    assert m.ClusterConfig.from_json(cfg.to_json()) == cfg


def test_cluster_config_defaults():
    assert m.ClusterConfig.from_dict({}) == m.ClusterConfig()
    assert m.ClusterConfig().to_dict() == {
        "node_ttl": 30,
        "dataset_ttl": 60,
        "bundle_ttl": 60,
        "service_network": "10.240.0.0/16",
        "history_retention": 86400,
    }


def test_dhcp_normalises():
    cfg = m.DHCPConfig.from_dict(
        {
            "net": "10.0.0.0/24",
            "lease_duration": "2h",
            "excluded": [{"start": "10.0.0.200", "end": "10.0.0.250"}, {"start": "10.0.0.5"}],
            "reservations": {"52-54-00-AA-BB-CC": "10.0.0.60", "525400123456": "10.0.0.50"},
        }
    )
    assert cfg.lease_duration == 7200
    assert [r.to_dict() for r in cfg.excluded] == [
        {"start": "10.0.0.5", "end": "10.0.0.5"},
        {"start": "10.0.0.200", "end": "10.0.0.250"},
    ]
    assert cfg.reservations == {"52:54:00:12:34:56": "10.0.0.50", "52:54:00:aa:bb:cc": "10.0.0.60"}
    assert cfg.gateway is None and cfg.dns == ()


def test_stored_value_not_json():
    with pytest.raises(m.ValidationError) as info:
        m.Dataset.from_json("{not json")
    assert info.value.path == "dataset"
    assert "not JSON" in info.value.reason


# ---------------------------------------------------------------------------
# The original's [bug]s (spec 3.3): bundle ports and bundle dataset type/quota were lost


def test_bundle_ports_survive_a_round_trip():
    bundle = m.Bundle.from_dict(BUNDLE)
    assert set(bundle.ports) == {80, 9000}
    assert bundle.ports[80] == m.BundlePort(port=80, public=True, external_port=8080)
    again = m.Bundle.from_json(bundle.to_json())
    assert again.ports == bundle.ports
    assert json.loads(bundle.to_json())["ports"]["80"] == {
        "port": 80,
        "public": True,
        "external_port": 8080,
        "connected_bundles": [],
    }


def test_bundle_dataset_type_and_quota_survive_a_round_trip():
    bundle = m.Bundle.from_dict(BUNDLE)
    again = m.Bundle.from_json(bundle.to_json())
    assert again.datasets["data"].type == "rw" and again.datasets["data"].quota == 5 * MIB
    assert again.datasets["scratch"].type == "ramdisk" and again.datasets["scratch"].quota == MIB
    stored = json.loads(bundle.to_json())["datasets"]
    assert stored["scratch"] == {"name": "scratch", "id": None, "type": "ramdisk", "quota": MIB}
    temp = m.Bundle.from_dict(changed(BUNDLE, (("datasets", "data", "type"), "temp")))
    assert m.Bundle.from_json(temp.to_json()).datasets["data"].type == "temp"


def test_equal_objects_have_equal_bytes():
    a = m.Bundle.from_dict(BUNDLE)
    reordered = dict(reversed(list(copy.deepcopy(BUNDLE).items())))
    reordered["ports"] = [reordered["ports"]["9000"], reordered["ports"]["80"]]
    b = m.Bundle.from_dict(reordered)
    assert a == b and a.to_json() == b.to_json() and hash(a) == hash(b)


# ---------------------------------------------------------------------------
# Strategies for VALID objects

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
# DNS labels: 1-63 of [a-z0-9-], no leading or trailing '-' (text + filter is faster than from_regex)
LABEL = st.text(_ALNUM + "-", min_size=1, max_size=16).filter(lambda x: x[0] != "-" and x[-1] != "-")
LONG_LABEL = st.text(_ALNUM + "-", min_size=61, max_size=61).map(lambda x: "a" + x + "9")
LABELS = st.one_of(LABEL, LONG_LABEL)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
NONEMPTY_TEXT = TEXT.filter(bool)
PORT = st.integers(1, 65535)
ABS_PATH = st.lists(LABEL, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
REGEX = st.sampled_from(["^ok$", "PONG", "[a-z]+", r"\d{3}", "(?i)healthy"])
ENV_NAME = st.tuples(st.sampled_from("AZaz_"), st.text(_ALNUM + "ABCXYZ_", max_size=8)).map("".join)
MEMORY = st.integers(MIB, 1 << 40)
CPU = st.one_of(st.integers(1, 256), st.floats(0.001, 256, allow_nan=False, allow_infinity=False))


def duration(lo: int, hi: int):
    """Seconds in [lo, hi], given as an int or as the equivalent '30s'/'5m'/'1h' string."""

    def spell(n: int):
        forms = [st.just(n), st.just("%ds" % n), st.just(str(n))]
        if n % 60 == 0:
            forms.append(st.just("%dm" % (n // 60)))
        if n % 3600 == 0:
            forms.append(st.just("%dh" % (n // 3600)))
        if n % 86400 == 0:
            forms.append(st.just("%dd" % (n // 86400)))
        return st.one_of(forms)

    return st.integers(lo, hi).flatmap(spell)


@st.composite
def datasets(draw):
    d = {"id": draw(LABELS)}
    if draw(st.booleans()):
        d["parent"] = draw(LABEL.filter(lambda p: p != d["id"]))
        d["parent_same_node"] = draw(st.booleans())
    for name in ("read_only", "nfs"):
        if draw(st.booleans()):
            d[name] = draw(st.booleans())
    if draw(st.booleans()):
        d["redundancy"] = draw(st.integers(1, 1000))
    d["quota"] = draw(st.none() | st.integers(1, 1 << 50))
    return d


def optional_args(required: dict, optional: dict):
    return st.fixed_dictionaries(required, optional=optional)


@st.composite
def health_checks(draw, check_id=None):
    kind = draw(st.sampled_from(sorted(m.HEALTH_CHECK_ARGS)))
    if kind == "http":
        args = draw(
            optional_args(
                {"port": PORT},
                {
                    "path": ABS_PATH,
                    "scheme": st.sampled_from(["http", "https"]),
                    "host": st.sampled_from(["127.0.0.1", "localhost", "::1"]),
                    "expect_status": st.integers(100, 599),
                    "body_regex": REGEX,
                },
            )
        )
    elif kind == "tcp":
        args = draw(optional_args({"port": PORT}, {"host": st.just("127.0.0.1"), "send": TEXT, "expect_regex": REGEX}))
    elif kind == "command":
        args = {"cmd": draw(st.lists(TEXT, min_size=1, max_size=3))}
    elif kind == "file":
        args = draw(
            optional_args(
                {"path": ABS_PATH},
                {"exists": st.booleans(), "mode": st.sampled_from(["644", "0644", "0755", "600", "1777"])},
            )
        )
        sizes = sorted(draw(st.lists(st.integers(0, 1 << 40), min_size=2, max_size=2)))
        if draw(st.booleans()):
            args["min_size"] = sizes[0]
        if draw(st.booleans()):
            args["max_size"] = sizes[1]
    else:
        args = {"min_uptime": draw(duration(0, 86400))}
    interval = draw(st.integers(1, 86400))
    timeout = draw(st.integers(1, min(interval, 3600)))
    check = {"id": check_id or draw(LABEL), "kind": kind, "args": args}
    if draw(st.booleans()):
        check["interval"] = draw(duration(interval, interval))
        check["timeout"] = draw(duration(timeout, timeout))
    return check


@st.composite
def check_maps(draw):
    ids = draw(st.lists(LABEL, unique=True, max_size=3))
    return {i: draw(health_checks(i)) for i in ids}


LIMITS = (
    st.fixed_dictionaries({}, optional={"cpu": CPU, "memory": MEMORY, "processes": st.integers(1, 4194304)}) | st.none()
)
ENV = st.dictionaries(ENV_NAME, TEXT | st.integers(-5, 5), max_size=3)


@st.composite
def services(draw):
    kind = draw(st.sampled_from(["container", "vm"]))
    cmd = draw(st.lists(TEXT, min_size=1 if kind == "container" else 0, max_size=4))
    if cmd and not cmd[0]:
        cmd[0] = "/bin/sh"
    d = {"id": draw(LABELS), "dataset": draw(LABELS), "kind": kind, "cmd": cmd}
    d.update(draw(st.fixed_dictionaries({}, optional={"env": ENV, "limits": LIMITS})))
    checks = draw(check_maps())
    if checks:
        d["health_checks"] = list(checks.values()) if draw(st.booleans()) else checks
    return d


@st.composite
def bundles(draw):
    names = draw(st.lists(LABEL, unique=True, max_size=4))
    bds = {}
    for name in names:
        kind = draw(st.sampled_from(m.BUNDLE_DATASET_TYPES))
        item = {"name": name, "type": kind}
        if kind == "ramdisk":
            item["quota"] = draw(st.integers(1, 1 << 34))
        else:
            item.update(draw(st.fixed_dictionaries({}, optional={"id": LABEL, "quota": st.integers(1, 1 << 50)})))
        bds[name] = item
    svcs = {}
    for sid in draw(st.lists(LABEL, unique=True, max_size=3)):
        svc = {"id": sid}
        mounted = draw(st.lists(st.sampled_from(names), unique=True) if names else st.just([]))
        if mounted:
            svc["datasets"] = {
                n: {
                    "name": n,
                    "mount_point": "/mnt/" + n + draw(st.sampled_from(["", "/"])),
                    "read_only": draw(st.booleans()),
                }
                for n in mounted
            }
        svc.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "dataset": LABEL,
                        "cmd": st.lists(TEXT, min_size=1, max_size=3),
                        "env": ENV,
                        "limits": LIMITS,
                        "health_checks": check_maps(),
                    },
                )
            )
        )
        svcs[sid] = svc
    ports = {}
    external = draw(st.lists(PORT, unique=True, max_size=4))
    for number in draw(st.lists(PORT, unique=True, max_size=4)):
        port = {"port": number}
        if draw(st.booleans()):
            port["public"] = True
            if external and draw(st.booleans()):
                port["external_port"] = external.pop()
        if draw(st.booleans()):
            port["connected_bundles"] = draw(st.lists(LABEL, max_size=3))
        ports[number] = port
    d = {"id": draw(LABELS), "datasets": bds, "services": svcs}
    if draw(st.booleans()):
        d["redundancy"] = draw(st.integers(1, 1000))
    # ports as the JSON form {"80": ...}, a Python form {80: ...} or a list
    form = draw(st.sampled_from(["str", "int", "list"]))
    if form == "str":
        d["ports"] = {str(k): v for k, v in ports.items()}
    elif form == "int":
        d["ports"] = ports
    else:
        d["ports"] = list(ports.values())
    if draw(st.booleans()):
        d["datasets"] = list(bds.values())
    return d


@st.composite
def networks(draw, max_prefix=30):
    prefix = draw(st.integers(8, max_prefix))
    address = draw(st.integers(1, (1 << 32) - 1))
    net = ipaddress.IPv4Network((address, prefix), strict=False)
    if int(net.network_address) == 0:
        net = ipaddress.IPv4Network((1 << (32 - prefix), prefix))
    return net


IPV4 = st.integers(1, (1 << 32) - 2).map(lambda n: str(ipaddress.IPv4Address(n)))
MAC = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda bs: ":".join("%02x" % b for b in bs))


@st.composite
def dhcp_configs(draw):
    net = draw(networks())
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    host = st.integers(first, last).map(lambda n: str(ipaddress.IPv4Address(n)))
    d = {"net": str(net)}
    hosts = draw(st.lists(host, unique=True, max_size=5))
    if hosts and draw(st.booleans()):
        d["gateway"] = hosts.pop()
    d["dns"] = draw(st.lists(IPV4, max_size=3))
    d["lease_duration"] = draw(duration(60, 7 * 86400))
    ranges = []
    for _ in range(draw(st.integers(0, 3))):
        a, b = sorted(
            draw(st.lists(st.integers(int(net.network_address), int(net.broadcast_address)), min_size=2, max_size=2))
        )
        r = {"start": str(ipaddress.IPv4Address(a))}
        if a != b or draw(st.booleans()):
            r["end"] = str(ipaddress.IPv4Address(b))
        ranges.append(r)
    d["excluded"] = ranges
    macs = draw(st.lists(MAC, unique=True, min_size=len(hosts), max_size=len(hosts)))
    d["reservations"] = dict(zip(macs, hosts, strict=True))
    return d


@st.composite
def cluster_configs(draw):
    return draw(
        st.fixed_dictionaries(
            {},
            optional={
                "node_ttl": duration(1, 86400),
                "dataset_ttl": duration(1, 86400),
                "bundle_ttl": duration(1, 86400),
                "history_retention": duration(0, 10 * 86400),
                "service_network": networks(max_prefix=28).map(str),
            },
        )
    )


TIMES = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
).map(lambda t: t.isoformat())
LOAD = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
SIZE = st.integers(0, 1 << 60)


@st.composite
def nodes(draw):
    d = {"id": draw(LABELS), "hostname": draw(NONEMPTY_TEXT), "heartbeat": draw(TIMES)}
    d.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "addresses": st.lists(st.ip_addresses().map(str), max_size=3),
                    "cpu_count": st.integers(0, 4096),
                    "load": st.lists(LOAD, min_size=3, max_size=3),
                    "memory_total": SIZE,
                    "memory_free": SIZE,
                    "disk_total": SIZE,
                    "disk_free": SIZE,
                    "labels": st.dictionaries(TEXT, TEXT, max_size=3),
                },
            )
        )
    )
    return d


DATASET_HEARTBEATS = st.fixed_dictionaries(
    {"dataset": LABELS, "node": LABELS, "time": TIMES}, optional={"in_use": st.booleans()}
)
BUNDLE_HEARTBEATS = st.fixed_dictionaries(
    {"bundle": LABELS, "node": LABELS, "time": TIMES},
    optional={
        "services": st.dictionaries(
            LABEL,
            st.fixed_dictionaries(
                {"state": NONEMPTY_TEXT}, optional={"health": st.dictionaries(LABEL, st.none() | TEXT, max_size=3)}
            ),
            max_size=3,
        )
    },
)

VALID = {
    "dataset": (m.Dataset, datasets()),
    "service": (m.Service, services()),
    # "bundle": test_bundle_round_trip_keeps_ports_and_datasets
    "health_check": (m.HealthCheck, health_checks()),
    "limits": (m.Limits, LIMITS.map(lambda d: d or {})),
    "cluster_config": (m.ClusterConfig, cluster_configs()),
    "dhcp_config": (m.DHCPConfig, dhcp_configs()),
    "node": (m.Node, nodes()),
    "dataset_heartbeat": (m.DatasetHeartbeat, DATASET_HEARTBEATS),
    "bundle_heartbeat": (m.BundleHeartbeat, BUNDLE_HEARTBEATS),
}

ROUND_TRIP_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HypothesisHealthCheck.too_slow])


def check_round_trip(model, data):
    obj = model.from_dict(copy.deepcopy(data))
    # from_dict must not keep references into (or modify) its input
    assert model.from_dict(copy.deepcopy(data)) == obj
    # dict and JSON round trips give the same object
    assert model.from_dict(obj.to_dict()) == obj
    text = obj.to_json()
    again = model.from_json(text)
    assert again == obj
    # the JSON is canonical and stable: re-dumping and re-encoding give the same bytes
    assert canonical(json.loads(text)) == text
    assert again.to_json() == text
    assert obj.to_bytes() == text.encode("utf-8")
    # to_dict is plain JSON data (no tuples, no dataclasses) and every field is present
    assert json.loads(text) == obj.to_dict()
    assert set(obj.to_dict()) == {f.name for f in __import__("dataclasses").fields(model)}
    return obj


@pytest.mark.parametrize("kind", sorted(VALID))
def test_round_trip(kind):
    model, strategy = VALID[kind]

    @ROUND_TRIP_SETTINGS
    @given(strategy)
    def run(data):
        check_round_trip(model, data)

    run()


@ROUND_TRIP_SETTINGS
@given(bundles())
def test_bundle_round_trip_keeps_ports_and_datasets(data):
    bundle = check_round_trip(m.Bundle, data)
    again = m.Bundle.from_json(bundle.to_json())
    ports = data["ports"] if isinstance(data["ports"], list) else list(data["ports"].values())
    assert sorted(again.ports) == sorted(p["port"] for p in ports)
    for p in ports:
        got = again.ports[p["port"]]
        assert got.public == p.get("public", False)
        assert got.external_port == p.get("external_port")
        assert got.connected_bundles == tuple(sorted(set(p.get("connected_bundles", []))))
    declared = data["datasets"] if isinstance(data["datasets"], list) else list(data["datasets"].values())
    assert sorted(again.datasets) == sorted(d["name"] for d in declared)
    for d in declared:
        got = again.datasets[d["name"]]
        assert (got.type, got.quota, got.id) == (d["type"], d.get("quota"), d.get("id"))


# ---------------------------------------------------------------------------
# overlay_bundle


def overlay_fixture():
    base_svc = m.Service.from_dict(
        {
            "id": "web",
            "dataset": "web-data",
            "cmd": ["/bin/web"],
            "env": {"A": "1", "B": "2"},
            "limits": {"cpu": 1, "memory": 256 * MIB, "processes": 100},
            "health_checks": {
                "http": {"kind": "http", "args": {"port": 8080}},
                "tcp": {"kind": "tcp", "args": {"port": 8080}},
            },
        }
    )
    datasets = {
        "web-data": m.Dataset.from_dict({"id": "web-data", "quota": 10 * MIB, "redundancy": 3, "read_only": True}),
        "other-data": m.Dataset.from_dict({"id": "other-data"}),
    }
    return {"web": base_svc}, datasets


def test_overlay_inherits_and_merges():
    services, datasets = overlay_fixture()
    bundle = m.Bundle.from_dict(
        {
            "id": "shop",
            "datasets": {
                "data": {"name": "data", "id": "web-data"},
                "scratch": {"name": "scratch", "type": "ramdisk", "quota": MIB},
            },
            "services": {
                "web": {
                    "id": "web",
                    "env": {"B": "x", "C": "3"},
                    "limits": {"memory": 512 * MIB},
                    "health_checks": {
                        "tcp": {"kind": "tcp", "args": {"port": 9090}},
                        "ready": {"kind": "file", "args": {"path": "/run/ready"}},
                    },
                    "datasets": {"data": {"name": "data", "mount_point": "/data"}},
                }
            },
            "ports": {"80": {"port": 80, "public": True, "external_port": 8080}},
        }
    )
    out = m.overlay_bundle(bundle, services, datasets)
    web = out["services"]["web"]
    # inherited where the bundle leaves it unset
    assert web["dataset"] == "web-data"
    assert web["cmd"] == ["/bin/web"]
    assert web["kind"] == "container"
    # env merged by key, the bundle's value wins
    assert web["env"] == {"A": "1", "B": "x", "C": "3"}
    # limits per field
    assert web["limits"] == {"cpu": 1, "memory": 512 * MIB, "processes": 100}
    # health checks merged by key, the bundle's replacing
    assert sorted(web["health_checks"]) == ["http", "ready", "tcp"]
    assert web["health_checks"]["tcp"]["args"]["port"] == 9090
    assert web["health_checks"]["http"]["args"]["port"] == 8080
    assert web["health_checks"]["ready"]["kind"] == "file"
    # mounts are the bundle's
    assert web["datasets"] == {"data": {"name": "data", "mount_point": "/data", "read_only": False}}
    # dataset quota from the declared dataset when the bundle sets none; its fields come along
    data = out["datasets"]["data"]
    assert data["quota"] == 10 * MIB
    assert data["id"] == "web-data" and data["name"] == "data" and data["type"] == "rw"
    assert data["redundancy"] == 3 and data["read_only"] is True
    # a ramdisk has no declared dataset and stays as it is
    assert out["datasets"]["scratch"] == {"name": "scratch", "id": None, "type": "ramdisk", "quota": MIB}
    # the rest of the bundle is untouched, and the overlay is plain JSON data
    assert out["ports"] == {"80": {"port": 80, "public": True, "external_port": 8080, "connected_bundles": []}}
    assert out["id"] == "shop"
    assert json.loads(canonical(out)) == out
    # the bundle itself is not changed
    assert bundle.services["web"].env == {"B": "x", "C": "3"}


def test_overlay_bundle_values_win():
    services, datasets = overlay_fixture()
    bundle = m.Bundle.from_dict(
        {
            "id": "shop",
            "datasets": {"data": {"name": "data", "id": "web-data", "type": "temp", "quota": 2 * MIB}},
            "services": {
                "web": {
                    "id": "web",
                    "dataset": "other-data",
                    "cmd": ["/bin/web", "--debug"],
                    "limits": {"cpu": 0.5, "memory": 64 * MIB, "processes": 7},
                    "env": {"A": "bundle"},
                }
            },
        }
    )
    out = m.overlay_bundle(bundle, services, datasets)
    web = out["services"]["web"]
    assert web["dataset"] == "other-data"
    assert web["cmd"] == ["/bin/web", "--debug"]
    assert web["limits"] == {"cpu": 0.5, "memory": 64 * MIB, "processes": 7}
    assert web["env"] == {"A": "bundle", "B": "2"}
    assert sorted(web["health_checks"]) == ["http", "tcp"]
    assert out["datasets"]["data"]["quota"] == 2 * MIB
    assert out["datasets"]["data"]["type"] == "temp"


@pytest.mark.parametrize(
    ("bundle", "path", "reason"),
    [
        ({"id": "b", "services": {"api": {"id": "api"}}}, "bundle.services.api", 'service "api" is not declared'),
        (
            {"id": "b", "datasets": {"logs": {"name": "logs", "id": "log-data"}}},
            "bundle.datasets.logs.id",
            'dataset "log-data" is not declared',
        ),
        (
            {"id": "b", "services": {"web": {"id": "web", "dataset": "missing-data"}}},
            "bundle.services.web.dataset",
            'dataset "missing-data" is not declared',
        ),
    ],
    ids=["service", "bundle-dataset", "service-dataset"],
)
def test_overlay_missing_raises(bundle, path, reason):
    services, datasets = overlay_fixture()
    with pytest.raises(m.ValidationError) as info:
        m.overlay_bundle(m.Bundle.from_dict(bundle), services, datasets)
    assert info.value.path == path
    assert reason in info.value.reason


def test_overlay_base_dataset_of_the_service_must_be_declared():
    services, datasets = overlay_fixture()
    del datasets["web-data"]
    with pytest.raises(m.ValidationError) as info:
        m.overlay_bundle(m.Bundle.from_dict({"id": "b", "services": {"web": {"id": "web"}}}), services, datasets)
    assert info.value.path == "bundle.services.web.dataset"
    assert '"web-data" is not declared' in info.value.reason


# ---------------------------------------------------------------------------
# Times


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("2026-11-30T03:04:05Z", "2026-11-30T03:04:05.000000Z"),
        ("2026-11-30T05:04:05.5+02:00", "2026-11-30T03:04:05.500000Z"),
        ("0005-01-01T00:00:00+00:00", "0005-01-01T00:00:00.000000Z"),
    ],
)
def test_times_are_normalised_to_utc(given, stored):
    node = m.Node.from_dict(changed(NODE, (("heartbeat",), given)))
    assert node.heartbeat == stored
    assert m.Node.from_json(node.to_json()) == node


def test_format_time_matches_parse_time():
    when = datetime(2026, 11, 30, 3, 4, 5, 123456, tzinfo=UTC)
    assert m.format_time(when) == "2026-11-30T03:04:05.123456Z"
    assert m.parse_time(m.format_time(when), "t") == m.format_time(when)
