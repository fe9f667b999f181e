"""Benchmark: replicate a 1 GiB dataset between two netns lab nodes; compare with rsync and a raw stream.

Run on demand as root (not a test):  .venv/bin/python benchmarks/dataset_replication.py [--size-mib 1024]

Two network namespaces joined by a veth pair (no Consul needed: the data servers are
driven directly). Node A holds the dataset (8 files of size/8); node B receives it:

* cerana: ``cerana-dataserver`` on both, B pulls from A (``POST /replicate``), digest checked;
* rsync:  ``rsync --daemon`` in A, ``rsync -a rsync://A/...`` run in B (whole files, new target);
* raw:    ``cat`` of the files into a TCP socket in A, ``socat`` in B writing one file per stream.

Every run writes into an empty directory on the same file system, after ``sync`` and
dropping the page cache of the target, so that the three move the same bytes the same
way. Prints throughput (MB/s, 10^6 bytes) and the ratios; ``--record`` appends them to
docs/benchmarks.md. ``--repeat N`` runs the three N times, interleaved (raw, rsync, cerana,
raw, ...), and reports the medians: on a shared machine the load moves between runs, and
interleaving spreads that over the three instead of giving it to one of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NS_A, NS_B = "cbench-a", "cbench-b"
IP_A, IP_B = "10.251.77.1", "10.251.77.2"
PORT = 7811


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


def setup_net() -> None:
    teardown_net()
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "link", "add", "cbench-va", "netns", NS_A, "type", "veth", "peer", "name", "cbench-vb", "netns", NS_B)
    for ns, dev, ip in ((NS_A, "cbench-va", IP_A), (NS_B, "cbench-vb", IP_B)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def teardown_net() -> None:
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "del", ns, check=False)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def start_server(ns: str, ip: str, data_dir: Path, log: Path, fsync: bool) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "cerana_dataserver", "--data-dir", str(data_dir),
         "--address", ip, "--port", str(PORT), "--fsync", "true" if fsync else "false", "--log-level", "WARNING"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    time.sleep(0.2)
    for _ in range(100):
        r = sh("ip", "netns", "exec", ns, "curl", "-sf", f"http://{ip}:{PORT}/v1/health", check=False)
        if r.returncode == 0:
            return proc
        time.sleep(0.1)
    raise RuntimeError("data server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ns_python(ns: str, code: str) -> str:
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", code).stdout


def bench_cerana(work: Path, src: Path, total: int, fsync: bool) -> float:
    a, b = work / "cerana-a", work / "cerana-b"
    a.mkdir()
    b.mkdir()
    log = work / "dataserver.log"
    pa = start_server(NS_A, IP_A, a, log, fsync)
    pb = start_server(NS_B, IP_B, b, log, fsync)
    try:
        # Import into A (not timed), from a tar stream of the source directory.
        tarball = work / "src.tar"
        sh("tar", "-C", str(src), "-cf", str(tarball), ".")
        code = (
            "from ansible_collections.cerana.platform.plugins.module_utils._dataclient import DataClient;"
            "from ansible_collections.cerana.platform.plugins.module_utils import _datasets as ds;"
            f"f=open({str(tarball)!r},'rb');import os;"
            f"print(DataClient('http://{IP_A}:{PORT}').put_tar('bench', ds.stream_chunks(f), "
            f"length=os.path.getsize({str(tarball)!r}))['digest'])"
        )
        digest = ns_python(NS_A, code).strip()
        tarball.unlink()
        drop_caches()
        code = (
            "import json,time;"
            "from ansible_collections.cerana.platform.plugins.module_utils._dataclient import DataClient;"
            "t=time.monotonic();"
            f"r=DataClient('http://{IP_B}:{PORT}').replicate('bench', {{'sources': ['http://{IP_A}:{PORT}'], "
            f"'digest': {digest!r}, 'read_only': True}});"
            "print(json.dumps(dict(r, wall=time.monotonic()-t)))"
        )
        result = json.loads(ns_python(NS_B, code))
        assert result["digest"] == digest and result["size"] == total
        return total / result["wall"]
    finally:
        stop(pa)
        stop(pb)


def bench_rsync(work: Path, src: Path, total: int) -> float:
    conf = work / "rsyncd.conf"
    conf.write_text(
        f"pid file = {work}/rsyncd.pid\nuse chroot = no\n[data]\npath = {src}\n"
        "read only = yes\nuid = root\ngid = root\n"
    )
    dst = work / "rsync-b"
    daemon = subprocess.Popen(["ip", "netns", "exec", NS_A, "rsync", "--daemon", "--no-detach", f"--config={conf}",
                               f"--address={IP_A}", "--port=8730"])  # fmt: skip
    try:
        time.sleep(0.5)
        drop_caches()
        t = time.monotonic()
        sh("ip", "netns", "exec", NS_B, "rsync", "-a", "--whole-file", f"rsync://{IP_A}:8730/data/", str(dst) + "/")
        secs = time.monotonic() - t
        return total / secs
    finally:
        stop(daemon)


def bench_raw(work: Path, src: Path, total: int) -> float:
    dst = work / "raw-b"
    dst.mkdir()
    files = sorted(p for p in src.iterdir() if p.is_file())
    drop_caches()
    t = time.monotonic()
    procs = []
    for i, f in enumerate(files):
        port = 9100 + i
        listen = f"TCP-LISTEN:{port},bind={IP_B},reuseaddr"
        recv = subprocess.Popen(["ip", "netns", "exec", NS_B, "socat", "-b", "1048576", "-u", listen,
                                 f"CREATE:{dst / f.name}"])  # fmt: skip
        procs.append(recv)
    time.sleep(0.3)
    t = time.monotonic()
    senders = [
        subprocess.Popen(
            ["ip", "netns", "exec", NS_A, "sh", "-c", f"cat {f} | socat -b 1048576 -u - TCP:{IP_B}:{9100 + i}"]
        )
        for i, f in enumerate(files)
    ]
    for p in senders + procs:
        p.wait()
    secs = time.monotonic() - t
    got = sum(p.stat().st_size for p in dst.iterdir())
    assert got == total, (got, total)
    return total / secs


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": sh("nproc").stdout.strip(),
        "free": sh("free", "-h").stdout.splitlines()[1].split()[1],
        "cpu": cpu,
        "load": Path("/proc/loadavg").read_text().split()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--fsync", action="store_true", help="let the data server fdatasync before the rename")
    parser.add_argument("--record", action="store_true", help="append the figures to docs/benchmarks.md")
    parser.add_argument("--repeat", type=int, default=1, help="run the three N times, interleaved; report medians")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("rsync", "socat", "curl"):
        if not shutil.which(tool):
            print(f"needs {tool}: apt-get install {tool}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="cerana-bench-", dir=args.workdir))
    try:
        setup_net()
        src = work / "src"
        src.mkdir()
        per = args.size_mib * (1 << 20) // args.files
        for i in range(args.files):
            with open(src / f"part{i}", "wb") as f:
                for _ in range(per // (1 << 20)):
                    f.write(os.urandom(1 << 20))
        total = per * args.files
        runs: dict[str, list[float]] = {"raw": [], "rsync": [], "cerana": []}
        for i in range(args.repeat):
            run = work / f"run{i}"
            run.mkdir()
            runs["raw"].append(bench_raw(run, src, total))
            runs["rsync"].append(bench_rsync(run, src, total))
            runs["cerana"].append(bench_cerana(run, src, total, args.fsync))
            shutil.rmtree(run)
        figures = {name: statistics.median(values) for name, values in runs.items()}
    finally:
        teardown_net()
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    lines = [
        f"| {info['date']} | {info['nproc']} | {info['free']} | {info['cpu']} | {info['load']} | {args.size_mib} MiB "
        f"in {args.files} files{' (fsync)' if args.fsync else ''}"
        f"{', median of %d' % args.repeat if args.repeat > 1 else ''} | {figures['cerana'] / 1e6:.0f} | "
        f"{figures['rsync'] / 1e6:.0f} | {figures['raw'] / 1e6:.0f} | "
        f"{figures['cerana'] / figures['rsync']:.2f} | {figures['cerana'] / figures['raw']:.2f} |"
    ]
    for name, value in figures.items():
        print(f"{name:7s} {value / 1e6:8.1f} MB/s  ({', '.join(f'{v / 1e6:.0f}' for v in runs[name])})")
    print(
        f"cerana/rsync {figures['cerana'] / figures['rsync']:.2f}  cerana/raw {figures['cerana'] / figures['raw']:.2f}"
    )
    print(json.dumps(info))
    if args.record:
        doc = REPO / "docs" / "benchmarks.md"
        if not doc.exists():
            doc.write_text("# Benchmarks\n\nFigures measured on the project's machines; newest last in each section.\n")
        text = doc.read_text()
        if "## Dataset replication" not in text:
            text += (
                "\n## Dataset replication\n\n`benchmarks/dataset_replication.py`: a dataset replicated between two "
                "network namespaces (veth pair) by the data servers, against `rsync --whole-file` from an rsync daemon "
                "and raw `cat | socat` streams (one per file, in parallel), each into an empty directory on the same "
                "file system after dropping the page cache. MB/s = 10^6 bytes/s.\n\n"
                "| date | nproc | memory | CPU | load | data | cerana MB/s | rsync MB/s | raw MB/s | "
                "cerana/rsync | cerana/raw |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
            )
        rows = text.splitlines()
        start = next(i for i, line in enumerate(rows) if line.startswith("## Dataset replication"))
        end = start + 1
        while end < len(rows) and not rows[end].startswith("|"):
            end += 1
        while end < len(rows) and rows[end].startswith("|"):
            end += 1
        doc.write_text("\n".join(rows[:end] + lines + rows[end:]).rstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
