# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""Glue between AnsibleModule and the store: connection options, error reporting,
and the one declarative flow every object module uses."""

from __future__ import annotations

from ansible.module_utils.basic import env_fallback

from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects
from ansible_collections.cerana.platform.plugins.module_utils._store import (
    CasConflict,
    ConnectionSettings,
    Store,
    StoreError,
)

# Keep in step with doc_fragments/_connection.py (validate-modules compares them).
CONNECTION_ARGSPEC = dict(
    consul_url=dict(type="str", fallback=(env_fallback, ["CONSUL_HTTP_ADDR"]), default="http://127.0.0.1:8500"),
    consul_token=dict(type="str", no_log=True, fallback=(env_fallback, ["CONSUL_HTTP_TOKEN"])),
    validate_certs=dict(type="bool", default=True, fallback=(env_fallback, ["CONSUL_HTTP_SSL_VERIFY"])),
    ca_path=dict(type="path", fallback=(env_fallback, ["CONSUL_CACERT"])),
    client_cert=dict(type="path", fallback=(env_fallback, ["CONSUL_CLIENT_CERT"])),
    client_key=dict(type="path", no_log=False, fallback=(env_fallback, ["CONSUL_CLIENT_KEY"])),
    kv_prefix=dict(type="str", default="cerana", no_log=False, fallback=(env_fallback, ["CERANA_KV_PREFIX"])),
    consul_timeout=dict(type="float", default=10.0),
)

# Option specs shared by the service and bundle modules.
LIMITS_SPEC = dict(cpu=dict(type="float"), memory=dict(type="int"), processes=dict(type="int"))
HEALTH_CHECK_SPEC = dict(
    id=dict(type="str", required=True),
    kind=dict(type="str", required=True, choices=["http", "tcp", "command", "file", "uptime"]),
    args=dict(type="dict"),
    interval=dict(type="raw", default=10),
    timeout=dict(type="raw", default=5),
)


def settings_from_params(params):
    return ConnectionSettings(
        address=params["consul_url"],
        token=params["consul_token"] or None,
        validate_certs=params["validate_certs"],
        ca_path=params["ca_path"],
        client_cert=params["client_cert"],
        client_key=params["client_key"],
        prefix=params["kv_prefix"] or "",
        timeout=params["consul_timeout"],
    )


def store_from_module(module):
    try:
        return Store(settings_from_params(module.params))
    except StoreError as e:
        module.fail_json(msg=str(e))


def prune(value):
    """Drop None values from mappings, recursively: an option left out means 'the default'."""
    if isinstance(value, dict):
        return {k: prune(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def run(module, fn):
    """Call ``fn(store)`` and exit with its result; every expected failure becomes a clean fail_json."""
    try:
        store = store_from_module(module)
        result = fn(store)
    except m.ValidationError as e:
        module.fail_json(msg=str(e), field=e.path)
    except CasConflict as e:
        module.fail_json(msg=str(e), expected_index=e.expected, current_index=e.current)
    except StoreError as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


def object_result(kind, outcome, module):
    """The result dict of an object module: the object, its index and the diff."""
    after = outcome.after.to_dict() if outcome.after is not None else None
    result = {"changed": outcome.changed, kind: after, "mod_index": outcome.mod_index}
    if module._diff:
        result["diff"] = {
            "before": outcome.before.to_dict() if outcome.before is not None else {},
            "after": after or {},
            "before_header": "%s (stored)" % kind,
            "after_header": "%s (declared)" % kind,
        }
    return result


def declare_object(module, kind, fields):
    """The shared flow of the dataset/service/bundle modules.

    ``fields`` are the object's option names; the object is declared in full
    (an option left out takes its default). ``state: absent`` deletes the
    object's whole subtree.
    """
    p = module.params
    model = m.MODELS[kind]

    def work(store):
        objects = Objects(store)
        if p["state"] == "present":
            data = prune({f: p[f] for f in fields})
            if data.get("id") is None:
                data["id"] = m.new_id()
            desired = model.from_dict(data, kind)  # before any I/O: a bad object writes nothing
            object_id = desired.id
        else:
            desired = None
            object_id = m._label(p["id"], kind + ".id")
        current = objects.get(kind, object_id)
        outcome = objects.apply(
            m.object_key(kind, object_id),
            desired,
            current=current,
            mod_index=p.get("mod_index"),
            check_mode=module.check_mode,
            subtree=m.object_root(kind, object_id),
            reread=lambda: objects.get(kind, object_id),
        )
        return object_result(kind, outcome, module)

    run(module, work)


def declare_config(module, model, key, fields):
    """The shared flow of the cluster_config/dhcp_config modules (one key, no subtree)."""
    p = module.params

    def work(store):
        objects = Objects(store)
        desired = model.from_dict(prune({f: p[f] for f in fields}), model.KIND) if p["state"] == "present" else None
        outcome = objects.apply(
            key,
            desired,
            current=objects.get_config(model, key),
            mod_index=p.get("mod_index"),
            check_mode=module.check_mode,
            reread=lambda: objects.get_config(model, key),
        )
        return object_result(model.KIND, outcome, module)

    run(module, work)
