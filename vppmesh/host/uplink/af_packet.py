"""af_packet: VPP reads and writes the NIC through a packet socket; works on any netdev."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vppmesh.dataplane.vpp import host_interfaces
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.host import link as linux
from vppmesh.host.uplink.base import LinuxNic

if TYPE_CHECKING:
    from vppmesh.host.uplink import SavedUplink


class AfPacket(LinuxNic):
    name = "af_packet"

    def request(self, saved: SavedUplink) -> Request:
        return host_interfaces.create_af_packet(saved.nic_name, saved.mac, saved.spec.queues)

    def linux_mac(self, saved: SavedUplink) -> str:
        # Linux sees every frame VPP reads with af_packet: with the host's MAC it would
        # take the host's frames itself too, and the host got each twice (directly and
        # across VPP's bridge). Promiscuous, the NIC still hands VPP the frames for the
        # host's MAC; restore() gives the MAC back.
        return linux.vpp_end_mac(saved.mac)

    def delete_port(self, api: VppApi, saved: SavedUplink, nic: int | None,
                    opened: dict[str, int]) -> None:
        # Only what VPP still has: VPP refuses to delete a missing af_packet.
        if saved.nic_name in opened:
            api.call(host_interfaces.delete_af_packet(saved.nic_name))
