"""Objects over a real agent: leftovers of a deleted object, and listings an ACL hides."""

from __future__ import annotations

import uuid

import pytest

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import ConnectionSettings, PermissionDenied, Store

pytestmark = pytest.mark.integration


def test_absent_removes_leftovers_of_an_object_without_config(consul, kv_prefix):
    store = Store(ConnectionSettings(address=consul.http_addr, prefix=kv_prefix))
    objects = Objects(store)
    store.put("datasets/ghost/status", "written by a daemon after the delete")
    store.put("datasets/ghostly/config", m.Dataset(id="ghostly").to_bytes())
    key, root = m.object_key("dataset", "ghost"), m.object_root("dataset", "ghost")

    predicted = objects.apply(key, None, current=None, subtree=root, check_mode=True)
    assert predicted.changed
    assert store.keys("datasets/ghost/") == ["datasets/ghost/status"]

    done = objects.apply(key, None, current=None, subtree=root)
    assert done.changed
    assert store.keys("datasets/ghost/") == []
    assert objects.get("dataset", "ghostly") is not None  # a sibling with a longer name stays

    again = objects.apply(key, None, current=None, subtree=root)
    assert not again.changed


def test_listing_hidden_by_acl_is_permission_denied_not_empty(consul_acl):
    prefix = "acl-" + uuid.uuid4().hex[:8]
    admin = Store(ConnectionSettings(address=consul_acl.http_addr, token=consul_acl.token, prefix=prefix))
    anonymous = Store(ConnectionSettings(address=consul_acl.http_addr, prefix=prefix))
    admin.put(m.object_key("dataset", "web"), m.Dataset(id="web").to_bytes())
    try:
        assert [s.obj.id for s in Objects(admin).list("dataset")] == ["web"]
        assert Objects(admin).list("service") == []  # really empty: no error
        with pytest.raises(PermissionDenied, match="no ACL token was given"):
            Objects(anonymous).list("dataset")
        with pytest.raises(PermissionDenied):
            anonymous.keys("datasets/")
    finally:
        admin.delete_tree("datasets")
