"""The two-node, two-pod topology that every contender is measured on.

::

    vmb-p1 (203.0.113.1/25)            vmb-p2 (203.0.113.129/25)
        | vmbp1                             | vmbp2
        | vmbp1n 203.0.113.126/25           | vmbp2n 203.0.113.254/25
    vmb-n1 --- vmbu1 198.51.100.1/24 === vmbu2 198.51.100.2/24 --- vmb-n2

The pods default-route to their node; how a node reaches the other node's pod subnet is
the contender's job (plain route over the underlay, a tunnel interface, an IPsec policy,
a VPP instance...). Traffic always flows pod1 -> pod2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks import netns


@dataclass(frozen=True)
class Side:
    """One node and its pod."""

    node_ns: str
    pod_ns: str
    underlay_if: str
    underlay_ip: str
    pod_if: str
    pod_node_if: str
    pod_ip: str
    pod_gateway: str
    pod_subnet: str


@dataclass(frozen=True)
class Topology:
    """Names and addresses of the testbed; ``create`` builds it, ``destroy`` removes it."""

    a: Side = Side(
        node_ns="vmb-n1",
        pod_ns="vmb-p1",
        underlay_if="vmbu1",
        underlay_ip="198.51.100.1",
        pod_if="vmbp1",
        pod_node_if="vmbp1n",
        pod_ip="203.0.113.1",
        pod_gateway="203.0.113.126",
        pod_subnet="203.0.113.0/25",
    )
    b: Side = Side(
        node_ns="vmb-n2",
        pod_ns="vmb-p2",
        underlay_if="vmbu2",
        underlay_ip="198.51.100.2",
        pod_if="vmbp2",
        pod_node_if="vmbp2n",
        pod_ip="203.0.113.129",
        pod_gateway="203.0.113.254",
        pod_subnet="203.0.113.128/25",
    )
    underlay_prefixlen: int = 24
    pod_prefixlen: int = 25
    underlay_mtu: int = 1500

    @property
    def sides(self) -> tuple[Side, Side]:
        """Both sides, in traffic order (sender first)."""
        return (self.a, self.b)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace this topology owns."""
        return (self.a.node_ns, self.b.node_ns, self.a.pod_ns, self.b.pod_ns)

    def peer(self, side: Side) -> Side:
        """The other side."""
        return self.b if side is self.a else self.a

    def create(self) -> None:
        """Build namespaces, veths, addresses, forwarding and the pods' default routes."""
        for ns in self.namespaces:
            netns.create_namespace(ns)
        netns.add_veth(
            self.a.underlay_if, self.a.node_ns, self.b.underlay_if, self.b.node_ns,
            mtu=self.underlay_mtu,
        )
        for side in self.sides:
            netns.configure_link(
                side.node_ns, side.underlay_if,
                cidr=f"{side.underlay_ip}/{self.underlay_prefixlen}",
            )
            netns.add_veth(side.pod_if, side.pod_ns, side.pod_node_if, side.node_ns)
            netns.configure_link(
                side.pod_ns, side.pod_if, cidr=f"{side.pod_ip}/{self.pod_prefixlen}"
            )
            netns.configure_link(
                side.node_ns, side.pod_node_if,
                cidr=f"{side.pod_gateway}/{self.pod_prefixlen}",
            )
            netns.set_sysctl(side.node_ns, "net.ipv4.ip_forward", 1)
            netns.replace_route(side.pod_ns, "default", gateway=side.pod_gateway)

    def destroy(self) -> None:
        """Delete the namespaces (and with them every link inside); idempotent."""
        for ns in self.namespaces:
            netns.delete_namespace(ns)

    def set_pod_path_mtu(self, mtu: int) -> None:
        """Pin the pods' path MTU to a tunnel's inner MTU.

        Without this the first flows discover the tunnel MTU by ICMP, which shows up as
        retransmits that belong to path MTU discovery, not to the contender.
        """
        for side in self.sides:
            netns.replace_route(side.pod_ns, "default", gateway=side.pod_gateway, mtu=mtu)

    def route_remote_pods(
        self, *, via_underlay: bool = False, devs: tuple[str, str] | None = None
    ) -> None:
        """Route each node's remote pod subnet over the underlay or through its tunnel device.

        ``devs`` holds the tunnel interface of node 1 and node 2, in that order.
        """
        if via_underlay == (devs is not None):
            raise ValueError("route_remote_pods needs exactly one of via_underlay or devs")
        for i, side in enumerate(self.sides):
            remote = self.peer(side)
            if devs is None:
                netns.replace_route(side.node_ns, remote.pod_subnet, gateway=remote.underlay_ip)
            else:
                netns.replace_route(side.node_ns, remote.pod_subnet, dev=devs[i])

    def pod_reachable(self, timeout: float = 20.0) -> bool:
        """Whether pod1 can ping pod2 within ``timeout`` (tunnels need a handshake first)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = netns.run_in(
                self.a.pod_ns, ["ping", "-c", "1", "-W", "1", "-n", "-q", self.b.pod_ip],
                check=False, timeout=5,
            )
            if proc.returncode == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
