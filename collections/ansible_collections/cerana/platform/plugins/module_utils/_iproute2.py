# Copyright: Contributors to the cerana project
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# PRIVATE to the cerana.platform collection: no compatibility promise outside it.
"""The node's network, read and changed through iproute2's ``ip`` and ``bridge`` commands.

Reads use their JSON output (``ip -json -details addr show``: every link with its kind, master,
flags and addresses in one call); each change is one command. A module call on a node runs a
handful of them (a few milliseconds each), where importing a netlink library costs a quarter
of a second of every call. A failed command raises :class:`IpError` with what the command said
on stderr (``RTNETLINK answers: File exists``), which callers put in their own words.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

# Where iproute2 lives when the PATH a module gets over ssh leaves out the sbin directories.
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
ZERO_MAC = "00:00:00:00:00:00"  # the MAC of a flood entry (all-zeros FDB entry) of a vxlan device


class IpError(Exception):
    """An ``ip`` or ``bridge`` command failed (or is missing); the text is its error message."""


def find_command(name):
    """The path of ``name`` on PATH or in the usual sbin directories; raises IpError when absent."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *_SBIN]))
    if path is None:
        raise IpError("the %r command (iproute2) is not installed on this node" % name)
    return path


def _exec(cmd, *, read=False):
    """Run ``cmd``; its JSON output when ``read``. Raises IpError with its error message."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise IpError("%s: %s" % (cmd[0], e.strerror or e)) from None
    if proc.returncode != 0:
        raise IpError((proc.stderr or proc.stdout).strip() or "%s exited with %d" % (" ".join(cmd), proc.returncode))
    if not read:
        return None
    try:
        return json.loads(proc.stdout or "[]")
    except ValueError:
        raise IpError("%s printed something that is not JSON" % " ".join(cmd)) from None


class IpRoute2:
    """iproute2 in the node's network namespace, or in the named one (``ip -netns``).

    :meth:`links` is read once and kept until this object changes something.
    """

    def __init__(self, netns=None):
        self.netns = netns
        self._ip = find_command("ip")
        self._links = None

    def _run(self, argv, *, read=False):
        result = _exec([self._ip, *(["-netns", self.netns] if self.netns else []), *argv], read=read)
        if not read:
            self._links = None  # changed: read again
        return result

    # -- reads ------------------------------------------------------------------------------------

    def links(self):
        """{name: the link's JSON object} of every link (with ``addr_info`` and ``linkinfo``)."""
        if self._links is None:
            self._links = {d["ifname"]: d for d in self._run(["-json", "-details", "addr", "show"], read=True)}
        return self._links

    def default_routes(self):
        """The default routes of the main table (JSON objects with ``gateway`` and ``dev``)."""
        return self._run(["-json", "route", "show", "table", "main", "default"], read=True)

    def fdb(self, dev):
        """The forwarding database entries of ``dev`` (``bridge fdb show``; node namespace only)."""
        return _exec([find_command("bridge"), "-json", "fdb", "show", "dev", dev], read=True)

    # -- changes ----------------------------------------------------------------------------------

    def add_link(self, name, kind, *, mtu, mac=None, **options):
        """``ip link add``; ``options``: for a vxlan ``vni`` and ``port``, for a veth ``peer`` (its
        name), ``peer_mac`` and ``peer_netns`` (the namespace the peer goes to)."""
        argv = ["link", "add", name, "mtu", str(mtu)]
        if mac:
            argv += ["address", mac]
        argv += ["type", kind]
        if kind == "vxlan":
            argv += ["id", str(options["vni"]), "dstport", str(options["port"]), "learning"]
        elif kind == "veth":
            argv += ["peer", "name", options["peer"], "address", options["peer_mac"], "mtu", str(mtu)]
            argv += ["netns", options["peer_netns"]]
        self._run(argv)

    def delete_link(self, name):
        """``ip link delete``; done when the link is gone, whoever removed it (a veth also goes
        when the namespace of its peer is deleted)."""
        try:
            self._run(["link", "delete", "dev", name])
        except IpError:
            self._links = None
            if name in self.links():
                raise

    def set_link(self, name, *, mtu=None, address=None, master=None, state=None):
        argv = ["link", "set", "dev", name]
        for key, value in (("mtu", mtu), ("address", address), ("master", master)):
            if value is not None:
                argv += [key, str(value)]
        if state is not None:
            argv.append(state)
        self._run(argv)

    def address(self, command, name, cidr):
        """``ip addr add|del <cidr> dev <name>``."""
        self._run(["addr", command, cidr, "dev", name])

    def default_route(self, gateway, dev):
        self._run(["route", "replace", "default", "via", gateway, "dev", dev])

    def flood(self, command, dev, dst):
        """An all-zeros FDB entry of ``dev`` towards ``dst`` (``append``) or its removal (``del``)."""
        _exec([find_command("bridge"), "fdb", command, ZERO_MAC, "dev", dev, "dst", dst])
        self._links = None

    def close(self):
        self._links = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create_netns(name):
    """``ip netns add``: the namespace, bind-mounted at /run/netns/<name>."""
    IpRoute2()._run(["netns", "add", name])


def delete_netns(name):
    """``ip netns delete``: unmounts and removes /run/netns/<name> (the namespace goes with its last user)."""
    IpRoute2()._run(["netns", "delete", name])
