#!/usr/bin/python
# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: dhcp_lease
short_description: Offer, bind or release an address of the boot network
version_added: 0.1.0
description:
  - Manages one client's lease in the lease table every bootserver shares
    (C(<kv_prefix>/dhcp/leases/<ip>) and the MAC index C(<kv_prefix>/dhcp/macs/<mac>)),
    inside the network of M(cerana.platform.dhcp_config).
  - The playbook counterpart of the original platform's C(dhcp-offer-lease) and C(dhcp-ack-lease) tasks,
    declared as the state the MAC's lease should be in rather than as actions.
  - Every write is a compare-and-swap transaction, so this module and the bootservers never
    hand out one address twice.
extends_documentation_fragment:
  - cerana.platform._connection
  - cerana.platform._connection.actiongroup
attributes:
  check_mode:
    description: Reads only and predicts the result; with O(state=offered) and no existing lease the address is not known yet.
    support: full
  diff_mode:
    description: Returns the lease before and after.
    support: full
  idempotent:
    description: >-
      Yes for V(offered) and V(absent). For V(bound) a lease with at least O(min_remaining) seconds left is
      left alone (C(changed=false)); below that it is extended, which is a change.
    support: partial
options:
  mac:
    description: The client's MAC address (any of the forms V(52:54:00:12:34:56), V(52-54-00-12-34-56), V(525400123456)).
    type: str
    required: true
  ip:
    description:
      - The address. With O(state=offered) a wish, honoured when it is free (the original ignored it).
      - With O(state=bound), the address to bind; when left out, the MAC's current offer or lease,
        else a newly allocated address. A free address is bound even without an offer (this is how a
        bootstrap node reserves its own address).
      - With O(state=absent), only a lease at this address is released; when left out, whatever the MAC holds.
    type: str
  state:
    description:
      - V(offered) holds an address for the MAC for the bootservers' offer time (60 s), as a DHCPOFFER does;
        an existing offer or lease of the MAC already satisfies it.
      - V(bound) binds the address for O(duration) seconds, as a DHCPACK does.
      - V(absent) releases the MAC's lease, as a DHCPRELEASE does.
    type: str
    choices: [offered, bound, absent]
    default: bound
  duration:
    description: Lease time in seconds or as a duration (V(1h)) with O(state=bound). Default the network's C(lease_duration).
    type: raw
  min_remaining:
    description:
      - With O(state=bound), a bound lease with at least this many seconds left is not extended.
      - Default half the lease time, like a DHCP client's renewal time T1. V(0) never extends an existing binding.
      - A different O(hostname) than the stored one always rewrites the lease.
    type: raw
  hostname:
    description: Host name stored with the lease (informational).
    type: str
  server:
    description: Name stored as the lease's granting server.
    type: str
    default: ansible
author:
  - Cerana Platform developers (@cerana)
"""

EXAMPLES = r"""
- name: Reserve the bootstrap node's own address for a day
  cerana.platform.dhcp_lease:
    mac: "{{ ansible_facts['default_ipv4']['macaddress'] }}"
    ip: "{{ ansible_facts['default_ipv4']['address'] }}"
    state: bound
    duration: 1d

- name: Hold an address for a machine about to netboot
  cerana.platform.dhcp_lease:
    mac: 52:54:00:12:34:56
    state: offered
  register: offer

- name: Release it again
  cerana.platform.dhcp_lease:
    mac: 52:54:00:12:34:56
    state: absent
"""

RETURN = r"""
lease:
  description: The lease after the task (predicted in check mode); null when absent or not predictable.
  returned: success
  type: dict
  contains:
    ip:
      description: The address.
      type: str
      sample: 10.77.0.42
    mac:
      description: The client's MAC address, normalised.
      type: str
      sample: "52:54:00:12:34:56"
    state:
      description: V(offered) or V(bound).
      type: str
      sample: bound
    expires:
      description: Expiry time, in seconds since the epoch.
      type: int
      sample: 1795000000
    expires_at:
      description: Expiry time in RFC 3339 form.
      type: str
      sample: "2026-11-19T12:26:40Z"
    server:
      description: Who granted or last renewed the lease.
      type: str
      sample: ansible
    hostname:
      description: Host name stored with the lease.
      type: str
      sample: node1
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.cerana.platform.plugins.module_utils import _leases as L
from ansible_collections.cerana.platform.plugins.module_utils import _models as m
from ansible_collections.cerana.platform.plugins.module_utils._ansible import CONNECTION_ARGSPEC, run
from ansible_collections.cerana.platform.plugins.module_utils._objects import Objects

