"""Datasets on a 3-node netns lab: import, replicas, export, removal, faults, resume.

Real pieces only: ``cerana lab`` namespaces on a bridge, a Consul dev agent that also
listens on the bridge address, and in each namespace a ``cerana-node-tick`` and a
``cerana-dataserver`` bound to the node's address with the node's own data_dir
(node3's is an 48 MiB tmpfs, for the full-disk case). The modules run through
``ansible-playbook`` on the controller (or delegated to a node) and move data between
the namespaces over the bridge.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds
from ansible_collections.cerana.platform.plugins.module_utils import _instances, _store
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._dataclient import DataClient, DataServerError
from cerana_cli.consul_agent import ConsulAgent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if os.geteuid() != 0 or shutil.which("ip") is None:
    pytest.skip("the dataset lab tests need root and iproute2", allow_module_level=True)

BIN = Path(sys.executable).parent
PORT = 7811
MIB = 1 << 20


class BridgeConsul(ConsulAgent):
    """A dev agent that also answers on the lab bridge (namespaces cannot reach the host's 127.0.0.1)."""

    def __init__(self, bridge_ip: str) -> None:
        super().__init__()
        self.bridge_ip = bridge_ip

    def command(self, http_port: int) -> list[str]:
        return [
            f"-client=127.0.0.1 {self.bridge_ip}" if a.startswith("-client=") else a for a in super().command(http_port)
        ]


def free_subnet() -> str:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    used = [
        IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
        for link in json.loads(out)
        for a in link["addr_info"]
    ]
    for third in range(10, 250, 3):
        net = IPv4Network(f"10.233.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free subnet")


def lab_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cerana_lab", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@dataclass
class LabNode:
    name: str
    netns: str
    ip: str
    node_id: str
    data_dir: Path
    run_dir: Path
    log_dir: Path
    server: subprocess.Popen | None = None
    tick: subprocess.Popen | None = None
    logs: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{PORT}"

    def client(self) -> DataClient:
        return DataClient(self.url, timeout=30)

    def start_server(self, *extra: str) -> None:
        log = open(self.log_dir / f"{self.name}-dataserver.log", "ab")  # noqa: SIM115 - closed in stop
        self.logs.append(log)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "cerana_dataserver",
             "--data-dir", str(self.data_dir), "--address", self.ip, "--port", str(PORT),
             "--run-dir", str(self.run_dir), "--retry-window", "3s", "--fsync", "false", *extra],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self.client().health()
                return
            except DataServerError:
                assert self.server.poll() is None, (self.log_dir / f"{self.name}-dataserver.log").read_text()
                time.sleep(0.1)
        raise AssertionError(f"data server of {self.name} did not start")

    def stop_server(self, kill: bool = False) -> None:
        if self.server and self.server.poll() is None:
            (self.server.kill if kill else self.server.terminate)()
            self.server.wait(10)

    def staging_empty(self) -> bool:
        st = self.data_dir / ".staging"
        return not st.exists() or not any(st.iterdir())


