"""Per-node iPXE scripts: known and unknown MACs, boot targets, kernel arguments (spec 9, 10.1)."""

from __future__ import annotations

import pytest

from cerana_bootserver import ipxe

MAC = "52:54:00:12:34:56"
SHA = "ab" * 32
POLICY = ipxe.ScriptPolicy(http_base="http://10.98.0.2:8080", server_address="10.98.0.2")
IMAGES = {"current": ipxe.ImageRef("current", SHA), "v2": ipxe.ImageRef("v2", "cd" * 32)}


def node(id_="n1", addresses=(), **labels):
    return ipxe.NodeInfo(id_, id_, tuple(addresses), labels)


def test_unknown_mac_boots_the_default_image_with_the_join_parameters():
    view = ipxe.ClusterView(cluster_ips=("10.98.0.2", "10.98.0.3"))
    p = ipxe.plan(MAC.upper(), view, IMAGES, POLICY)
    assert (p.action, p.image, p.node) == ("boot", "current", None)
    assert "unknown MAC" in p.reason
    assert p.kernel_url == "http://10.98.0.2:8080/images/current/kernel"
    assert p.initrd_url == "http://10.98.0.2:8080/images/current/initrd"
    assert p.args == (
        "initrd=initrd",
        "console=ttyS0",
        "cerana.boot_server=http://10.98.0.2:8080/images/current",
        "cerana.cluster_ips=10.98.0.2,10.98.0.3",
        "cerana.mgmt_mac=52:54:00:12:34:56",
        "cerana.zfs_config=auto",
        "cerana.initrd_hash=sha256-" + SHA,
    )
    assert ipxe.render(p) == (
        "#!ipxe\n"
        "# cerana bootserver: 52:54:00:12:34:56 unknown MAC: default image\n"
        "kernel http://10.98.0.2:8080/images/current/kernel " + " ".join(p.args) + "\n"
        "initrd --name initrd http://10.98.0.2:8080/images/current/initrd\n"
        "boot\n"
    )


def test_without_known_consul_servers_the_boot_server_is_the_cluster_ip():
    p = ipxe.plan(MAC, ipxe.ClusterView(), IMAGES, POLICY)
    assert "cerana.cluster_ips=10.98.0.2" in p.args


@pytest.mark.parametrize(
    ("view", "who"),
    [
        (ipxe.ClusterView(reservations={MAC: "10.98.0.50"}, nodes=(node(addresses=("10.98.0.50",)),)), "node n1"),
        (ipxe.ClusterView(leased={MAC: "10.98.0.51"}, nodes=(node(addresses=("10.98.0.51",)),)), "node n1"),
        (ipxe.ClusterView(nodes=(node(**{"cerana.mgmt_mac": MAC.upper()}),)), "node n1"),
        (ipxe.ClusterView(reservations={MAC: "10.98.0.50"}), "reserved 10.98.0.50"),
    ],
)
def test_known_macs(view, who):
    p = ipxe.plan(MAC, view, IMAGES, POLICY)
    assert p.action == "boot"
    assert p.reason.startswith(who)
    assert p.reason.endswith("(known)")


def test_a_node_of_another_mac_does_not_match():
    view = ipxe.ClusterView(reservations={"52:54:00:00:00:01": "10.98.0.50"}, nodes=(node(addresses=("10.98.0.50",)),))
    assert ipxe.find_node(MAC, view) is None


def test_boot_targets():
    def view(target):
        return ipxe.ClusterView(nodes=(node(**{"cerana.mgmt_mac": MAC, "cerana.boot_image": target}),))

    p = ipxe.plan(MAC, view("v2"), IMAGES, POLICY)
    assert p.image == "v2"
    assert "cerana.initrd_hash=sha256-" + "cd" * 32 in p.args
    missing = ipxe.plan(MAC, view("v9"), IMAGES, POLICY)
    assert missing.image == "current"
    assert "v9 is missing" in missing.reason
    local = ipxe.plan(MAC, view("local"), IMAGES, POLICY)
    assert local.action == "local"
    assert ipxe.render(local).splitlines()[-1] == "exit"


def test_no_image_at_all_makes_the_client_wait_and_retry():
    p = ipxe.plan(MAC, ipxe.ClusterView(), {}, POLICY)
    assert p.action == "wait"
    text = ipxe.render(p, retry_seconds=7)
    assert "sleep 7\nreboot\n" in text
    assert "kernel" not in text


def test_policy_arguments_are_checked():
    p = ipxe.ScriptPolicy(http_base="http://h", server_address="10.0.0.1", console="", zfs_config="",
                          extra_args=("quiet", "cerana.rescue"))  # fmt: skip
    got = ipxe.plan(MAC, ipxe.ClusterView(), {"current": ipxe.ImageRef("current", "nohash")}, p)
    assert got.args == ("initrd=initrd", "cerana.boot_server=http://h/images/current",
                        "cerana.cluster_ips=10.0.0.1", "cerana.mgmt_mac=" + MAC, "quiet", "cerana.rescue")  # fmt: skip
    for bad in ("a b", "x=${net0/mac}", 'q"', "back\\slash", "", "tab\t"):
        with pytest.raises(ipxe.BadArgument):
            ipxe.ScriptPolicy(http_base="http://h", server_address="10.0.0.1", extra_args=(bad,))


def test_comment_text_cannot_break_the_script():
    p = ipxe.BootPlan(MAC, "local", "node x\nkernel http://evil/")
    assert ipxe.render(p).count("\n") == 4


def test_chain_script():
    assert ipxe.chain_script() == "#!ipxe\nchain /boot/${netX/mac:hexhyp}.ipxe\n"
