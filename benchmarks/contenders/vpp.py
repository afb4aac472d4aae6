"""VPP contenders: plain IPIP (what encryption costs inside VPP) and vppmesh itself.

Both run one VPP per node namespace of the common topology, with the testbed's startup
profile. VPP takes the underlay veth with af_packet (the kernel gives up its address) and
the node end of the pod's veth, exactly like the other contenders' tunnels take the same
links. vppmesh is driven through its own command line (`vppmesh up`, `vppmesh attach`),
so what is measured is what users run.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks import netns
from benchmarks.contenders.base import Contender
from benchmarks.topology import Side, Topology
from vppmesh.config import Mesh, MeshSettings, Node, dump_mesh
from vppmesh.dataplane.overhead import pod_mtu_for
from vppmesh.dataplane.startup import Instance, load_profile, render
from vppmesh.dataplane.state import node_mac
from vppmesh.dataplane.vpp import host_interfaces, interfaces, ipip, routes, system
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.errors import VppMeshError
from vppmesh.host import link as linux
from vppmesh.keying.keys import generate_private_key
from vppmesh.lab.testbed import TestbedError, find_vpp, start_vpp

RUN_DIR = netns.VPP_RUN_DIR
IPIP_OVERHEAD = 20
EXTRA_UNDERLAY_BASE = 10  # node k's extra underlay addresses: 198.51.100.(10k + t)


def vpp_topology() -> Topology:
    """The common topology, with pod addresses that leave .1 of each pod subnet free:
    vppmesh reserves the first address of a node's pod CIDR for the host itself."""
    base = Topology()
    return replace(base, a=replace(base.a, pod_ip="203.0.113.10"),
                   b=replace(base.b, pod_ip="203.0.113.138"))


class VppContender(Contender):
    """Starts and stops one VPP per node; subclasses build the path between them."""

    binaries = ("ip", "iperf3", "ping", "ethtool")
    process_names = ("vpp_main", "vpp_wk_0", "vpp_wk_1")

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def available(self) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        try:
            find_vpp()
        except TestbedError as exc:
            return False, str(exc)
        return True, ""

    def make_topology(self) -> Topology:
        return vpp_topology()

    def instance(self, side: Side) -> Instance:
        return Instance(name=f"vmb-{self.name}-{side.node_ns}",
                        runtime_dir=RUN_DIR / self.name / side.node_ns)

    def client(self, side: Side) -> VppClient:
        return VppClient(self.instance(side).api_socket).connect()

    def start_vpps(self, topo: Topology) -> None:
        vpp = find_vpp()
        profile = load_profile("testbed")
        for side in topo.sides:
            instance = self.instance(side)
            shutil.rmtree(instance.runtime_dir, ignore_errors=True)
            self.procs.append(start_vpp(vpp, side.node_ns, instance, instance.runtime_dir,
                                        render(profile, instance)))

    def take_uplink(self, topo: Topology, side: Side) -> int:
        """VPP owns the underlay veth and its address from here on."""
        netns.run_in(side.node_ns, ["ip", "addr", "flush", "dev", side.underlay_if])
        address = ipaddress.IPv4Interface(f"{side.underlay_ip}/{topo.underlay_prefixlen}")
        with self.client(side) as api:
            index = api.call(host_interfaces.create_af_packet(
                side.underlay_if, node_mac(topo.sides.index(side) + 1, 0x10))).sw_if_index
            api.call_many([interfaces.set_mtu(index, topo.underlay_mtu, "uplink"),
                           interfaces.address(index, address, True),
                           interfaces.set_admin(index, True, "uplink")])
        return index

    def teardown(self, topo: Topology) -> None:
        for proc in self.procs:
            netns.stop_process(proc)
        self.procs.clear()
        # The namespaces go with the topology; `ip netns exec` children die with them.
        for side in topo.sides:
            netns.kill_pids(netns.namespace_pids(side.node_ns))
        shutil.rmtree(RUN_DIR / self.name, ignore_errors=True)

    def versions(self) -> dict[str, str]:
        try:
            with VppClient(next(iter(self._sockets()))).connect() as api:
                return {"vpp": system.version(api)}
        except (StopIteration, VppMeshError):
            return {}

    def _sockets(self) -> list[Path]:
        return sorted((RUN_DIR / self.name).glob("*/api.sock"))


