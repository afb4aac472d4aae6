"""Uplink takeover without VPP: the spec, the driver requests, the saved state."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from vppmesh.errors import ConfigError
from vppmesh.host import uplink
from vppmesh.host.uplink import SavedAddress, SavedRoute, SavedUplink, UplinkSpec


def saved(driver: str = "af_packet", **spec: object) -> SavedUplink:
    return SavedUplink(
        spec=UplinkSpec(interface="enp3s0f0", driver=driver, **spec),  # type: ignore[arg-type]
        ifname="enp3s0f0", mac="3c:fd:fe:12:34:56", mtu=9000, up=True, promisc=False,
        addresses=[SavedAddress(family=socket.AF_INET, address="192.0.2.10", prefixlen=24)],
        routes=[SavedRoute(family=socket.AF_INET, dst=None, dst_len=0, table=254,
                           gateway="192.0.2.1", proto=3, scope=0, type=1)],
        nic_name=uplink.nic_name("enp3s0f0"), host_link="veth")


def test_spec_rejects_unknown_drivers_and_long_names() -> None:
    with pytest.raises(ValidationError, match="driver"):
        UplinkSpec(interface="eth0", driver="netmap")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="interface"):
        UplinkSpec(interface="a" * 16)


def test_names_and_macs_fit_linux_and_stay_local() -> None:
    s = saved()
    assert s.nic_name == "enp3s0f0-nic" and len(uplink.nic_name("x" * 15)) <= 15
    assert len(s.veth_peer) <= 15
    assert uplink.bvi_mac(s.mac) == "02:fe:ff:12:34:56"
    assert uplink.host_vpp_mac(s.mac) != uplink.bvi_mac(s.mac)


def test_driver_requests() -> None:
    request = uplink.nic_request(saved())
    assert request is not None and request.name == "af_packet_create_v3"
    assert request.args["host_if_name"] == "enp3s0f0-nic"
    assert request.args["hw_addr"] == "3c:fd:fe:12:34:56"
    xdp = uplink.nic_request(saved("af_xdp", queues=4))
    assert xdp is not None and xdp.name == "af_xdp_create_v3"
    assert xdp.args["host_if"] == "enp3s0f0-nic" and xdp.args["rxq_num"] == 4
    # avf and dpdk ports come from startup.conf: no API call creates them.
    assert uplink.nic_request(saved("dpdk", vpp_interface="uplink0")) is None


def test_avf_and_dpdk_need_the_vpp_port_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--vpp-interface"):
        uplink.take(None, UplinkSpec(interface="eth0", driver="avf"), tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # refused before anything was saved or touched


def test_tap_without_vhost_net_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uplink.linux, "tap_supported", lambda: False)
    assert uplink.resolve_host_link("auto") == "veth"
    with pytest.raises(ConfigError, match="vhost-net"):
        uplink.resolve_host_link("tap")
    monkeypatch.setattr(uplink.linux, "tap_supported", lambda: True)
    assert uplink.resolve_host_link("auto") == "tap"


def test_saved_state_round_trips_and_lists(tmp_path: Path) -> None:
    s = saved()
    path = uplink.state_file(tmp_path, s.ifname)
    path.write_text(s.model_dump_json())
    assert SavedUplink.model_validate_json(path.read_text()) == s
    assert uplink.saved_uplinks(tmp_path) == ["enp3s0f0"]
    assert uplink.restore(None, tmp_path, "eth9") == []  # nothing saved: nothing to do


def test_gateway_routes_are_the_main_tables_ipv4_routes_via_a_gateway() -> None:
    s = saved()
    s.routes += [
        SavedRoute(family=socket.AF_INET, dst="192.0.2.0", dst_len=24, table=254, proto=2,
                   scope=253, type=1),  # connected: no gateway
        SavedRoute(family=socket.AF_INET, dst="10.0.0.0", dst_len=8, table=100,
                   gateway="192.0.2.2", proto=3, scope=0, type=1),  # another table
        SavedRoute(family=socket.AF_INET6, dst=None, dst_len=0, table=254,
                   gateway="2001:db8::1", proto=3, scope=0, type=1)]
    assert [(r.dst, r.gateway) for r in s.gateway_routes] == [(None, "192.0.2.1")]


def test_a_vfio_bound_nic_stays_saved_while_vpp_is_away(tmp_path: Path) -> None:
    """release_all (VPP gone) cannot give an avf/dpdk NIC to Linux: it says so, keeps the
    record and touches nothing; an af_packet NIC would be restored."""
    s = saved("dpdk", vpp_interface="uplink0")
    path = uplink.state_file(tmp_path, s.ifname)
    path.write_text(s.model_dump_json())
    lines = uplink.release_all(tmp_path)
    assert lines == ["enp3s0f0 stays bound to VPP's dpdk driver until VPP is back (the host "
                     "has no link through it meanwhile)"]
    assert SavedUplink.model_validate_json(path.read_text()) == s


def test_release_all_waits_for_another_giver_back_and_finds_the_nic_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VPP's guard and the agent see the same VPP go: the second waits for the first and
    finds nothing left to do, instead of renaming and readdressing the NIC under it."""
    import threading

    restored: list[str] = []
    monkeypatch.setattr(uplink, "restore", lambda api, d, name: restored.append(name) or [])
    path = uplink.state_file(tmp_path, "enp3s0f0")
    path.write_text(saved().model_dump_json())
    results: list[list[str]] = []
    with uplink.locked(tmp_path):  # the first one at work
        second = threading.Thread(target=lambda: results.append(uplink.release_all(tmp_path)))
        second.start()
        second.join(0.3)
        assert second.is_alive() and restored == []  # waiting
        path.unlink()  # the first one is done: the NIC is back, its record gone
    second.join(5)
    assert results == [[]] and restored == []
    assert uplink.release_all(tmp_path / "absent") == []  # no state directory: nothing
    assert not (tmp_path / "absent").exists()
