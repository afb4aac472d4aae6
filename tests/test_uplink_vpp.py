"""Uplink takeover against a real VPP, on a veth "NIC" in namespaces (vppmesh/lab/uplinkbed.py).

`<prefix>uh` is the host: its NIC eth0 (a veth) leads to `<prefix>up`, a peer router
with an address behind it. VPP runs in the host namespace and takes eth0; the host
must keep reaching the peer through the host link, and `restore` (with VPP running, and
after VPP died) must give back exactly the configuration `ip -j` showed before.
Skipped with the reason when no VPP binary is found or when not root.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vppmesh.dataplane.vpp import host_interfaces, interfaces
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import destroy, in_ns
from vppmesh.lab.uplinkbed import (
    BASE,
    BEHIND_PEER,
    BEHIND_PEER6,
    HOST_ADDR,
    HOST_NS,
    PEER_NS,
    PREFIX,
    VPP_ADDR,
    UplinkBed,
)
from vppmesh.testing.vpp_helpers import require_bpffs, require_vpp

pytestmark = [pytest.mark.vpp, pytest.mark.root]


@pytest.fixture
def bed() -> Iterator[UplinkBed]:
    require_vpp()
    bed = UplinkBed()
    try:
        bed.build()
        yield bed
    finally:
        destroy(PREFIX, BASE, quiet=True)


def ip_json(*args: str) -> Any:
    return json.loads(in_ns(HOST_NS, "ip", "-j", *args).stdout or "[]")


def linux_view() -> dict[str, Any]:
    """Links, addresses and routes of the host namespace, without counters and lifetimes."""
    links = [{k: link.get(k) for k in ("ifindex", "ifname", "mtu", "address", "flags",
                                       "operstate", "link_type", "promiscuity")}
             for link in ip_json("-d", "link", "show")]
    addrs = [{"ifname": a["ifname"], "addr": sorted(
        (i["family"], i["local"], i["prefixlen"], i.get("scope"), i.get("broadcast"),
         i.get("nodad", False), i.get("noprefixroute", False))
        for i in a.get("addr_info", []))} for a in ip_json("addr", "show")]
    routes = sorted(json.dumps(r, sort_keys=True)
                    for family in ("-4", "-6") for r in ip_json(family, "route", "show",
                                                                "table", "all"))
    return {"links": links, "addresses": addrs, "routes": routes}


def assert_same(before: dict[str, Any], settle: float = 5.0) -> None:
    """The host namespace looks as before (allowing `settle` s for IPv6 link-local routes)."""
    deadline = time.monotonic() + settle
    now = linux_view()
    while now != before and time.monotonic() < deadline:
        time.sleep(0.2)
        now = linux_view()
    for key in before:
        if isinstance(before[key], list) and key == "routes":
            assert set(now[key]) == set(before[key]), (
                f"routes gone: {sorted(set(before[key]) - set(now[key]))}; "
                f"routes new: {sorted(set(now[key]) - set(before[key]))}")
        assert now[key] == before[key], key


def reaches_peer() -> bool:
    """Both families, the on-link peer and an address routed through it."""
    for target in (BEHIND_PEER, "198.51.100.1", BEHIND_PEER6):
        # -w: up to 3 s for the first reply (neighbor discovery on a new link).
        ping = in_ns(HOST_NS, "ping", "-c", "1", "-w", "3", target, check=False)
        if ping.returncode != 0:
            return False
    return True


def wait_settled(seconds: float = 1.0, timeout: float = 10.0) -> None:
    """Operstate and IPv6 link-local addresses (DAD, then their routes) follow a link up."""
    time.sleep(seconds)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [i for a in ip_json("addr", "show") for i in a.get("addr_info", [])]
        if not any(i.get("tentative") for i in infos):
            return
        time.sleep(0.2)


def vpp_pings(bed: UplinkBed, target: str) -> bool:
    """VPP itself reaches `target` (its own routes, not the host's)."""
    with VppClient(bed.instance.api_socket).connect() as api:
        out = api.cli(f"ping {target} repeat 2 interval 0.2")
    return " 0% packet loss" in out or "2 received" in out


@pytest.mark.parametrize("driver", ["af_packet", "af_xdp"])
def test_takeover_keeps_the_host_online_and_restore_is_exact(bed: UplinkBed,
                                                             driver: str) -> None:
    if driver == "af_xdp":
        require_bpffs()
    wait_settled()
    before = linux_view()
    assert reaches_peer()

    took = bed.vppmesh("take", "--interface", "eth0", "--address", VPP_ADDR,
                       "--driver", driver)
    assert took.returncode == 0, took.stdout + took.stderr
    assert "no /dev/vhost-net here" in took.stdout or Path("/dev/vhost-net").exists()
    saved = json.loads((BASE / "state" / "uplink-eth0.json").read_text())
    assert saved["mac"] == "02:00:5e:00:53:10" and saved["mtu"] == 1500
    wait_settled()
    during = linux_view()
    eth0 = next(x for x in ip_json("-d", "link", "show", "eth0"))
    assert eth0["address"] == "02:00:5e:00:53:10" and eth0["mtu"] == 1500
    assert eth0["linkinfo"]["info_kind"] in ("veth", "tun")
    assert eth0["ifindex"] != next(x for x in before["links"] if x["ifname"] == "eth0")["ifindex"]
    nic = next(x for x in ip_json("link", "show", "eth0-nic"))
    assert "PROMISC" in nic["flags"]
    # Same addresses and routes on the host link as on the NIC before.
    assert [a for a in during["addresses"] if a["ifname"] == "eth0"] == \
        [a for a in before["addresses"] if a["ifname"] == "eth0"]
    assert any(BEHIND_PEER in r and "\"metric\": 7" in r for r in during["routes"])
    assert reaches_peer()
    # VPP answers on its own underlay address, on the same wire.
    ping_vpp = in_ns(PEER_NS, "ping", "-c", "2", "-W", "2", VPP_ADDR.split("/")[0],
                     check=False)
    assert ping_vpp.returncode == 0, ping_vpp.stdout
    # The host gets each frame once, across VPP's bridge: not also off the NIC itself
    # (af_packet leaves the frames to Linux too; af_xdp takes them first).
    assert (nic["address"] != eth0["address"]) == (driver == "af_packet")
    ping_host = in_ns(PEER_NS, "ping", "-c", "4", "-i", "0.2", "-W", "2",
                      HOST_ADDR.split("/")[0], check=False)
    assert ping_host.returncode == 0 and "duplicates" not in ping_host.stdout, ping_host.stdout
    with VppClient(bed.instance.api_socket).connect() as api:
        found = {i.tag: i for i in interfaces.dump_interfaces(api)}
    assert {"vppmesh-uplink:nic", "vppmesh-uplink:host", "vppmesh-uplink:bvi"} <= set(found)
    assert found["vppmesh-uplink:nic"].name == ("xdp-eth0" if driver == "af_xdp"
                                                else "host-eth0-nic")
    # The host's gateway route (BEHIND_PEER via the peer) is VPP's too.
    assert vpp_pings(bed, BEHIND_PEER)

    restored = bed.vppmesh("restore")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    wait_settled()
    assert_same(before)
    assert reaches_peer()
    with VppClient(bed.instance.api_socket).connect() as api:
        assert not [i for i in interfaces.dump_interfaces(api)
                    if i.tag.startswith("vppmesh-uplink:")]

    # Again, and this time VPP dies: restore works from the saved JSON alone.
    took = bed.vppmesh("take", "--interface", "eth0", "--address", VPP_ADDR,
                       "--driver", driver)
    assert took.returncode == 0, took.stdout + took.stderr
    assert reaches_peer()
    bed.kill_vpp()
    restored = bed.vppmesh("restore")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    wait_settled()
    assert_same(before)
    assert reaches_peer()
    assert not (BASE / "state" / "uplink-eth0.json").exists()


def test_up_takes_the_uplink_gives_it_back_when_vpp_dies_and_down_restores(
        bed: UplinkBed) -> None:
    from vppmesh.config import Mesh, MeshSettings, Node, dump_mesh
    from vppmesh.keying.keys import generate_private_key

    key = BASE / "h.key"
    mesh_file = BASE / "mesh.yaml"
    mesh_file.write_text(dump_mesh(Mesh(settings=MeshSettings(), nodes=[Node(
        name="h", node_number=1, underlay=[VPP_ADDR], pod_cidr="198.18.77.0/24",  # type: ignore[list-item,arg-type]
        public_key=generate_private_key(key, force=True))])))
    common = ["--mesh", str(mesh_file), "--node", "h", "--api-socket",
              str(bed.instance.api_socket), "--state-dir", str(BASE / "state")]
    wait_settled()
    before = linux_view()
    log = open(BASE / "agent.log", "w")  # noqa: SIM115 - handed to the child
    agent = subprocess.Popen(["ip", "netns", "exec", HOST_NS, sys.executable, "-m", "vppmesh",
                              "up", *common, "--key", str(key), "--host-link", "none",
                              "--take-uplink", "eth0", "--watch"],
                             stdout=log, stderr=subprocess.STDOUT)
    state = BASE / "state" / "uplink-eth0.json"

    def vpp_answers() -> bool:
        ping = in_ns(PEER_NS, "ping", "-c", "1", "-w", "3", VPP_ADDR.split("/")[0],
                     check=False)
        return ping.returncode == 0

    hog: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while "node h: " not in (BASE / "agent.log").read_text():  # `up` done
            assert time.monotonic() < deadline, (BASE / "agent.log").read_text()
            assert agent.poll() is None, (BASE / "agent.log").read_text()
            time.sleep(0.2)
        assert state.exists()
        assert reaches_peer()
        assert vpp_answers()  # the mesh's primary address is VPP's, on the BVI

        # VPP dies: the agent gives the NIC back to Linux, exactly as it was.
        bed.kill_vpp()
        died = time.monotonic()
        assert_same(before, settle=15)
        print(f"\nVPP killed: host config restored by the agent in "
              f"{time.monotonic() - died:.1f} s")
        assert not state.exists()
        assert reaches_peer()
        # VPP is back: the agent takes the NIC again and programs VPP. The machine is busy
        # from here on (a CPU hog, as in CI): when the agent stops and waits to see whether
        # VPP stops too, it must leave VPP as it found it. Its earlier probe (connect,
        # close, ten a second) left VPP dead connections that wedged its main loop under
        # load: `down` below then got no answer.
        hog = subprocess.Popen(["sh", "-c", "while :; do :; done"])
        bed.start_vpp()
        deadline = time.monotonic() + 30
        while "VPP is back" not in (BASE / "agent.log").read_text():
            assert time.monotonic() < deadline, (BASE / "agent.log").read_text()
            time.sleep(0.2)
        assert state.exists()
        assert reaches_peer()
        assert vpp_answers()
    finally:
        try:
            agent.terminate()
            agent.wait(timeout=10)
            log.close()
            down = in_ns(HOST_NS, sys.executable, "-m", "vppmesh", "down", *common,
                         check=False)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    assert "VPP still answers: the uplink stays VPP's" in (BASE / "agent.log").read_text()
    assert down.returncode == 0, down.stdout + down.stderr
    assert "linux link eth0: name, MAC, MTU, addresses and routes" in down.stdout
    assert_same(before)
    assert reaches_peer()


def test_nic_bound_by_vpp_is_saved_first_and_taken_by_its_port_name(bed: UplinkBed) -> None:
    """avf/dpdk, emulated: VPP's port for the NIC comes from startup.conf, and Linux loses
    the NIC when VPP starts. Here a veth renamed away from Linux's view (eth0 -> eth0port,
    no addresses) and an af_packet port named host-eth0port stand for the vfio-bound NIC
    and VPP's port; the driver name makes vppmesh treat it as dpdk."""
    take = ("take", "--interface", "eth0", "--driver", "dpdk", "--vpp-interface",
            "host-eth0port", "--address", VPP_ADDR)
    wait_settled()
    before = linux_view()
    state = BASE / "state" / "uplink-eth0.json"
    # VPP not running: only the NIC's Linux configuration is saved.
    bed.kill_vpp()
    saved = bed.vppmesh(*take)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert "configuration is saved" in saved.stdout
    assert json.loads(state.read_text())["taken"] is False
    # VPP starts and "binds the NIC": Linux no longer has eth0, VPP has its port.
    for args in (("link", "set", "eth0", "down"), ("addr", "flush", "dev", "eth0"),
                 ("link", "set", "eth0", "name", "eth0port"), ("link", "set", "eth0port", "up")):
        in_ns(HOST_NS, "ip", *args)
    bed.start_vpp()
    with VppClient(bed.instance.api_socket).connect() as api:
        api.call(host_interfaces.create_af_packet("eth0port", "02:00:5e:00:53:10"))
    took = bed.vppmesh(*take)
    assert took.returncode == 0, took.stdout + took.stderr
    assert json.loads(state.read_text())["taken"] is True
    wait_settled()
    assert reaches_peer()
    assert vpp_pings(bed, BEHIND_PEER)
    # Restore while VPP still has the NIC: VPP's side goes, the configuration stays.
    restored = bed.vppmesh("restore")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "still bound to VPP's driver" in restored.stdout
    assert state.exists()
    with VppClient(bed.instance.api_socket).connect() as api:
        assert not [i for i in interfaces.dump_interfaces(api)
                    if i.tag.startswith("vppmesh-uplink:") and i.name != "host-eth0port"]
        # "Bound to its kernel driver again": VPP lets go of the NIC, Linux sees eth0.
        api.call(host_interfaces.delete_af_packet("eth0port"))
    in_ns(HOST_NS, "ip", "link", "set", "eth0port", "down")
    in_ns(HOST_NS, "ip", "link", "set", "eth0port", "name", "eth0")
    restored = bed.vppmesh("restore")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    wait_settled()
    assert_same(before)
    assert reaches_peer()
    assert not state.exists()