class VppIpip(VppContender):
    """Plain IPIP between the two VPPs: the same dataplane as vppmesh minus ESP."""

    name = "vpp-ipip"
    description = "VPP 26.06, plain IPIP tunnel, no encryption (af_packet links)"

    def setup(self, topo: Topology) -> None:
        self.start_vpps(topo)
        mtu = topo.underlay_mtu - IPIP_OVERHEAD
        for side in topo.sides:
            uplink = self.take_uplink(topo, side)
            remote = topo.peer(side)
            gateway = ipaddress.IPv4Interface(f"{side.pod_gateway}/{topo.pod_prefixlen}")
            netns.run_in(side.node_ns, ["ip", "addr", "flush", "dev", side.pod_node_if])
            # The same veth offloads vppmesh uses on af_packet (segmented by the kernel).
            linux.set_offloads(side.pod_node_if, side.node_ns, False)
            linux.set_offloads(side.pod_if, side.pod_ns, False)
            with self.client(side) as api:
                pod = api.call(host_interfaces.create_af_packet(
                    side.pod_node_if, node_mac(topo.sides.index(side) + 1, 0x11))).sw_if_index
                tunnel = api.call(ipip.add_tunnel(1, side.underlay_ip,
                                                  remote.underlay_ip)).sw_if_index
                api.call_many([
                    interfaces.set_mtu(pod, mtu, "pod link"),
                    interfaces.address(pod, gateway, True),
                    interfaces.set_admin(pod, True, "pod link"),
                    interfaces.set_unnumbered(tunnel, uplink),
                    interfaces.set_mtu(tunnel, mtu, "tunnel"),
                    interfaces.set_admin(tunnel, True, "tunnel"),
                    routes.route(0, ipaddress.IPv4Network(remote.pod_subnet), [tunnel], True),
                ])
        topo.set_pod_path_mtu(mtu)

    def details(self) -> dict[str, str]:
        return {"encryption": "none", "tunnels": "1",
                "path_mtu": str(Topology().underlay_mtu - IPIP_OVERHEAD)}


class Vppmesh(VppContender):
    """vppmesh as users run it: a mesh file, keys, `vppmesh up`, `vppmesh attach`."""

    def __init__(self, tunnels: int) -> None:
        super().__init__()
        self.tunnels = tunnels
        self.name = "vppmesh" if tunnels == 1 else f"vppmesh-{tunnels}t"
        self.description = (f"vppmesh, ESP AES-GCM-256 over IPIP, {tunnels} tunnel(s) per "
                            "pair" + (" with ECMP" if tunnels > 1 else ""))

    def mesh(self, topo: Topology) -> Mesh:
        nodes = []
        for number, side in enumerate(topo.sides, start=1):
            workdir = self.instance(side).runtime_dir
            public = generate_private_key(workdir / "private.key", force=True)
            extra = [f"198.51.100.{EXTRA_UNDERLAY_BASE * number + t}/{topo.underlay_prefixlen}"
                     for t in range(1, self.tunnels)]
            nodes.append(Node(
                name=side.node_ns, node_number=number,
                underlay=[f"{side.underlay_ip}/{topo.underlay_prefixlen}", *extra],  # type: ignore[list-item]
                pod_cidr=ipaddress.IPv4Network(side.pod_subnet), public_key=public))
        return Mesh(settings=MeshSettings(tunnels_per_peer=self.tunnels,
                                          underlay_mtu=topo.underlay_mtu), nodes=nodes)

    def vppmesh(self, side: Side, *args: str) -> None:
        instance = self.instance(side)
        netns.run_in(side.node_ns, [
            sys.executable, "-m", "vppmesh", args[0], "--mesh",
            str(RUN_DIR / self.name / "mesh.yaml"), "--node", side.node_ns,
            "--api-socket", str(instance.api_socket), *args[1:]])

    def setup(self, topo: Topology) -> None:
        self.start_vpps(topo)
        mesh = self.mesh(topo)
        (RUN_DIR / self.name / "mesh.yaml").write_text(dump_mesh(mesh))
        for side in topo.sides:
            self.take_uplink(topo, side)
        for side in topo.sides:
            workdir = self.instance(side).runtime_dir
            self.vppmesh(side, "up", "--key", str(workdir / "private.key"), "--host-link",
                         "none", "--uplink", f"host-{side.underlay_if}", "--state-dir",
                         str(workdir / "state"))
            # vppmesh attaches pods with its own veth pair: the topology's goes away.
            netns.run_in(side.node_ns, ["ip", "link", "del", side.pod_node_if])
            self.vppmesh(side, "attach", "--name", "bench", "--netns", side.pod_ns,
                         "--address", side.pod_ip)

    def details(self) -> dict[str, str]:
        return {"encryption": "ESP AES-GCM-256 (ESN, anti-replay)",
                "tunnels": str(self.tunnels),
                "path_mtu": str(pod_mtu_for(Topology().underlay_mtu, ipv6_underlay=False))}


def contenders() -> list[Contender]:
    """Registry hook: plain IPIP, vppmesh with 1 tunnel and with 4 (ECMP)."""
    return [VppIpip(), Vppmesh(1), Vppmesh(4)]
