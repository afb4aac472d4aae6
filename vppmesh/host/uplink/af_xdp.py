"""af_xdp: VPP's af_xdp plugin on the NIC; in generic XDP mode on any netdev, a veth too.
libxdp wants a BPF filesystem (/sys/fs/bpf)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vppmesh.dataplane.vpp import interfaces
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.host.uplink.base import LinuxNic

if TYPE_CHECKING:
    from vppmesh.host.uplink import SavedUplink


class AfXdp(LinuxNic):
    name = "af_xdp"

    def request(self, saved: SavedUplink) -> Request:
        return Request("af_xdp_create_v3", {
            "host_if": saved.nic_name, "name": f"xdp-{saved.ifname}",
            "rxq_num": saved.spec.queues, "rxq_size": 0, "txq_size": 0, "mode": 0,
            "flags": 0, "prog": "", "netns": "",
        }, f"af_xdp {saved.nic_name}")

    def delete_port(self, api: VppApi, saved: SavedUplink, nic: int | None,
                    opened: dict[str, int]) -> None:
        if nic is not None:
            api.call(Request("af_xdp_delete", {"sw_if_index": nic},
                             f"af_xdp {saved.nic_name}", tolerate=interfaces.NOT_FOUND))
