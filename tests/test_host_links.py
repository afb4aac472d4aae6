"""The Linux end of a pod's veth, for real (root, a network namespace): attaching a pod
again after its node's number changed (the node left the mesh and joined again) gives the
pod's end its new MAC. Before, only the host-side end was fixed: VPP's neighbor entry
named the new MAC, the pod kept the old one and dropped every frame VPP sent it."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator

import pytest

from vppmesh.host import link as linux
from vppmesh.host.endpoints import pod_spec

pytestmark = [pytest.mark.root]
NS = f"vhl-{os.getpid()}"


@pytest.fixture
def pod_ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        yield NS
    finally:
        subprocess.run(["ip", "link", "del", "vpm-hl0"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NS], check=False)


def pod_mac(ns: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/address"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip()


def test_attaching_again_under_a_new_node_number_gives_the_pod_end_its_new_mac(
        pod_ns: str) -> None:
    for number in (3, 7):
        spec = pod_spec(name="hl0", netns=pod_ns, address=ipaddress.IPv4Address("198.18.3.10"),
                        node_number=number, pod_index=0)
        linux.ensure_veth(spec.linux_ifname, spec.vpp_ifname, linux_mac=spec.linux_mac,
                          vpp_mac=spec.vpp_mac, mtu=1440, linux_netns=pod_ns)
        linux.configure_linux_side(spec, 1440)
        assert pod_mac(pod_ns) == spec.linux_mac
    assert spec.linux_mac.startswith("02:fe:00:07")
