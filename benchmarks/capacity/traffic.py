"""Traffic for the capacity harness: VPP's packet generator as the pods, a pg sink.

The generator injects IPv4/UDP packets straight into `ip4-input` as if they came from a
pod link in the mesh VRF: no kernel, no copy, no NIC driver in the way. Many flows (64
source addresses x 256 source ports) make ECMP use every tunnel. Packet sizes are inner
IP lengths, what a pod sends: 64, 1400 (the largest that fits the 1440-byte pod MTU with
room to spare) and IMIX, the classic 7:4:1 mix of small, medium and large packets with
the large ones at 1400 instead of 1500 for the same reason.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vppmesh.dataplane.vpp import interfaces, routes
from vppmesh.dataplane.vpp.client import VppClient

FLOW_SOURCES = 64
FLOW_PORTS = 256
FIRST_PORT = 1024
DEST_PORT = 5201
SINK_MAC = "02:fe:ee:5e:00:01"


@dataclass(frozen=True)
class SizeMix:
    """Packet sizes and how many streams of each (pg runs every stream once per loop,
    so stream counts are the packet-count ratio)."""

    name: str
    streams: tuple[tuple[int, int], ...]  # (inner IP bytes, streams)

    @property
    def mean_bytes(self) -> float:
        total = sum(n for _, n in self.streams)
        return sum(size * n for size, n in self.streams) / total


MIXES = {
    "64": SizeMix("64", ((64, 1),)),
    "imix": SizeMix("imix", ((64, 7), (570, 4), (1400, 1))),
    "1400": SizeMix("1400", ((1400, 1),)),
}


def create_pg(api: VppClient, index: int) -> int:
    """A packet-generator interface pgN; its sw_if_index."""
    api.cli(f"create packet-generator interface pg{index}")
    name = f"pg{index}"
    for iface in interfaces.dump_interfaces(api):
        if iface.name == name:
            return iface.sw_if_index
    raise RuntimeError(f"VPP did not create {name}")


def add_streams(api: VppClient, mix: SizeMix, *, rx_interface: str,
                src: ipaddress.IPv4Network, dst: ipaddress.IPv4Address,
                workers: int = 0) -> list[str]:
    """The streams of one size mix, spread over the workers (or the main thread)."""
    names = []
    first = src.network_address + 10
    last = first + FLOW_SOURCES - 1
    threads = max(workers, 1)
    for size, count in mix.streams:
        for copy in range(count * threads):
            name = f"cap{size}x{copy}"
            worker = f"worker {copy % threads}" if workers else ""
            api.cli(
                f"packet-generator new {{ name {name} limit -1 size {size}-{size} "
                f"node ip4-input interface {rx_interface} {worker} data {{ "
                f"UDP: {first} - {last} -> {dst} "
                f"UDP: {FIRST_PORT} - {FIRST_PORT + FLOW_PORTS - 1} -> {DEST_PORT} "
                f"incrementing {size} }} }}")
            names.append(name)
    return names


def start(api: VppClient) -> None:
    api.cli("packet-generator enable-stream")


def stop(api: VppClient) -> None:
    api.cli("packet-generator disable-stream")


def delete_streams(api: VppClient, names: list[str]) -> None:
    for name in names:
        api.cli(f"packet-generator delete {name}")


def _pod_link(api: VppClient, index: int, table_id: int, unnumbered_to: int | None,
              address: ipaddress.IPv4Interface | None, what: str) -> int:
    """pgN in the table, IPv4 enabled (unnumbered to the gateway, or an address), up."""
    link = create_pg(api, index)
    setup = [interfaces.set_table(link, table_id, what)]
    if unnumbered_to is not None:
        setup.append(interfaces.set_unnumbered(link, unnumbered_to, True, what))
    if address is not None:
        setup.append(interfaces.address(link, address, True))
    setup.append(interfaces.set_admin(link, True, what))
    api.call_many(setup)
    return link


def add_sink(api: VppClient, index: int, *, table_id: int, dst: ipaddress.IPv4Address,
             unnumbered_to: int | None = None,
             address: ipaddress.IPv4Interface | None = None) -> int:
    """pgN as the receiving pod: `dst` lives behind it (static neighbour, /32 route).

    Its tx node (`pgN-tx`) counts what the path delivered and discards it.
    """
    sink = _pod_link(api, index, table_id, unnumbered_to, address, "sink")
    api.call_many([routes.neighbor(sink, dst, SINK_MAC, True),
                   routes.route(table_id, ipaddress.IPv4Network(f"{dst}/32"), [sink], True)])
    return sink


def add_source(api: VppClient, index: int, *, table_id: int,
               unnumbered_to: int | None = None,
               address: ipaddress.IPv4Interface | None = None) -> int:
    """pgN as the sending pods' link."""
    return _pod_link(api, index, table_id, unnumbered_to, address, "source")
