"""The cluster tick with the real ``cerana.platform.converge`` on a 1-node nspawn lab.

Real pieces: a ``cerana lab`` nspawn machine (systemd as PID 1), a Consul dev agent that
also answers on the lab bridge, the real node tick running in the machine (its packages
copied into the machine's ``/usr/bin/python3``, no third-party package, started with
``systemd-run``), a busybox-static dataset placed on the node, and the daemon's loop
(in-process) running the converge playbook through ansible-runner with the lab
inventory (nspawn connection). In file order:

1. standalone ``ansible-playbook cerana.platform.converge --check`` plans with the plan
   module, predicts the changes, and changes nothing;
2. the daemon converges: the bundle's network and service on the node, answering HTTP;
   then, with nothing to change, no further Ansible run;
3. the bundle is deleted: the daemon removes its instance and network.

The 3-node lab deployed with ``site.yml`` is the cluster tick issue's acceptance test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

import netlab
from ansible_collections.cerana.platform.plugins.module_utils import _clusterstate, _planner, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from cerana_cluster_tick import kv, loop
from cerana_cluster_tick.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter", "apt-get")):
    pytest.skip("needs root, iproute2, systemd-container, debootstrap and apt-get", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NODE = "node1"
UNIT = "cerana-shop_web.service"
DEB_CACHE = Path("/var/cache/cerana/test-debs")
DIST = "/usr/local/lib/python3.11/dist-packages"


def lab_cli(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "cerana_lab", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def free_subnet() -> str:
    used = []
    for args in (["-4", "addr", "show"], ["-4", "route", "show", "table", "all"]):
        for item in json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout):
            used += [IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False) for a in item.get("addr_info", [])]
            if item.get("dst") not in (None, "default"):
                try:
                    used.append(IPv4Network(item["dst"], strict=False))
                except ValueError:
                    pass
    used = [n for n in used if n.prefixlen > 0]
    for third in range(7, 250, 13):
        net = IPv4Network(f"10.234.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free 10.234.x.0/24 subnet")


def deb(package: str) -> Path:
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(DEB_CACHE.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=DEB_CACHE, check=True, capture_output=True)
        found = sorted(DEB_CACHE.glob(f"{package}_*.deb"))
    return found[-1]


def make_dataset(work: Path) -> Path:
    """busybox-static and a web page, read-only as an imported dataset is."""
    unpacked = work / "busybox-deb"
    subprocess.run(["dpkg-deb", "-x", str(deb("busybox-static")), str(unpacked)], check=True)
    root = work / "web-root"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    shutil.copy2(unpacked / "bin" / "busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "www" / "index.html").write_text("hello from the cluster tick\n")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() or path.name == "busybox" else 0o444)
    return root


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Lab:
    name: str
    work: Path
    consul: netlab.BridgeConsul
    prefix: str
    node: dict  # leader_pid, machine_id, address, netns
    inventory: Path

    def sh(self, script: str, check: bool = True, input: bytes | None = None) -> str:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.node["leader_pid"]), "-a", "/bin/sh", "-c", script],
            input=input, capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"{script}: {proc.stderr.decode()}"
        return proc.stdout.decode().strip()

    def put_tree(self, src: Path, dest: str) -> None:
        tar = subprocess.run(["tar", "-C", str(src), "-c", "."], capture_output=True, check=True).stdout
        self.sh(f"mkdir -p {dest} && tar -C {dest} -x --no-same-owner", input=tar)

    @property
    def store(self) -> _store.Store:
        return _store.Store(_store.ConnectionSettings(address=self.consul.http_addr, prefix=self.prefix))

    def declare(self, *objects) -> None:
        o = Objects(self.store)
        for obj in objects:
            current = o.get(obj.KIND, obj.id)
            o.put(obj, cas=current.mod_index if current else 0)

    def pending(self) -> tuple[str, ...]:
        state = _clusterstate.read_state(Objects(self.store), time.time())
        return _planner.plan(state, grace=3.0).changed_nodes()

    def unit_active(self) -> bool:
        return self.sh(f"systemctl is-active {UNIT} || true") == "active"

    def netns(self) -> bool:
        return self.sh("test -e /run/netns/cerana-shop && echo yes || echo no") == "yes"

    def http(self) -> str | None:
        record = self.sh("cat /run/cerana/networks/shop.json 2>/dev/null || true")
        if not record:
            return None
        address = json.loads(record)["address"]
        code = f"import urllib.request as u; print(u.urlopen('http://{address}:8080/', timeout=3).read().decode())"
        return self.sh(f'python3 -c "{code}" 2>/dev/null || true') or None


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    name = "ct" + uuid.uuid4().hex[:5]
    subnet = free_subnet()
    bridge_ip = str(IPv4Network(subnet).network_address + 1)
    work = tmp_path_factory.mktemp("ctlab")
    consul = None
    try:
        lab_cli("up", "--name", name, "--nodes", "1", "--kind", "nspawn", "--subnet", subnet)
        state = json.loads(Path(f"/run/cerana-lab/{name}/state.json").read_text())
        node = next(dict(n, address=n["address"].split("/")[0]) for n in state["nodes"] if n["name"] == NODE)
        inventory = json.loads(lab_cli("inventory", "--name", name, "--format", "json"))
        for group in inventory["all"]["children"].values():
            if NODE in group.get("hosts", {}):
                group["hosts"][NODE]["cerana_node_id"] = node["machine_id"]
        (work / "inventory.json").write_text(json.dumps(inventory))
        consul = netlab.BridgeConsul(bridge_ip).start()
        the_lab = Lab(name, work, consul, "ctlab-" + uuid.uuid4().hex[:6], node, work / "inventory.json")
        subprocess.run(["ip", "netns", "exec", node["netns"], "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)

        # the node's Python: the node tick with the collection's module_utils (no third-party package)
        pkgs = work / "pkgs"
        skip = shutil.ignore_patterns("__pycache__")
        for pkg in ("cerana_nodetick", "cerana_daemon"):
            shutil.copytree(REPO / "daemons" / pkg, pkgs / pkg, ignore=skip)
        mu = "ansible_collections/cerana/platform/plugins/module_utils"
        shutil.copytree(REPO / "collections" / mu, pkgs / mu, ignore=skip)
        the_lab.put_tree(pkgs, DIST)
        if not the_lab.sh("command -v bwrap || true"):
            bwrap = deb("bubblewrap").read_bytes()
            the_lab.sh("cat > /tmp/bwrap.deb && dpkg -i /tmp/bwrap.deb >/dev/null", input=bwrap)
        the_lab.put_tree(make_dataset(work), "/var/lib/cerana/datasets/web-root")
        the_lab.sh("chmod 0555 /var/lib/cerana/datasets/web-root")
        the_lab.sh(
            "systemd-run --unit=cerana-node-tick --property=Restart=on-failure /usr/bin/python3 -m cerana_nodetick "
            f"--consul-address {consul.bridge_addr} --kv-prefix {the_lab.prefix} --interval 1s"
        )
        wait_for(lambda: the_lab.store.get(m.dataset_heartbeat_key("web-root", node["machine_id"])), 60,
                 "the node tick's dataset heartbeat")  # fmt: skip
        the_lab.declare(
            m.Dataset.from_dict({"id": "web-root", "read_only": True}),
            m.Service.from_dict({
                "id": "web", "dataset": "web-root", "cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
                "limits": {"cpu": 0.5, "memory": 64 << 20, "processes": 32},
                "health_checks": [{"id": "tcp", "kind": "tcp", "args": {"port": 8080}, "interval": "1s",
                                   "timeout": "1s"}],
            }),
            m.Bundle.from_dict({"id": "shop", "redundancy": 1, "services": {"web": {}}}),
        )  # fmt: skip
        yield the_lab
    finally:
        if consul is not None:
            consul.stop()
        lab_cli("down", "--name", name)


def ansible_env(lab: Lab) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_", "ANSIBLE_"))}
    env.update(
        ANSIBLE_NOCOLOR="1", ANSIBLE_PIPELINING="1", CONSUL_HTTP_ADDR=lab.consul.http_addr,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}",
    )  # fmt: skip
    return env


def test_standalone_check_mode_predicts_and_changes_nothing(lab: Lab) -> None:
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(lab.inventory), "cerana.platform.converge", "--check", "--diff",
         "--limit", NODE,  # the plan is still made (on the controller, which the limit leaves out)
         "-e", json.dumps({"cerana_consul_url": lab.consul.bridge_addr, "cerana_kv_prefix": lab.prefix})],
        capture_output=True, text=True, env=ansible_env(lab), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Run the bundles (network and services)" in proc.stdout
    assert f"changed: [{NODE}] => (item=shop)" in proc.stdout, proc.stdout[-4000:]
    assert not lab.unit_active() and not lab.netns()
    assert lab.sh(f"test -e /etc/systemd/system/{UNIT} && echo yes || echo no") == "no"


@pytest.fixture(scope="module")
def tick(lab: Lab) -> Iterator[dict]:
    settings = Settings.load(
        {"name": "lab-tick", "state_dir": str(lab.work / "tick"), "inventory": str(lab.inventory),
         "node_consul_url": lab.consul.bridge_addr, "lock_ttl": "2s", "lock_delay": "1s", "grace": "3s",
         "resync": "10s", "node_retry_initial": "2s", "node_retry_max": "8s"},
        environ={"CONSUL_HTTP_ADDR": lab.consul.http_addr, "CERANA_KV_PREFIX": lab.prefix},
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(settings,), kwargs={"store": lab.store, "stop": stop})
    thread.start()
    yield {"runs": lab.work / "tick" / "runs"}
    stop.set()
    thread.join(60)
    assert not thread.is_alive()


def runs(tick: dict) -> list[str]:
    return sorted(p.name for p in tick["runs"].iterdir()) if tick["runs"].exists() else []


def test_the_daemon_converges_the_node(lab: Lab, tick: dict) -> None:
    wait_for(lambda: lab.unit_active() and lab.pending() == (), 150, "the bundle to run on the node")
    assert wait_for(lab.http, 90, "the service to answer") == "hello from the cluster tick"
    assert lab.netns()
    events = [e for e in kv.read_events(lab.store) if e.get("kind") == "run"]
    assert events and events[-1]["status"] == "ok" and events[-1]["applier"] == "lab-tick", events
    assert lab.node["machine_id"] in events[0]["nodes"]["changed"]
    hb = wait_for(lambda: lab.store.get(m.bundle_heartbeat_key("shop", lab.node["machine_id"])), 90, "a heartbeat")
    assert json.loads(hb.value)["services"]["web"]["state"] == "running"
    # converged: the heartbeats keep coming, but no Ansible run follows
    before = runs(tick)
    time.sleep(5)
    assert runs(tick) == before


def test_a_deleted_bundle_is_removed_from_the_node(lab: Lab, tick: dict) -> None:
    Objects(lab.store).delete("bundle", "shop")
    wait_for(lambda: not lab.unit_active() and not lab.netns() and lab.pending() == (), 120, "the bundle to go")
    assert lab.sh(f"test -e /etc/systemd/system/{UNIT} && echo yes || echo no") == "no"
    assert lab.sh("ls /run/cerana/bundles/shop 2>/dev/null || true") == ""
    last = [e for e in kv.read_events(lab.store) if e.get("kind") == "run"][-1]
    assert last["status"] == "ok" and last["plan"]["counts"]["stop_bundles"] == 1, last
