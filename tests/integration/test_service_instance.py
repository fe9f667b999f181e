"""``cerana.platform.service_instance`` on a 1-node nspawn lab (systemd as PID 1 in the machine).

Real pieces: a ``cerana lab`` nspawn machine, a Consul dev agent that also answers on the
lab bridge, bubblewrap installed into the machine from its Debian package, and a tiny
self-contained dataset (busybox-static, serving ``/www`` with ``busybox httpd``) copied
into the machine's ``/var/lib/cerana/datasets``. The module runs through
``ansible-playbook`` with the lab inventory (the nspawn connection), with the machine's bare
``/usr/bin/python3``: the node-side modules need no third-party package (on real nodes
they run with the node tick's venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils import _store
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from cerana_cli.consul_agent import ConsulAgent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "systemd-nspawn", "debootstrap", "nsenter", "apt-get")):
    pytest.skip("needs root, iproute2, systemd-container, debootstrap and apt-get", allow_module_level=True)

BIN = Path(sys.executable).parent
DEB_CACHE = Path("/var/cache/cerana/test-debs")
NODE = "node1"
UNIT = "cerana-shop_web.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
RECORD = "/run/cerana/bundles/shop/web.json"


class BridgeConsul(ConsulAgent):
    """A dev agent that also answers on the lab bridge (the machine cannot reach the host's 127.0.0.1)."""

    def __init__(self, bridge_ip: str) -> None:
        super().__init__()
        self.bridge_ip = bridge_ip

    def command(self, http_port: int) -> list[str]:
        return [
            f"-client=127.0.0.1 {self.bridge_ip}" if a.startswith("-client=") else a for a in super().command(http_port)
        ]


def host_networks() -> list[IPv4Network]:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    nets = [
        IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in json.loads(out)
        for a in link["addr_info"]
    ]
    out = subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, text=True, check=True).stdout
    for r in json.loads(out):
        if r.get("dst") not in (None, "default"):
            nets.append(IPv4Network(r["dst"], strict=False))
    return nets


def free_subnet() -> str:
    used = host_networks()
    for third in range(20, 250, 7):
        net = IPv4Network(f"10.238.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free subnet")