ARGUMENT_SPEC = dict(
    mac=dict(type="str", required=True),
    ip=dict(type="str"),
    state=dict(type="str", default="bound", choices=["offered", "bound", "absent"]),
    duration=dict(type="raw"),
    min_remaining=dict(type="raw"),
    hostname=dict(type="str"),
    server=dict(type="str", default="ansible"),
    **CONNECTION_ARGSPEC,
)


def _seconds(value, name, lo):
    if value is None:
        return None
    return m._int(m.parse_duration(value, name), name, lo)


def manage(module, store):
    """The module's work; raises ValidationError/StoreError, which run() reports."""
    p = module.params
    mac = m.normalize_mac(p["mac"], "mac")
    ip = str(m._ipv4(p["ip"], "ip")) if p["ip"] else None
    duration = _seconds(p["duration"], "duration", 1)
    min_remaining = _seconds(p["min_remaining"], "min_remaining", 0)
    stored = Objects(store).get_config(m.DHCPConfig, m.DHCP_CONFIG_KEY)
    if stored is None:
        raise m.ValidationError(
            "dhcp_config", "the boot network is not configured (run cerana.platform.dhcp_config first)"
        )
    cfg = stored.obj
    pool = L.Pool.from_config(cfg)
    if ip is not None and p["state"] != "absent":
        reason = pool.why_not(ip, mac)
        if reason:
            raise m.ValidationError("ip", reason)
    duration = duration or cfg.lease_duration
    if min_remaining is None:
        min_remaining = duration // 2
    ls = L.LeaseStore(store, server=p["server"])
    now = ls.clock()
    current = ls.lease_of(mac)
    live = current if current is not None and not current.expired(now) else None
    changed, after = False, current

    if p["state"] == "absent":
        target = current if ip is None or (current is not None and current.ip == ip) else ls.get(ip)
        if target is not None and target.owned_by(mac):
            changed, after = True, None
            if not module.check_mode:
                ls.release(mac, target.ip)
    elif p["state"] == "offered":
        if live is not None and (ip is None or live.ip == ip):
            after = live
        else:
            changed = True
            if not module.check_mode:
                after = ls.offer(pool, mac, requested=ip, hostname=p["hostname"])
                # a live lease elsewhere is kept (RFC 2131 4.3.1 prefers the current binding): no write
                changed = live is None or after.index != live.index
            else:
                after = None
    else:  # bound
        target = ip or (current.ip if current is not None else None)
        if target is not None:
            existing = ls.get(target)
            if existing is not None and not existing.owned_by(mac) and not existing.expired(now, ls.skew):
                raise L.HeldByOther(target, existing.mac, existing.expires)
            fresh = (
                existing is not None and existing.owned_by(mac) and existing.state == L.BOUND
                and existing.remaining(now) >= min_remaining
                and (p["hostname"] is None or p["hostname"] == existing.hostname)
            )  # fmt: skip
            if fresh:
                after = existing
            elif module.check_mode:
                changed = True
                after = L.Lease(ip=target, mac=mac, state=L.BOUND, expires=L.expiry(now, duration), server=p["server"],
                                hostname=p["hostname"] or (existing.hostname if existing else None))  # fmt: skip
            else:
                after, changed = ls.ack(pool, mac, target, duration=duration, hostname=p["hostname"],
                                        allow_unallocated=True, min_remaining=min_remaining)  # fmt: skip
        else:
            changed = True
            if not module.check_mode:
                offer = ls.offer(pool, mac, hostname=p["hostname"])
                after, _changed = ls.ack(pool, mac, offer.ip, duration=duration, hostname=p["hostname"])
            else:
                after = None
    before_d = current.to_dict() if current is not None else None
    after_d = after.to_dict() if after is not None else None
    result = {"changed": changed, "lease": after_d}
    if module._diff:
        result["diff"] = {"before": before_d or {}, "after": after_d or {}, "before_header": "lease of %s (stored)" % mac,
                          "after_header": "lease of %s (declared)" % mac}  # fmt: skip
    return result


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module, lambda store: manage(module, store))


if __name__ == "__main__":
    main()
