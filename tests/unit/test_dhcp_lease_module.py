"""cerana.platform.dhcp_lease with an in-memory store: check mode writes nothing, idempotence, errors."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args
from bootserver_fakes import MemoryStore

from ansible_collections.cerana.platform.plugins.module_utils import _ansible
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.modules import dhcp_lease

MAC = "52:54:00:aa:00:01"


class Exit(Exception):
    pass


@pytest.fixture
def store(monkeypatch):
    s = MemoryStore()
    cfg = m.DHCPConfig.from_dict({"net": "10.99.0.0/24", "gateway": "10.99.0.1", "lease_duration": 600})
    s.data[m.DHCP_CONFIG_KEY] = (cfg.to_bytes(), 1)
    monkeypatch.setattr(_ansible, "store_from_module", lambda module: s)
    return s


def call(args, check=False):
    args = dict(args, _ansible_check_mode=check, _ansible_diff=True)
    with patch_module_args(args), pytest.raises(SystemExit), pytest.MonkeyPatch.context() as mp:
        out = {}

        def capture(self, **kw):
            out.update(kw)
            raise SystemExit(0)

        def fail(self, **kw):
            out.update(kw, failed=True)
            raise SystemExit(1)

        mp.setattr("ansible.module_utils.basic.AnsibleModule.exit_json", capture)
        mp.setattr("ansible.module_utils.basic.AnsibleModule.fail_json", fail)
        dhcp_lease.main()
    return json.loads(json.dumps(out, default=str))


def test_check_mode_writes_nothing_then_idempotent(store):
    before = dict(store.data)
    res = call({"mac": MAC, "ip": "10.99.0.50"}, check=True)
    assert res["changed"] and res["lease"]["ip"] == "10.99.0.50" and store.data == before
    res = call({"mac": MAC, "ip": "10.99.0.50"})
    assert res["changed"] and res["lease"]["state"] == "bound" and res["diff"]["before"] == {}
    assert not call({"mac": MAC, "ip": "10.99.0.50"})["changed"]
    assert not call({"mac": MAC}, check=True)["changed"]
    assert not call({"mac": MAC, "state": "offered"})["changed"]  # a binding satisfies an offer
    res = call({"mac": MAC, "state": "absent"}, check=True)
    assert res["changed"] and "dhcp/leases/10.99.0.50" in store.data
    assert call({"mac": MAC, "state": "absent"})["changed"] and "dhcp/leases/10.99.0.50" not in store.data
    assert not call({"mac": MAC, "state": "absent"})["changed"]


@pytest.mark.parametrize(
    ("args", "field", "msg"),
    [
        ({"mac": "nope"}, "mac", "must be a MAC address"),
        ({"mac": MAC, "ip": "10.98.0.1"}, "ip", "10.98.0.1 is outside 10.99.0.0/24"),
        ({"mac": MAC, "ip": "10.99.0.1"}, "ip", "10.99.0.1 is the gateway"),
        ({"mac": MAC, "ip": "junk"}, "ip", "must be an IPv4 address"),
        ({"mac": MAC, "duration": "soon"}, "duration", "must be a duration"),
    ],
)
def test_errors_name_the_field(store, args, field, msg):
    res = call(args)
    assert res["failed"] and res["field"] == field and msg in res["msg"]


def test_no_config_and_held_by_other(store):
    call({"mac": MAC, "ip": "10.99.0.50"})
    res = call({"mac": "52:54:00:aa:00:02", "ip": "10.99.0.50"})
    assert res["failed"] and "10.99.0.50 is leased to %s" % MAC in res["msg"]
    del store.data[m.DHCP_CONFIG_KEY]
    res = call({"mac": MAC})
    assert res["failed"] and res["field"] == "dhcp_config"