def lab_cli(*args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, "-m", "cerana_lab", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def deb(package: str) -> Path:
    """The package's .deb from the Debian mirror, downloaded once into DEB_CACHE."""
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(DEB_CACHE.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=DEB_CACHE, check=True, capture_output=True)
        found = sorted(DEB_CACHE.glob(f"{package}_*.deb"))
    return found[-1]


def make_dataset(work: Path) -> Path:
    """A busybox-static root with a web page: read-only modes, as an imported read-only dataset has."""
    unpacked = work / "busybox-deb"
    subprocess.run(["dpkg-deb", "-x", str(deb("busybox-static")), str(unpacked)], check=True)
    root = work / "web-root"
    (root / "bin").mkdir(parents=True)
    (root / "www").mkdir()
    shutil.copy2(unpacked / "bin" / "busybox", root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    (root / "www" / "index.html").write_text("hello from the dataset\n")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() or path.name == "busybox" else 0o444)
    return root


@dataclass
class Lab:
    name: str
    work: Path
    consul: BridgeConsul
    consul_url: str
    prefix: str

    def leader(self) -> int:
        state = json.loads(Path(f"/run/cerana-lab/{self.name}/state.json").read_text())
        return next(n["leader_pid"] for n in state["nodes"] if n["name"] == NODE)

    def sh(self, script: str, check: bool = True, input: bytes | None = None) -> str:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader()), "-a", "/bin/sh", "-c", script],
            input=input, capture_output=True, check=False,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"{script}: {proc.stderr.decode()}"
        return proc.stdout.decode().strip()

    def put_tree(self, src: Path, dest: str) -> None:
        """Copy a directory tree into the machine (modes and symlinks kept)."""
        self.sh(f"mkdir -p {dest}")
        tar = subprocess.run(["tar", "-C", str(src), "-c", "."], capture_output=True, check=True).stdout
        self.sh(f"tar -C {dest} -x --no-same-owner", input=tar)

    def objects(self) -> Objects:
        return Objects(_store.Store(_store.ConnectionSettings(address=self.consul.http_addr, prefix=self.prefix)))

    def declare(self, obj) -> None:
        objects = self.objects()
        current = objects.get(obj.KIND, obj.id)
        objects.put(obj, cas=current.mod_index if current else 0)

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show -p {','.join(props)} {UNIT}")
        return dict(line.split("=", 1) for line in out.splitlines())

    def playbook(self, bundle: str = "shop", service: str = "web", state: str = "started", *flags: str) -> dict:
        """Run the module once on the node; returns its result (with ``failed``) and the timing."""
        tag = uuid.uuid4().hex[:6]
        play = self.work / f"play-{tag}.yml"
        play.write_text(
            textwrap.dedent(f"""\
            - hosts: {NODE}
              gather_facts: false
              tasks:
                - name: Instance
                  cerana.platform.service_instance:
                    bundle: {bundle}
                    service: {service}
                    state: {state}
                    consul_url: {self.consul_url}
                    kv_prefix: {self.prefix}
            """)
        )
        record = self.work / f"play-{tag}.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_", "ANSIBLE_"))}
        env.update(
            ANSIBLE_NOCOLOR="1", ANSIBLE_CALLBACKS_ENABLED="record_results", CERANA_TEST_RECORD=str(record),
            ANSIBLE_CALLBACK_PLUGINS=str(Path(__file__).parent / "playbooks" / "callback_plugins"),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}",
        )  # fmt: skip
        start = time.monotonic()
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.work / "inventory.json"), str(play), *flags],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        lines = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        assert lines, f"no result recorded:\n{proc.stdout}\n{proc.stderr}"
        result = dict(lines[-1]["result"], failed=lines[-1]["status"] == "failed")
        result["_seconds"] = time.monotonic() - start
        return result


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = "si" + uuid.uuid4().hex[:5]
    subnet = free_subnet()
    bridge_ip = str(IPv4Network(subnet).network_address + 1)
    work = tmp_path_factory.mktemp("svclab")
    consul = None
    try:
        lab_cli("up", "--name", name, "--nodes", "1", "--kind", "nspawn", "--subnet", subnet)
        (work / "inventory.json").write_text(lab_cli("inventory", "--name", name, "--format", "json"))
        consul = BridgeConsul(bridge_ip).start()
        the_lab = Lab(name, work, consul, f"http://{bridge_ip}:{consul.http_port}", "silab-" + uuid.uuid4().hex[:6])
        # bubblewrap from its Debian package (its dependencies are in the base image)
        the_lab.sh("cat > /tmp/bwrap.deb && dpkg -i /tmp/bwrap.deb >/dev/null", input=deb("bubblewrap").read_bytes())
        the_lab.put_tree(make_dataset(work), "/var/lib/cerana/datasets/web-root")
        the_lab.sh("chmod 0555 /var/lib/cerana/datasets/web-root")
        for obj in (
            m.Dataset.from_dict({"id": "web-root", "read_only": True}),
            m.Dataset.from_dict({"id": "not-here", "read_only": True}),
            m.Service.from_dict({
                "id": "web", "dataset": "web-root",
                "cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
                "env": {"GREETING": "hello"},
                "limits": {"cpu": 0.5, "memory": 64 << 20, "processes": 32},
            }),
            m.Bundle.from_dict({
                "id": "shop",
                "datasets": {"data": {"type": "rw"}, "scratch": {"type": "ramdisk", "quota": 1 << 20},
                             "seed": {"type": "temp", "id": "web-root"}, "junk": {"type": "temp"}},
                "services": {"web": {"datasets": {
                    "data": {"mount_point": "/data"}, "scratch": {"mount_point": "/scratch"},
                    "seed": {"mount_point": "/seed"}, "junk": {"mount_point": "/junk"}}}},
                "ports": {"8080": {"port": 8080}},
            }),
            m.Bundle.from_dict({"id": "bad", "services": {"web": {"cmd": ["/bin/nope", "-x"]}}}),
            m.Bundle.from_dict({"id": "gone", "services": {"web": {"dataset": "not-here"}}}),
            m.Bundle.from_dict({"id": "clash", "services": {"web": {}}, "ports": {"8080": {"port": 8080}}}),
            m.Bundle.from_dict({"id": "crash", "services": {"web": {"cmd": ["/bin/sh", "-c", "exit 3"]}}}),
        ):  # fmt: skip
            the_lab.declare(obj)
        yield the_lab
    finally:
        if consul is not None:
            consul.stop()
        lab_cli("down", "--name", name)