@dataclass
class Lab:
    name: str
    nodes: list[LabNode]
    consul: BridgeConsul
    consul_url: str  # as seen from the namespaces
    prefix: str
    work: Path

    def store(self) -> _store.Store:
        return _store.Store(_store.ConnectionSettings(address=self.consul.http_addr, prefix=self.prefix))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CERANA_", "ANSIBLE_"))}
        env.update(
            CONSUL_HTTP_ADDR=self.consul_url, CERANA_KV_PREFIX=self.prefix, ANSIBLE_NOCOLOR="1",
            ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_LOCALHOST_WARNING="false",
            ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_CALLBACKS_ENABLED="record_results",
            ANSIBLE_CALLBACK_PLUGINS=str(Path(__file__).parent / "playbooks" / "callback_plugins"),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}",
        )  # fmt: skip
        return env

    def playbook(self, text: str, **extravars) -> dict[str, list[dict]]:
        """Run a playbook; returns {task name: [results]} (the tests' record_results callback)."""
        tag = uuid.uuid4().hex[:6]
        play = self.work / f"play-{tag}.yml"
        play.write_text(textwrap.dedent(text))
        record = self.work / f"play-{tag}.jsonl"
        inv = self.work / "inventory.yml"
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(inv), str(play), "-e", json.dumps(extravars)],
            capture_output=True, text=True, env=dict(self.env(), CERANA_TEST_RECORD=str(record)), timeout=240,
        )  # fmt: skip
        out: dict[str, list[dict]] = {}
        for line in record.read_text().splitlines() if record.exists() else []:
            item = json.loads(line)
            out.setdefault(item["task"], []).append(dict(item["result"], failed=item["status"] == "failed"))
        out["_rc"] = [{"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout}]
        return out

    def wait_heartbeats(self, dataset_id: str, count: int, timeout: float = 10) -> list[str]:
        objects = __import__(
            "ansible_collections.cerana.platform.plugins.module_utils._objects", fromlist=["Objects"]
        ).Objects(self.store())
        deadline = time.monotonic() + timeout
        while True:
            nodes = sorted(hb.node for hb in objects.dataset_heartbeats(dataset_id).get(dataset_id, []))
            if len(nodes) == count or time.monotonic() > deadline:
                return nodes
            time.sleep(0.2)

    def node(self, name: str) -> LabNode:
        return next(n for n in self.nodes if n.name == name)

    def no_leftovers(self, dataset_id: str | None = None) -> None:
        for n in self.nodes:
            assert n.staging_empty(), f"staging of {n.name} not empty: {list((n.data_dir / '.staging').iterdir())}"
            if dataset_id:
                assert not (n.data_dir / "datasets" / dataset_id).exists(), f"{dataset_id} left on {n.name}"
        if dataset_id:
            assert self.store().list(f"datasets/{dataset_id}") == []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    name = "ds" + uuid.uuid4().hex[:5]
    subnet = free_subnet()
    net = IPv4Network(subnet)
    bridge_ip = str(net.network_address + 1)
    work = tmp_path_factory.mktemp("dslab")
    lab_cli("up", "--name", name, "--nodes", "3", "--subnet", subnet)
    consul = BridgeConsul(bridge_ip).start()
    nodes: list[LabNode] = []
    mounted = None
    try:
        prefix = "dslab-" + uuid.uuid4().hex[:6]
        consul_url = f"http://{bridge_ip}:{consul.http_port}"
        for i in (1, 2, 3):
            root = work / f"node{i}"
            data_dir = root / "data"
            data_dir.mkdir(parents=True)
            if i == 3:  # a small disk for the full-disk case
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(data_dir)], check=True)
                mounted = data_dir
            node_id = uuid.uuid4().hex
            (root / "machine-id").write_text(node_id + "\n")
            n = LabNode(f"node{i}", f"{name}-node{i}", str(net.network_address + 10 + i), node_id, data_dir,
                        root / "run", work)  # fmt: skip
            n.start_server()
            tick_log = open(work / f"node{i}-tick.log", "ab")  # noqa: SIM115
            n.logs.append(tick_log)
            n.tick = subprocess.Popen(
                ["ip", "netns", "exec", n.netns, sys.executable, "-m", "cerana_nodetick",
                 "--machine-id-file", str(root / "machine-id"), "--data-dir", str(data_dir),
                 "--run-dir", str(n.run_dir), "--interval", "300ms", "--interfaces", "eth0",
                 "--consul-address", consul_url, "--kv-prefix", prefix],
                stdout=tick_log, stderr=tick_log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            nodes.append(n)
        inventory = {"all": {"hosts": {"localhost": {"ansible_connection": "local"}}}}
        for n in nodes:
            inventory["all"]["hosts"][n.name] = {
                "ansible_connection": "cerana.platform.netns", "ansible_netns": n.netns, "node_id": n.node_id,
            }  # fmt: skip
        (work / "inventory.yml").write_text(json.dumps(inventory))
        the_lab = Lab(name, nodes, consul, consul_url, prefix, work)
        store = the_lab.store()
        deadline = time.monotonic() + 20
        while len(store.list(m.NODES_PREFIX)) < 3:
            assert time.monotonic() < deadline, "the node ticks did not register"
            time.sleep(0.2)
        yield the_lab
    finally:
        for n in nodes:
            for p in (n.tick, n.server):
                if p and p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            for f in n.logs:
                f.close()
        consul.stop()
        if mounted:
            subprocess.run(["umount", str(mounted)], check=False)
        lab_cli("down", "--name", name)


def make_tree(root: Path, files: int = 3, size: int = 300_000, seed: str = "a") -> Path:
    root.mkdir(parents=True)
    (root / "sub" / "deep").mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}.bin").write_bytes((seed * 7 + str(i)).encode() * (size // 8) + os.urandom(64))
    (root / "sub" / "deep" / "note.txt").write_text("hello " + seed)
    (root / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "run.sh").chmod(0o755)
    (root / "link").symlink_to("sub/deep/note.txt")
    return root


