"""No tunnel at all: pods routed straight over the underlay, the ceiling of this machine."""

from __future__ import annotations

import platform

from benchmarks.contenders.base import Contender
from benchmarks.topology import Topology


class Bare(Contender):
    """Plain kernel forwarding over veth; no encryption, no encapsulation."""

    name = "bare"
    description = "no tunnel, kernel routing over the underlay (unencrypted ceiling)"
    binaries = ("ip", "iperf3", "ping")

    def setup(self, topo: Topology) -> None:
        """Each node routes the other pod subnet to the other node's underlay address."""
        topo.route_remote_pods(via_underlay=True)

    def teardown(self, topo: Topology) -> None:
        """Routes go with the namespaces."""

    def versions(self) -> dict[str, str]:
        """Only the kernel is involved."""
        return {"kernel": platform.release()}

    def details(self) -> dict[str, str]:
        """Nothing is encrypted; record it so nobody reads this as a secure contender."""
        return {"encryption": "none", "path_mtu": "1500"}


def contenders() -> list[Contender]:
    """Registry hook."""
    return [Bare()]