def http_get(lab: Lab) -> str:
    code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/', timeout=3).read().decode())"
    return lab.sh(f'python3 -c "{code}"')


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_start_check_mode_diff_and_limits(lab: Lab) -> None:
    res = lab.playbook("shop", "web", "started", "--check", "--diff")
    assert not res["failed"], res
    assert res["changed"] and res["unit"] == UNIT
    assert "bwrap" in res["diff"]["after"] and res["diff"]["before"] == ""
    assert lab.sh(f"test -e {UNIT_PATH} && echo yes || echo no") == "no", "check mode wrote the unit"

    cursor = lab.sh("journalctl -n 0 --show-cursor").rsplit("cursor: ", 1)[1]
    res = lab.playbook("shop", "web", "started", "--diff")
    assert not res["failed"], res
    assert res["changed"] and res["active"] and res["main_pid"]
    assert res["diff"]["after"] == lab.sh(f"cat {UNIT_PATH}") + "\n"
    # a new unit is found by systemd itself, without a daemon-reload (enabled all the same, below)
    assert "systemd[1]: Reloading" not in lab.sh(f"journalctl -o short --after-cursor='{cursor}'")
    assert http_get(lab) == "hello from the dataset"
    show = lab.show("MainPID", "CPUQuotaPerSecUSec", "MemoryMax", "TasksMax", "User", "Restart", "UnitFileState")
    assert int(show["MainPID"]) == res["main_pid"]
    assert show["CPUQuotaPerSecUSec"] == "500ms"
    assert show["MemoryMax"] == str(64 << 20)
    assert show["TasksMax"] == "32"
    assert show["User"] == "cerana-svc" and show["Restart"] == "on-failure" and show["UnitFileState"] == "enabled"
    record = json.loads(lab.sh(f"cat {RECORD}"))
    assert record["pid"] == res["main_pid"] and record["datasets"] == ["web-root"]
    # the sandbox: unprivileged, its own env, read-only root, rw bind and a sized tmpfs
    pid = lab.sh("pgrep -x busybox | head -1")
    assert lab.sh(f"stat -c %U /proc/{pid}") == "cerana-svc"
    environ = lab.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()
    assert "GREETING=hello" in environ and not any(e.startswith("INVOCATION_ID=") for e in environ)
    mounts = lab.sh(f"cat /proc/{pid}/mountinfo")
    assert " /data " in mounts and " /scratch " in mounts and " /seed " in mounts and " /junk " in mounts
    # temp datasets: a fresh copy of the declared one, an empty scratch one; writes land in
    # the copy, never in the read-only dataset on the node
    # (as the sandbox's own user, inside its user and mount namespaces)
    seen = lab.sh(f"nsenter -t {pid} -U -m -S $(id -u cerana-svc) -G $(id -g cerana-svc) /bin/busybox sh -c "
                  "'/bin/busybox cat /seed/www/index.html; "
                  "echo x > /seed/new && echo y > /junk/new && /bin/busybox cat /seed/new /junk/new'")  # fmt: skip
    assert seen.split() == ["hello", "from", "the", "dataset", "x", "y"]
    assert lab.sh("ls /var/lib/cerana/datasets/web-root") == "bin\nwww"
    assert lab.sh("stat -c %U /var/lib/cerana/instances/shop/data") == "cerana-svc"


def test_idempotent_rerun_keeps_the_process(lab: Lab) -> None:
    before = lab.show("MainPID")["MainPID"]
    res = lab.playbook("shop", "web", "started", "--check")
    assert not res["failed"] and not res["changed"], res
    res = lab.playbook()
    assert not res["failed"] and not res["changed"], res
    assert str(res["main_pid"]) == before == lab.show("MainPID")["MainPID"]