def tar_of(src: Path, dest: Path, mode: str = "w:gz") -> Path:
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=".")
    return dest


def ok(results: dict, name: str, index: int = 0) -> dict:
    assert name in results, f"no result for {name!r}:\n{results['_rc'][0]['stdout'][-3000:]}"
    res = results[name][index]
    assert not res.get("failed"), f"{name}: {res.get('msg')}\n{results['_rc'][0]['stderr'][-2000:]}"
    return res


PLAY_HEAD = """
- hosts: localhost
  gather_facts: false
  module_defaults:
    group/cerana.platform.platform:
      consul_url: "{{ lookup('env', 'CONSUL_HTTP_ADDR') }}"
  tasks:
"""


def test_import_replicate_export_remove(lab, tmp_path):
    src = make_tree(tmp_path / "web")
    archive = tar_of(src, tmp_path / "web.tar.gz")
    want = ds.scan_tree(src).digest
    r = lab.playbook(
        PLAY_HEAD
        + """
    - name: import check
      cerana.platform.dataset_import: {src: "{{ archive }}", id: web, redundancy: 3}
      check_mode: true
      diff: true
    - name: import
      cerana.platform.dataset_import: {src: "{{ archive }}", id: web, redundancy: 3}
      diff: true
    - name: import check again
      cerana.platform.dataset_import: {src: "{{ archive }}", id: web, redundancy: 3}
      check_mode: true
    - name: import again
      cerana.platform.dataset_import: {src: "{{ archive }}", id: web, redundancy: 3}
    - name: import again from the directory, without id
      cerana.platform.dataset_import: {src: "{{ srcdir }}"}
    - name: declare it again with the dataset module
      cerana.platform.dataset: {id: web, read_only: true, redundancy: 3}
    - name: replica check
      cerana.platform.dataset_replica: {id: web, node: "{{ second }}"}
      check_mode: true
      diff: true
    - name: replica
      cerana.platform.dataset_replica: {id: web, node: "{{ second }}"}
      diff: true
    - name: replica check again
      cerana.platform.dataset_replica: {id: web, node: "{{ second }}"}
      check_mode: true
    - name: replica again
      cerana.platform.dataset_replica: {id: web, node: "{{ second }}"}
""",
        archive=str(archive),
        srcdir=str(src),
        second=lab.node("node3").node_id,
    )
    assert [ok(r, t)["changed"] for t in ("import check", "import", "import check again", "import again")] == [
        True, True, False, False]  # fmt: skip
    imported = ok(r, "import")
    # The most free disk: node1 and node2 share the host's file system (their figures move with
    # it), node3 is a 48 MiB tmpfs and must never be chosen.
    assert imported["content"]["digest"] == want and imported["node"] != lab.node("node3").node_id
    expected_first = imported["node"]
    assert imported["dataset"] == ok(r, "import check")["dataset"]
    assert imported["transfer"]["bytes"] == archive.stat().st_size
    same = ok(r, "import again from the directory, without id")
    assert same["changed"] is False and same["dataset"]["id"] == "web"  # idempotent by content
    assert ok(r, "declare it again with the dataset module")["changed"] is False
    assert [ok(r, t)["changed"] for t in ("replica check", "replica", "replica check again", "replica again")] == [
        True, True, False, False]  # fmt: skip
    assert ok(r, "replica")["replica"]["digest"] == want
    first = next(n for n in lab.nodes if n.node_id == expected_first)
    # The copy is really on two nodes, read-only, with the same digest.
    holders = [n for n in lab.nodes if (n.data_dir / "datasets" / "web").is_dir()]
    assert len(holders) == 2 and first in holders
    for n in holders:
        assert ds.scan_tree(n.data_dir / "datasets" / "web").digest == want
        assert oct((n.data_dir / "datasets" / "web" / "f0.bin").stat().st_mode & 0o777) == "0o444"
        assert oct((n.data_dir / "datasets" / "web" / "sub" / "run.sh").stat().st_mode & 0o777) == "0o555"
    assert len(lab.wait_heartbeats("web", 2)) == 2
    third = next(n for n in lab.nodes if n not in holders)
    r = lab.playbook(
        PLAY_HEAD
        + """
    - name: info before
      cerana.platform.dataset_info: {id: web}
    - name: replica three
      cerana.platform.dataset_replica: {id: web, node: "{{ third }}"}
    - name: export check
      cerana.platform.dataset_export: {id: web, dest: "{{ dest }}", compression: zstd}
      check_mode: true
    - name: export
      cerana.platform.dataset_export: {id: web, dest: "{{ dest }}", compression: zstd}
    - name: export check again
      cerana.platform.dataset_export: {id: web, dest: "{{ dest }}", compression: zstd}
      check_mode: true
    - name: export again
      cerana.platform.dataset_export: {id: web, dest: "{{ dest }}", compression: zstd}
""",
        third=third.node_id,
        dest=str(tmp_path / "out.tar.zst"),
    )
    info = ok(r, "info before")["datasets"][0]
    assert info["redundancy_met"] is False and len(info["nodes"]) == 2 and info["content"]["digest"] == want
    assert ok(r, "replica three")["changed"] is True
    assert [ok(r, t)["changed"] for t in ("export check", "export", "export check again", "export again")] == [
        True, True, False, False]  # fmt: skip
    # Export and compare: the archive holds exactly the imported tree.
    with open(tmp_path / "out.tar.zst", "rb") as f:
        assert f.read(4) == b"\x28\xb5\x2f\xfd"
    out = tmp_path / "unpacked"
    out.mkdir()
    with open(tmp_path / "out.tar.zst", "rb") as f:
        assert ds.extract_tar(f, str(out)).digest == want
    for rel in ("f0.bin", "f2.bin", "sub/deep/note.txt"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert os.readlink(out / "link") == "sub/deep/note.txt"
    assert len(lab.wait_heartbeats("web", 3)) == 3
    r = lab.playbook(PLAY_HEAD + "    - name: info\n      cerana.platform.dataset_info: {id: web}\n")
    assert ok(r, "info")["datasets"][0]["redundancy_met"] is True

    # Removal: refused while a running service uses it, then forced; then idempotent.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _instances.write_instance(
            str(third.run_dir),
            _instances.Instance("shop", "web", sleeper.pid, m.format_time(m.utc_now()), ("web",)),
        )
        r = lab.playbook(
            PLAY_HEAD
            + """
    - name: remove in use
      cerana.platform.dataset_replica: {id: web, node: "{{ third }}", state: absent}
      ignore_errors: true
    - name: remove check
      cerana.platform.dataset_replica: {id: web, node: "{{ third }}", state: absent, force: true}
      check_mode: true
    - name: remove
      cerana.platform.dataset_replica: {id: web, node: "{{ third }}", state: absent, force: true}
    - name: remove check again
      cerana.platform.dataset_replica: {id: web, node: "{{ third }}", state: absent}
      check_mode: true
    - name: remove again
      cerana.platform.dataset_replica: {id: web, node: "{{ third }}", state: absent}
""",
            third=third.node_id,
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    refused = r["remove in use"][0]
    assert refused.get("failed") and "shop/web" in refused["msg"], (refused, list(third.run_dir.rglob("*")))
    assert [ok(r, t)["changed"] for t in ("remove check", "remove", "remove check again", "remove again")] == [
        True, True, False, False]  # fmt: skip
    assert not (third.data_dir / "datasets" / "web").exists()
    assert len(lab.wait_heartbeats("web", 2)) == 2


def evil_archives(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (archive, fragment of the expected error)."""
    good = make_tree(tmp / "good", files=2, size=200_000)
    out: dict[str, tuple[Path, str]] = {}

    def raw(name: str, build, mode: str = "w") -> Path:
        path = tmp / f"{name}.tar"
        with tarfile.open(path, mode) as tf:
            build(tf)
        return path

    def member(tf, name, data=b"x", **kw):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for k, v in kw.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if info.isreg() else None)

    gz = tar_of(good, tmp / "good.tar.gz").read_bytes()
    (tmp / "truncated.tar.gz").write_bytes(gz[: len(gz) // 2])
    out["truncated"] = (tmp / "truncated.tar.gz", "Compressed file ended")
    (tmp / "garbage.tar").write_bytes(os.urandom(4096))
    out["corrupt"] = (tmp / "garbage.tar", "not a readable tar archive")
    plain = tar_of(good, tmp / "good.tar", "w").read_bytes()
    (tmp / "cut.tar").write_bytes(plain[:1536])
    out["truncated-plain"] = (tmp / "cut.tar", "truncated")
    out["dotdot"] = (raw("dotdot", lambda tf: member(tf, "a/../../etc/evil")), "'..' would leave the dataset")
    out["absolute"] = (raw("absolute", lambda tf: member(tf, "/etc/evil")), "absolute path")
    out["device"] = (raw("device", lambda tf: member(tf, "dev/null", b"", type=tarfile.CHRTYPE)), "character device")
    out["fifo"] = (raw("fifo", lambda tf: member(tf, "pipe", b"", type=tarfile.FIFOTYPE)), "FIFO")
    out["hardlink-out"] = (
        raw("hardlink", lambda tf: member(tf, "h", b"", type=tarfile.LNKTYPE, linkname="../../etc/passwd")),
        "would leave the dataset",
    )
    out["hardlink-abs"] = (
        raw("hardlink2", lambda tf: member(tf, "h", b"", type=tarfile.LNKTYPE, linkname="/etc/passwd")),
        "absolute path",
    )
    out["symlink-abs"] = (
        raw("symabs", lambda tf: member(tf, "s", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")),
        "absolute target",
    )
    out["symlink-up"] = (
        raw("symup", lambda tf: member(tf, "d/s", b"", type=tarfile.SYMTYPE, linkname="../../x")),
        "points outside",
    )

    def chain(tf):
        member(tf, "dot", b"", type=tarfile.SYMTYPE, linkname=".")
        member(tf, "esc", b"", type=tarfile.SYMTYPE, linkname="dot/..")

    out["symlink-chain"] = (raw("chain", chain), "resolves outside")

    def through(tf):
        member(tf, "s", b"", type=tarfile.SYMTYPE, linkname="sub")
        member(tf, "s/file", b"data")

    out["through-link"] = (raw("through", through), "goes through the symbolic link")
    return out


def test_bad_archives_quota_and_full_disk(lab, tmp_path):
    cases = evil_archives(tmp_path)
    tasks = "".join(
        f"""
    - name: bad {name}
      cerana.platform.dataset_import: {{src: "{path}", id: bad-{name}}}
      ignore_errors: true
"""
        for name, (path, _) in cases.items()
    )
    big = tmp_path / "big"
    big.mkdir()
    for i in range(4):
        (big / f"b{i}").write_bytes(os.urandom(16 * MIB))
    big_tar = tar_of(big, tmp_path / "big.tar", "w")
    small = make_tree(tmp_path / "small", files=2, size=1_000_000)
    n3 = lab.node("node3")
    tasks += f"""
    - name: over quota
      cerana.platform.dataset_import: {{src: "{small}", id: bad-quota, quota: 1000}}
      ignore_errors: true
    - name: full disk
      cerana.platform.dataset_import: {{src: "{big_tar}", id: bad-full, node: "{n3.node_id}"}}
      ignore_errors: true
    - name: unknown node
      cerana.platform.dataset_import: {{src: "{small}", id: bad-node, node: nosuchnode}}
      ignore_errors: true
"""
    r = lab.playbook(PLAY_HEAD + tasks)
    for name, (_path, fragment) in cases.items():
        res = r[f"bad {name}"][0]
        assert res.get("failed"), f"{name} was accepted: {res}"
        assert fragment in res["msg"], f"{name}: {res['msg']}"
        lab.no_leftovers(f"bad-{name}")
    assert "larger than the quota of 1000" in r["over quota"][0]["msg"]
    full = r["full disk"][0]
    assert full.get("failed") and "no space left" in full["msg"], full
    assert "not live" in r["unknown node"][0]["msg"]
    for did in ("bad-quota", "bad-full", "bad-node"):
        lab.no_leftovers(did)
    # The node that ran out of space still works.
    assert n3.client().health()["ok"]


def test_digest_mismatch_is_refused(lab, tmp_path):
    src = make_tree(tmp_path / "m", files=1, size=100_000)
    archive = tar_of(src, tmp_path / "m.tar", "w")
    n1 = lab.node("node1")
    client = n1.client()
    with pytest.raises(DataServerError) as err:
        client.put_tar("mism", [archive.read_bytes()], digest="sha256:" + "0" * 64)
    assert err.value.status == 422 and "expected sha256:000" in str(err.value)
    lab.no_leftovers("mism")
    # A tampered source copy: the target refuses it and keeps nothing.
    good = ds.scan_tree(src).digest
    client.put_tar("tampered", [archive.read_bytes()], digest=good, read_only=False)
    victim = n1.data_dir / "datasets" / "tampered" / "f0.bin"
    victim.write_bytes(b"evil" + victim.read_bytes()[4:])
    manifest_file = n1.data_dir / ".manifests" / "tampered.json"
    data = json.loads(manifest_file.read_text())
    data["read_only"] = True  # serve the recorded manifest, not a fresh scan
    manifest_file.write_text(json.dumps(data))
    n2 = lab.node("node2")
    with pytest.raises(DataServerError) as err:
        n2.client().replicate("tampered", {"sources": [n1.url], "digest": good, "read_only": True})
    assert "content hash" in str(err.value)
    assert not (n2.data_dir / "datasets" / "tampered").exists() and n2.staging_empty()
    client.delete("tampered")


def test_resume_after_a_killed_source_and_a_source_that_dies(lab, tmp_path):
    n1, n2, n3 = (lab.node(f"node{i}") for i in (1, 2, 3))
    src = tmp_path / "res"
    src.mkdir()
    for i in range(6):
        (src / f"part{i}").write_bytes(os.urandom(4 * MIB))
    archive = tar_of(src, tmp_path / "res.tar", "w").read_bytes()
    digest = ds.scan_tree(src).digest
    for n in (n1, n2):
        n.client().put_tar("res", [archive], digest=digest)
    n1.stop_server()
    n1.start_server("--max-rate", "1MiB")
    try:
        # node1 is slow: kill it while node3 copies from both; node3 resumes from node2.
        import threading

        result: dict = {}

        def copy():
            try:
                result["ok"] = n3.client().replicate(
                    "res", {"sources": [n1.url, n2.url], "digest": digest, "read_only": True}
                )
            except DataServerError as e:
                result["err"] = e

        t = threading.Thread(target=copy)
        t.start()
        time.sleep(1.5)
        n1.stop_server(kill=True)
        t.join(60)
        assert "ok" in result, result
        assert result["ok"]["resumed"] >= 1 and result["ok"]["digest"] == digest
        assert result["ok"]["bytes"] == 24 * MIB  # resumed, not started over
        assert ds.scan_tree(n3.data_dir / "datasets" / "res").digest == digest
        n3.client().delete("res")

        # The only source dies mid-copy: the copy fails and leaves nothing.
        n1.start_server("--max-rate", "1MiB")
        result.clear()

        def lonely():
            try:
                n3.client().replicate("res", {"sources": [n1.url], "digest": digest, "read_only": True})
            except DataServerError as e:
                result["err"] = e

        t = threading.Thread(target=lonely)
        t.start()
        time.sleep(1.5)
        n1.stop_server(kill=True)
        t.join(60)
        assert "no source could deliver" in str(result["err"]), result
        assert not (n3.data_dir / "datasets" / "res").exists() and n3.staging_empty()
    finally:
        n1.stop_server()
        n1.start_server()
        for n in (n1, n2, n3):
            n.client().delete("res")


def test_read_write_child_from_a_read_only_parent(lab, tmp_path):
    src = make_tree(tmp_path / "base", files=2, size=200_000)
    r = lab.playbook(
        PLAY_HEAD
        + """
    - name: import parent
      cerana.platform.dataset_import: {src: "{{ src }}", id: base}
    - name: declare child
      cerana.platform.dataset: {id: scratch, parent: base, read_only: false}
""",
        src=str(src),
    )
    holder = ok(r, "import parent")["node"]
    ok(r, "declare child")
    r = lab.playbook(
        PLAY_HEAD
        + """
    - name: child
      cerana.platform.dataset_replica: {id: scratch, node: "{{ node }}"}
    - name: child again
      cerana.platform.dataset_replica: {id: scratch, node: "{{ node }}"}
""",
        node=holder,
    )
    child = ok(r, "child")
    assert child["changed"] is True and "local copy of base" in child["transfer"]["how"]
    assert ok(r, "child again")["changed"] is False
    n = next(n for n in lab.nodes if n.node_id == holder)
    f = n.data_dir / "datasets" / "scratch" / "f0.bin"
    f.write_bytes(b"changed")  # writable ...
    assert (n.data_dir / "datasets" / "base" / "f0.bin").read_bytes() != b"changed"  # ... and the parent is not touched
    assert (n.data_dir / "datasets" / "base" / "f0.bin").stat().st_mode & 0o222 == 0


def test_import_from_a_node(lab, tmp_path):
    """src on a node: the module runs inside node2's namespace (delegate_to) and reaches Consul on the bridge."""
    src = make_tree(tmp_path / "onnode", files=1, size=50_000, seed="n")
    r = lab.playbook(
        PLAY_HEAD
        + """
    - name: import on node2
      cerana.platform.dataset_import: {src: "{{ src }}", id: onnode, node: "{{ node }}"}
      delegate_to: node2
""",
        src=str(src),
        node=lab.node("node1").node_id,
    )
    res = ok(r, "import on node2")
    assert res["changed"] and res["node"] == lab.node("node1").node_id
    assert (lab.node("node1").data_dir / "datasets" / "onnode" / "f0.bin").is_file()
