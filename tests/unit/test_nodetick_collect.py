"""Collectors of cerana-node-tick: pure parsers over /proc text, address ordering, dataset names, instance records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _instances
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from cerana_nodetick import collect

MEMINFO = """\
MemTotal:       16315612 kB
MemFree:          824436 kB
MemAvailable:    9923584 kB
Buffers:          512000 kB
Cached:          8000000 kB
HugePages_Total:       0
"""


def test_parse_meminfo_uses_memavailable():
    assert collect.parse_meminfo(MEMINFO) == collect.MemInfo(16315612 * 1024, 9923584 * 1024)


def test_parse_meminfo_without_memavailable_falls_back_to_free_buffers_cached():
    text = "\n".join(line for line in MEMINFO.splitlines() if not line.startswith("MemAvailable"))
    assert collect.parse_meminfo(text).available == (824436 + 512000 + 8000000) * 1024


def test_parse_meminfo_needs_memtotal():
    with pytest.raises(collect.CollectError, match="MemTotal"):
        collect.parse_meminfo("MemFree: 1 kB\n")


def test_parse_loadavg():
    assert collect.parse_loadavg("0.52 0.58 0.59 1/1125 123456\n") == (0.52, 0.58, 0.59)
    with pytest.raises(collect.CollectError):
        collect.parse_loadavg("garbage")


def test_parse_machine_id():
    assert collect.parse_machine_id("0123456789ABCDEF0123456789abcdef\n") == "0123456789abcdef0123456789abcdef"
    for bad in ("", "uninitialized\n", "0123", "g" * 32):
        with pytest.raises(ValueError, match="32 hexadecimal"):
            collect.parse_machine_id(bad)


def test_order_addresses_global_ipv4_first_then_by_interface():
    found = [
        (1, "127.0.0.1"),
        (1, "::1"),
        (3, "2001:db8::3"),
        (2, "fe80::1"),
        (3, "192.0.2.30"),
        (2, "198.51.100.2"),
        (2, "2001:db8::2"),
        (4, "198.51.100.2"),  # the same address on another interface: once
    ]
    assert collect.order_addresses(found) == ("198.51.100.2", "192.0.2.30", "2001:db8::2", "2001:db8::3")


def test_dataset_dirs_only_dns_labels():
    assert collect.dataset_dirs(["web", "Bad_Name", "db-1", ".tmp"]) == (("db-1", "web"), (".tmp", "Bad_Name"))


def test_read_sample_reports_the_data_dir_file_system(tmp_path):
    sample = collect.read_sample(tmp_path)
    st = os.statvfs(tmp_path)
    assert sample.disk_total == st.f_blocks * st.f_frsize
    assert sample.memory.total > 0 and sample.cpu_count >= 1
    assert all(a not in ("127.0.0.1", "::1") for a in sample.addresses)


def test_read_datasets(tmp_path):
    assert collect.read_datasets(tmp_path) == ((), ())
    for name in ("web", "db", "Nope"):
        (tmp_path / "datasets" / name).mkdir(parents=True)
    (tmp_path / "datasets" / "a-file").write_text("")
    assert collect.read_datasets(tmp_path) == (("db", "web"), ("Nope",))


def test_instance_records_round_trip_and_bad_ones_are_reported(tmp_path):
    run = os.fspath(tmp_path)
    inst = _instances.Instance("shop", "web", os.getpid(), "2026-11-30T03:04:05.000000Z", ("b", "a"))
    path = _instances.write_instance(run, inst)
    assert path == os.path.join(run, "bundles", "shop", "web.json")
    expected = '{"datasets":["b","a"],"pid":%d,"started":"2026-11-30T03:04:05.000000Z"}' % os.getpid()
    assert Path(path).read_text() == expected
    (tmp_path / "bundles" / "shop" / "db.json").write_text('{"pid": "x", "started": "2026-11-30T03:04:05Z"}')
    instances, errors = _instances.read_instances(run)
    assert [i.service for i in instances] == ["web"]
    assert instances[0].datasets == ("a", "b")
    assert len(errors) == 1 and "db.json" in errors[0][0] and "pid" in errors[0][1]
    running, _ = collect.read_instances(tmp_path)
    assert running[0].running is True  # our own pid
    _instances.remove_instance(run, "shop", "web")
    _instances.remove_instance(run, "shop", "web")  # twice is fine
    assert _instances.read_instances(run)[0] == []


def test_pid_running():
    assert _instances.pid_running(os.getpid())
    assert not _instances.pid_running(2**22 + 12345)


def test_instance_validation_names_the_field():
    with pytest.raises(m.ValidationError, match=r"shop/web\.started"):
        _instances.parse_instance("shop", "web", '{"pid": 1, "started": "yesterday"}')


def test_records_signature_changes_when_a_record_is_renamed_into_place(tmp_path):
    import os
    import time

    from cerana_nodetick import collect

    assert collect.records_signature(tmp_path) == ()  # no records directory yet
    bundle = tmp_path / "bundles" / "shop"
    bundle.mkdir(parents=True)
    before = collect.records_signature(tmp_path)
    assert [name for name, _ in before] == ["", "shop"]
    assert collect.records_signature(tmp_path) == before  # nothing changed, same signature
    time.sleep(0.01)
    (bundle / ".tmp-web.json").write_text("{}")
    os.replace(bundle / ".tmp-web.json", bundle / "web.json")  # as ExecStartPost writes it
    after = collect.records_signature(tmp_path)
    assert after != before and dict(after)[""] == dict(before)[""]
    time.sleep(0.01)
    (bundle / "web.json").unlink()  # a stop removes the record
    assert collect.records_signature(tmp_path) != after