def test_killed_process_is_restarted_and_recorded(lab: Lab) -> None:
    old = int(lab.show("MainPID")["MainPID"])
    lab.sh(f"kill -KILL {old}")
    new = wait_for(lambda: int(lab.show("MainPID")["MainPID"]) not in (0, old) and int(lab.show("MainPID")["MainPID"]))
    assert new, "systemd did not restart the instance"
    assert wait_for(lambda: json.loads(lab.sh(f"cat {RECORD}"))["pid"] == new), "the record was not updated"
    assert wait_for(lambda: http_get_ok(lab)), "the restarted instance does not answer"


def http_get_ok(lab: Lab) -> bool:
    try:
        return http_get(lab) == "hello from the dataset"
    except AssertionError:
        return False


def test_changed_env_restarts(lab: Lab) -> None:
    old = int(lab.show("MainPID")["MainPID"])
    stored = lab.objects().get("bundle", "shop").obj.to_dict()
    stored["services"]["web"]["env"] = {"GREETING": "bonjour"}
    lab.declare(m.Bundle.from_dict(stored))
    res = lab.playbook("shop", "web", "started", "--diff")
    assert not res["failed"] and res["changed"] and res["restarted"], res
    assert '"GREETING" "bonjour"' in res["diff"]["after"] and '"GREETING" "hello"' in res["diff"]["before"]
    assert res["main_pid"] != old and int(lab.show("MainPID")["MainPID"]) == res["main_pid"]
    pid = lab.sh("pgrep -x busybox | head -1")
    assert "GREETING=bonjour" in lab.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").splitlines()


def test_failures_leave_nothing(lab: Lab) -> None:
    res = lab.playbook("bad")
    assert res["failed"] and "/bin/nope" in res["msg"] and "web-root" in res["msg"], res
    res = lab.playbook("gone")
    assert res["failed"] and "not-here" in res["msg"] and "not on this node" in res["msg"], res
    res = lab.playbook("clash")
    assert res["failed"] and "8080" in res["msg"] and "in use" in res["msg"], res
    assert res["ports"] == [8080]
    # a command that exits at once: the start fails, and the unit, its enablement and its record go
    res = lab.playbook("crash")
    assert res["failed"] and "did not stay up" in res["msg"] and "the unit was removed" in res["msg"], res
    assert lab.sh("systemctl show -p LoadState,UnitFileState cerana-crash_web.service").splitlines() == [
        "LoadState=not-found", "UnitFileState="]  # fmt: skip
    assert lab.sh("ls /etc/systemd/system | grep -E '^cerana-(bad|gone|clash|crash)_' || true") == ""
    assert lab.sh("find /etc/systemd/system -name 'cerana-crash_*'") == ""  # no symlink left in a .wants
    assert lab.sh("ls /run/cerana/bundles") == "shop"


def test_stopped_then_absent(lab: Lab) -> None:
    res = lab.playbook("shop", "web", "stopped")
    assert not res["failed"] and res["changed"] and not res["active"], res
    assert lab.show("ActiveState", "UnitFileState") == {"ActiveState": "inactive", "UnitFileState": "disabled"}
    assert lab.sh(f"test -e {RECORD} && echo yes || echo no") == "no"
    assert lab.sh("ls -A /var/lib/cerana/instances/shop/.temp/web") == ""  # the temp copy went with the stop
    assert not lab.playbook("shop", "web", "stopped")["changed"]
    res = lab.playbook("shop", "web", "absent", "--check")
    assert res["changed"] and lab.sh(f"test -e {UNIT_PATH} && echo yes") == "yes"
    res = lab.playbook("shop", "web", "absent")
    assert not res["failed"] and res["changed"], res
    assert lab.sh(f"test -e {UNIT_PATH} && echo yes || echo no") == "no"
    assert lab.sh(f"systemctl show -p LoadState {UNIT}") == "LoadState=not-found"
    assert not lab.playbook("shop", "web", "absent")["changed"]
    # the rw data survives the removal (only the unit and the record go)
    assert lab.sh("test -d /var/lib/cerana/instances/shop/data && echo yes") == "yes"
