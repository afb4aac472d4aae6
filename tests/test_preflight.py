"""Checks before vppmesh gives VPP an underlay address or the host's NIC: an address the
host holds too is refused naming both, and so is an underlay MTU above the uplink's."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest

from vppmesh.agent import node
from vppmesh.config import dump_mesh
from vppmesh.errors import ConfigError
from vppmesh.host import preflight, uplink
from vppmesh.host.uplink import SavedAddress, SavedUplink, UplinkSpec
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.keys import private_key_b64, write_secret_file
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh


def test_host_addresses_are_read_from_this_namespace() -> None:
    found = preflight.host_addresses()
    assert found[ipaddress.ip_address("127.0.0.1")] == "lo"


class Node:
    """`up` of node1 on the fake VPP, its uplink holding the primary underlay address."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.mesh, secrets = make_mesh(2, tunnels=2, **settings)
        self.mesh_file = tmp_path / "mesh.yaml"
        self.mesh_file.write_text(dump_mesh(self.mesh))
        key = tmp_path / "node1.key"
        write_secret_file(key, private_key_b64(secrets["node1"].private_key))
        self.options = node.NodeOptions(mesh_file=self.mesh_file, node="node1",
                                        private_key=key, host_link="none", workers=0,
                                        state_dir=tmp_path / "state")
        self.primary = self.mesh.node("node1").primary
        self.vpp = FakeVpp.with_uplink(self.primary)

    def up(self) -> node.UpResult:
        return node.up(self.options, api=self.vpp,
                       agreement=NoAgreement(self.options.clock))  # type: ignore[arg-type]


def test_up_refuses_an_underlay_address_the_host_holds(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator wrote the node's own address (its InternalIP) as a VPP underlay
    address: VPP and Linux would both answer for it on the wire."""
    node = Node(tmp_path)
    second = node.mesh.node("node1").underlay[1]
    monkeypatch.setattr(preflight, "host_addresses",
                        lambda: {ipaddress.ip_address("127.0.0.1"): "lo", second.ip: "eth0"})
    with pytest.raises(ConfigError) as refused:
        node.up()
    message = str(refused.value)
    assert f"underlay address {second.ip} is also the host's own, on Linux interface eth0" \
        in message
    assert "Give VPP addresses of its own" in message and "node node1" in message
    assert node.vpp.counts.get("ipip_add_tunnel", 0) == 0
    assert sum(n for name, n in node.vpp.counts.items() if not name.endswith("dump")) == 0
    # The host keeping its own, other addresses is the layout vppmesh wants.
    monkeypatch.setattr(preflight, "host_addresses",
                        lambda: {ipaddress.ip_address("192.0.2.200"): "eth0"})
    assert node.up().changes


def saved_nic(driver: str = "af_packet", mtu: int = 1500, **spec: Any) -> SavedUplink:
    return SavedUplink(
        spec=UplinkSpec(interface="eth0", driver=driver, **spec),  # type: ignore[arg-type]
        ifname="eth0", mac="3c:fd:fe:12:34:56", mtu=mtu, up=True, promisc=False,
        addresses=[SavedAddress(family=socket.AF_INET, address="192.0.2.10", prefixlen=24)],
        routes=[], nic_name=uplink.nic_name("eth0"), host_link="veth")


def no_touching(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the NIC or VPP was touched before the check")


def test_uplink_take_refuses_vpp_addresses_the_host_keeps(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`uplink take --address` and `up --take-uplink` (the node's primary) refuse the
    NIC's own address (which the host link keeps) before the NIC or VPP is touched."""
    monkeypatch.setattr(preflight, "host_addresses", dict)
    monkeypatch.setattr(uplink, "capture", lambda ifname, spec, kind: saved_nic(
        spec.driver).model_copy(update={"spec": spec}))
    monkeypatch.setattr(uplink, "_take", no_touching)
    mine = ipaddress.IPv4Interface("192.0.2.10/24")
    spec = UplinkSpec(interface="eth0", vpp_addresses=(mine,))
    with pytest.raises(ConfigError, match=r"uplink eth0: underlay address 192\.0\.2\.10 is "
                                          r"also the host's own, on Linux interface eth0"):
        uplink.take(None, spec, tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing saved, nothing taken
    vpp = FakeVpp()
    with pytest.raises(ConfigError, match=r"192\.0\.2\.10"):
        uplink.ensure(vpp, UplinkSpec(interface="eth0"), tmp_path, mine)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
    # avf/dpdk: saved while VPP was stopped, the NIC gone from Linux: the saved
    # addresses are the host's all the same.
    avf = saved_nic("avf", vpp_interface="uplink0").model_copy(update={"taken": False})
    uplink.state_file(tmp_path, "eth0").write_text(avf.model_dump_json())
    with pytest.raises(ConfigError, match=r"192\.0\.2\.10"):
        uplink.take(None, avf.spec.model_copy(update={"vpp_addresses": (mine,)}), tmp_path)  # type: ignore[arg-type]
    # An address on another Linux link of the host counts too.
    monkeypatch.setattr(preflight, "host_addresses",
                        lambda: {ipaddress.ip_address("192.0.2.20"): "bond1"})
    with pytest.raises(ConfigError, match=r"192\.0\.2\.20 is also the host's own, on "
                                          r"Linux interface bond1"):
        uplink.take(None, UplinkSpec(interface="eth1", vpp_addresses=(  # type: ignore[arg-type]
            ipaddress.IPv4Interface("192.0.2.20/24"),)), tmp_path)


def test_uplink_take_refuses_an_underlay_mtu_above_the_nics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "host_addresses", dict)
    monkeypatch.setattr(uplink, "capture", lambda ifname, spec, kind: saved_nic(
        mtu=1500).model_copy(update={"spec": spec}))
    monkeypatch.setattr(uplink, "_take", no_touching)
    spec = UplinkSpec(interface="eth0")
    with pytest.raises(ConfigError) as refused:
        uplink.ensure(FakeVpp(), spec, tmp_path,  # type: ignore[arg-type]
                      ipaddress.IPv4Interface("192.0.2.11/24"), underlay_mtu=9000)
    message = str(refused.value)
    assert "settings.underlay_mtu=9000 is above the MTU of the uplink NIC eth0 (1500)" \
        in message
    assert "Lower settings.underlay_mtu to 1500 or less" in message
    assert "ip link set eth0 mtu 9000" in message
    assert not list(tmp_path.iterdir())


def test_up_refuses_an_underlay_mtu_above_vpps_uplink(tmp_path: Path) -> None:
    node = Node(tmp_path, underlay_mtu=9000)  # the fake VPP's uplink has MTU 1500
    with pytest.raises(ConfigError) as refused:
        node.up()
    message = str(refused.value)
    assert "settings.underlay_mtu=9000 is above the MTU of VPP's uplink host-eth0 (1500)" \
        in message
    assert "set interface mtu 9000 host-eth0" in message
    assert node.vpp.counts.get("ipip_add_tunnel", 0) == 0
    uplink_index = next(i for i, f in node.vpp.ifaces.items() if f["name"] == "host-eth0")
    node.vpp.ifaces[uplink_index]["mtu"] = 9000  # the operator raised it
    assert node.up().changes
